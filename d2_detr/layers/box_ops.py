"""Box conversions and generalised IoU (Rezatofighi et al. 2019), as used by DETR's matcher and loss.

Boxes are ``(..., 4)`` tensors, either ``(cx, cy, w, h)`` ("cxcywh") or ``(x0, y0, x1, y1)`` ("xyxy").
Zero-size boxes (points and segments) are valid; where a union or an enclosing box has zero area the
corresponding ratio is defined as 0 instead of NaN.
"""
from typing import Tuple

import torch
from torch import Tensor

from .tracing import static_size

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
    "inverse_sigmoid",
    "refine_boxes",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``(..., 4)`` boxes from (cx, cy, w, h) to (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``(..., 4)`` boxes from (x0, y0, x1, y1) to (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` of ``x`` clamped to [0, 1], with both terms clamped to at least ``eps``: finite
    (within +-log(1 / eps)) for every x, as in Deformable DETR."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(deltas: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalised cxcywh boxes ``(..., 4)`` from a box head's outputs ``deltas`` ``(..., 4)`` relative to
    ``reference`` points ``(..., 2)`` (cx, cy) or boxes ``(..., 4)``, in inverse-sigmoid space:
    ``sigmoid(deltas + inverse_sigmoid(reference, eps))``, the reference added to the centre only when it is a
    point (``eps``: 1e-5 in Deformable DETR, 1e-3 in DINO)."""
    if static_size(reference, -1) == 2:
        return torch.cat([deltas[..., :2] + inverse_sigmoid(reference, eps), deltas[..., 2:]], dim=-1).sigmoid()
    return (deltas + inverse_sigmoid(reference, eps)).sigmoid()


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(...,)`` of ``(..., 4)`` xyxy boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_xyxy(boxes1: Tensor, boxes2: Tensor) -> None:
    """Raise ValueError unless both ``(N, 4)``/``(M, 4)`` xyxy tensors hold well-formed boxes.

    Both tensors are checked with a single host synchronisation. NaN coordinates fail the check too.
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    valid1 = (boxes1[:, 2:] >= boxes1[:, :2]).all()
    valid2 = (boxes2[:, 2:] >= boxes2[:, :2]).all()
    if not bool(valid1 & valid2):
        raise ValueError(
            "generalized_box_iou needs xyxy boxes with x1 >= x0 and y1 >= y0; got degenerate or non-finite "
            "boxes (were cxcywh boxes passed without conversion, or did the predictions diverge to NaN?)"
        )


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0`` and 0 elsewhere, with finite gradients everywhere."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _iou_and_union(boxes1: Tensor, boxes2: Tensor, area1: Tensor, area2: Tensor) -> Tuple[Tensor, Tensor]:
    """IoU and union area of broadcast-compatible xyxy boxes ``(..., 4)``; returns two ``(...)`` tensors."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])  # (..., 2)
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])  # (..., 2)
    wh = (rb - lt).clamp(min=0)  # (..., 2)
    inter = wh[..., 0] * wh[..., 1]  # (...)
    union = area1 + area2 - inter  # (...)
    return _safe_div(inter, union), union


def _giou(boxes1: Tensor, boxes2: Tensor, area1: Tensor, area2: Tensor) -> Tensor:
    """GIoU of broadcast-compatible xyxy boxes ``(..., 4)`` with their areas; returns ``(...)``."""
    iou, union = _iou_and_union(boxes1, boxes2, area1, area2)
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])  # (..., 2)
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])  # (..., 2)
    wh = (rb - lt).clamp(min=0)  # (..., 2)
    enclosing = wh[..., 0] * wh[..., 1]  # (...)
    return iou - _safe_div(enclosing - union, enclosing)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU and union area of xyxy boxes ``(N, 4)`` and ``(M, 4)``; returns two ``(N, M)`` tensors."""
    return _iou_and_union(boxes1[:, None, :], boxes2[None, :, :], box_area(boxes1)[:, None], box_area(boxes2)[None, :])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes ``(N, 4)`` and ``(M, 4)``; returns ``(N, M)`` in [-1, 1].

    Raises:
        ValueError: if a box has x1 < x0 or y1 < y0 (or NaN coordinates).
    """
    _check_xyxy(boxes1, boxes2)
    return _giou(boxes1[:, None, :], boxes2[None, :, :], box_area(boxes1)[:, None], box_area(boxes2)[None, :])


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of corresponding xyxy boxes ``(N, 4)`` and ``(N, 4)``; returns ``(N,)``.

    Equal to ``generalized_box_iou(boxes1, boxes2).diagonal()`` at O(N) cost.

    Raises:
        ValueError: if the shapes differ, or a box has x1 < x0 or y1 < y0 (or NaN coordinates).
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    _check_xyxy(boxes1, boxes2)
    return _giou(boxes1, boxes2, box_area(boxes1), box_area(boxes2))
