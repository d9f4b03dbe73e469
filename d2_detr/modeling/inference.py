"""Turning the per-query class scores of DETR-family models into scored detections."""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.tracing import static_size

__all__ = ["select_batch_predictions", "select_predictions"]


def select_batch_predictions(
    logits: Tensor, boxes: Tensor, topk: int = 0, sigmoid: bool = False
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores, labels and boxes of a batch, as batched tensors (no per-image Python loop, so it traces and exports).

    Args:
        logits: (B, Q, K+1) class logits, the last class being "no object"; with ``sigmoid`` (B, Q, K) logits
            of independent per-class probabilities (no "no object" class).
        boxes: (B, Q, 4) boxes of the queries.
        topk: 0 for DETR's rule: every query is returned, scored by its best foreground
            probability. k > 0: the k best (query, class) pairs of each image, so one query may yield several
            classes (Deformable DETR: 100, with ``sigmoid``).
        sigmoid: class probabilities by sigmoid (focal-loss models) instead of a softmax over K+1 classes with
            "no object" dropped (DETR).
    Returns:
        scores (B, N), labels (B, N) int64, boxes (B, N, 4) and queries (B, N) int64, the query each
        prediction comes from; N = Q, or min(k, Q*K).
    """
    if sigmoid:
        prob = logits.float().sigmoid()  # (B, Q, K)
    else:
        prob = F.softmax(logits.float(), dim=-1)[..., :-1]  # (B, Q, K)
    if topk <= 0:
        scores, labels = prob.max(dim=-1)  # (B, Q)
        queries = torch.arange(prob.shape[1], device=prob.device).expand_as(labels)  # (B, Q)
        return scores, labels, boxes, queries
    num_classes = static_size(prob, -1)  # sizes fixed by the model: constants in a traced graph
    k = min(topk, static_size(prob, 1) * num_classes)
    scores, flat_idx = prob.flatten(1).topk(k, dim=1)  # (B, k)
    queries = torch.div(flat_idx, num_classes, rounding_mode="floor")
    labels = flat_idx % num_classes
    picked = torch.gather(boxes, 1, queries[..., None].expand(-1, -1, boxes.shape[-1]))  # (B, k, 4)
    return scores, labels, picked, queries


def select_predictions(
    logits: Tensor, boxes: Tensor, topk: int = 0, sigmoid: bool = False
) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """:func:`select_batch_predictions` per image: scores (N,), labels (N,) int64, boxes (N, 4) of each image."""
    scores, labels, picked, _ = select_batch_predictions(logits, boxes, topk, sigmoid)
    return list(zip(scores, labels, picked))
