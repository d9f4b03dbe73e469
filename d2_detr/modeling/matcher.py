"""DETR's Hungarian matcher: a one-to-one assignment between predictions and ground-truth boxes.

The whole batch's cost matrix is computed on the model's device and copied to the host once per call
(also when several decoder layers are matched together with :meth:`HungarianMatcher.match_layers`);
:func:`solve_assignments` then solves each (layer, image) block with ``scipy.optimize.linear_sum_assignment``.
"""
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from d2_detr.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from d2_detr.modeling.registry import DETR_MATCHER_REGISTRY

__all__ = ["HungarianMatcher", "solve_assignments"]

# One image's matching: (indices of the matched predictions, indices of the matched targets), int64, same length.
MatchIndices = Tuple[Tensor, Tensor]


def _empty_match() -> MatchIndices:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def solve_assignments(cost: np.ndarray, sizes: Sequence[int]) -> List[List[MatchIndices]]:
    """Optimal one-to-one assignments of every (set, image) block of a batched cost array.

    Each block is solved by one ``linear_sum_assignment`` call on a view of ``cost`` (no copy); the results are
    wrapped as tensors without copying either, so the only per-block Python work is that call.

    Args:
        cost: (L, B, Q, T) host array: cost of query q of image b in prediction set l against target t, the
            targets of all images being concatenated (image b owns columns ``sum(sizes[:b])`` to
            ``sum(sizes[:b + 1])``; the other columns of its rows are ignored).
        sizes: the B images' target counts, summing to T.

    Returns:
        L lists of B ``(pred_idx, tgt_idx)`` int64 CPU tensors of length ``min(Q, sizes[b])``, ``pred_idx``
        sorted, ``tgt_idx`` indexing image b's own targets; exactly what per-block calls of
        ``linear_sum_assignment`` return.
    """
    bounds = np.cumsum([0, *sizes])  # (B + 1,)
    matches: List[List[MatchIndices]] = []
    for layer_cost in cost:  # (B, Q, T)
        layer_matches: List[MatchIndices] = []
        for image_cost, start, end in zip(layer_cost, bounds[:-1], bounds[1:]):  # (Q, T)
            if start == end:
                layer_matches.append(_empty_match())
                continue
            pred_idx, tgt_idx = linear_sum_assignment(image_cost[:, start:end])
            layer_matches.append((torch.from_numpy(pred_idx.astype(np.int64, copy=False)),
                                  torch.from_numpy(tgt_idx.astype(np.int64, copy=False))))
        matches.append(layer_matches)
    return matches


@DETR_MATCHER_REGISTRY.register()
class HungarianMatcher(nn.Module):
    """Optimal bipartite matching between the queries and the targets of each image.

    The cost of matching query q to target t is
    ``cost_class * -p_q(class_t) + cost_bbox * ||box_q - box_t||_1 + cost_giou * -GIoU(box_q, box_t)``,
    with p the softmax over the K + 1 classes, L1 on normalised (cx, cy, w, h) and GIoU on (x0, y0, x1, y1).
    Costs are computed in float32 whatever the dtype of the predictions. Each image gets
    ``min(num_queries, num_targets)`` pairs; an image without targets gets none.
    """

    @configurable
    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        """
        Args:
            cost_class: weight of the negative probability of the target class.
            cost_bbox: weight of the L1 distance between the (cx, cy, w, h) boxes.
            cost_giou: weight of the negative generalised IoU.
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, float]:
        return {
            "cost_class": cfg.MODEL.DETR.COST_CLASS,
            "cost_bbox": cfg.MODEL.DETR.COST_BBOX,
            "cost_giou": cfg.MODEL.DETR.COST_GIOU,
        }

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> List[MatchIndices]:
        """Match one set of predictions to the targets.

        Args:
            outputs: ``"pred_logits"`` (B, Q, K + 1) and ``"pred_boxes"`` (B, Q, 4), normalised cxcywh.
            targets: B dicts with ``"labels"`` int64 (n_i,) and ``"boxes"`` (n_i, 4), normalised cxcywh.

        Returns:
            B tuples ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length ``min(Q, n_i)``; ``pred_idx`` is
            sorted, and query ``pred_idx[j]`` is matched to target ``tgt_idx[j]``.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, layer_outputs: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> List[List[MatchIndices]]:
        """Match several sets of predictions (e.g. every decoder layer's) to the same targets.

        Each set is matched independently, exactly as by :meth:`forward`, but the costs of all sets are
        computed together and copied to the host once.

        Args:
            layer_outputs: L dicts shaped like the ``outputs`` of :meth:`forward`, all with the same B and Q.
            targets: B target dicts, as for :meth:`forward`.

        Returns:
            L lists of B ``(pred_idx, tgt_idx)`` tuples, in the order of ``layer_outputs``.
        """
        num_layers = len(layer_outputs)
        if num_layers == 0:
            return []
        batch_size, num_queries = layer_outputs[0]["pred_logits"].shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"Got {len(targets)} targets for a batch of {batch_size} predictions")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [[_empty_match() for _ in range(batch_size)] for _ in range(num_layers)]

        logits = torch.stack([o["pred_logits"] for o in layer_outputs])  # (L, B, Q, K+1)
        boxes = torch.stack([o["pred_boxes"] for o in layer_outputs])  # (L, B, Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device=logits.device, dtype=torch.int64)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=boxes.device, dtype=torch.float32)  # (T, 4)
        cost = self._cost(logits.flatten(0, 2), boxes.flatten(0, 2), tgt_labels, tgt_boxes)  # (L*B*Q, T)
        cost = cost.view(num_layers, batch_size, num_queries, -1).cpu().numpy()  # the only device-to-host copy
        return solve_assignments(cost, sizes)

    def _cost(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Float32 cost matrix (N, T) between N predictions (logits (N, C), boxes (N, 4)) and T targets."""
        boxes = boxes.float()  # (N, 4)
        cost_class = self._class_cost(logits.float(), tgt_labels)  # (N, T)
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (N, T)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (N, T)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    def _class_cost(self, logits: Tensor, tgt_labels: Tensor) -> Tensor:
        """Unweighted class cost (N, T) of N predictions' float32 logits (N, K+1) against T target labels:
        minus the softmax probability of the target class."""
        return -logits.softmax(-1)[:, tgt_labels]
