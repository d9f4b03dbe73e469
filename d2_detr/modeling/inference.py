"""Turning DETR's per-query class distributions into scored detections."""
from typing import List, Tuple

import torch
import torch.nn.functional as F


def select_predictions(
    logits: torch.Tensor, boxes: torch.Tensor, topk: int = 0
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Scores, labels and boxes of each image.

    Args:
        logits: (B, Q, K+1) class logits, the last class being "no object".
        boxes: (B, Q, 4) boxes of the queries.
        topk: 0 for the paper's rule: every query is returned, scored by its best foreground
            probability (softmax over K+1 classes, "no object" dropped). k > 0: the k best
            (query, class) pairs of each image, so one query may yield several classes.
    Returns:
        per image: scores (N,), labels (N,) int64, boxes (N, 4); N = Q, or min(k, Q*K).
    """
    prob = F.softmax(logits.float(), dim=-1)[..., :-1]  # (B, Q, K)
    if topk <= 0:
        scores, labels = prob.max(dim=-1)  # (B, Q)
        return list(zip(scores, labels, boxes))
    num_classes = prob.shape[-1]
    k = min(topk, prob.shape[1] * num_classes)
    scores, flat_idx = prob.flatten(1).topk(k, dim=1)  # (B, k)
    queries = torch.div(flat_idx, num_classes, rounding_mode="floor")
    labels = flat_idx % num_classes
    picked = torch.gather(boxes, 1, queries[..., None].expand(-1, -1, boxes.shape[-1]))  # (B, k, 4)
    return list(zip(scores, labels, picked))
