"""Sigmoid focal classification for set prediction (Deformable DETR, DINO): a matcher and a criterion variant.

The class head has one logit per foreground class and no "no object" class; a query's class probabilities are
independent sigmoids. :class:`FocalHungarianMatcher` is DETR's Hungarian matcher with the focal class cost,
:class:`FocalSetCriterion` DETR's set criterion with the sigmoid focal loss as ``loss_ce``; matching, box losses,
deep supervision, the two-stage encoder losses and the normalisation over processes and accumulated micro-batches
are those of :class:`~d2_detr.modeling.criterion.SetCriterion`.
"""
from typing import Any, Dict, Tuple

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor, nn

from .criterion import SetCriterion
from .mask_losses import sigmoid_focal_loss
from .matcher import HungarianMatcher
from .registry import DETR_CRITERION_REGISTRY, DETR_MATCHER_REGISTRY

__all__ = ["FocalHungarianMatcher", "FocalSetCriterion", "focal_class_cost"]

# Added to the probabilities inside the logarithms of the matching cost, as in the original code.
_LOG_EPS = 1e-8


def focal_class_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal matching cost of labelling a prediction with each class: ``(..., K)`` logits -> ``(..., K)`` costs
    ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))``, p = sigmoid(logit): the focal loss of
    the class as a positive minus its focal loss as a negative."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + _LOG_EPS).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + _LOG_EPS).log()
    return positive - negative


@DETR_MATCHER_REGISTRY.register()
class FocalHungarianMatcher(HungarianMatcher):
    """:class:`~d2_detr.modeling.matcher.HungarianMatcher` whose class cost is :func:`focal_class_cost` of the
    target class (logits (B, Q, K) of sigmoid classes); weights 2 (class), 5 (L1), 2 (GIoU) in Deformable DETR."""

    @configurable
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25,
                 gamma: float = 2.0):
        """
        Args:
            cost_class: weight of the focal class cost.
            cost_bbox: weight of the L1 distance between the (cx, cy, w, h) boxes.
            cost_giou: weight of the negative generalised IoU.
            alpha: focal weight of the positives (1 - alpha for the negatives).
            gamma: focal exponent.
        """
        super().__init__(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, float]:
        return {**super().from_config(cfg), "alpha": cfg.MODEL.DETR.FOCAL_ALPHA, "gamma": cfg.MODEL.DETR.FOCAL_GAMMA}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, gamma={self.gamma}"

    def _class_cost(self, logits: Tensor, tgt_labels: Tensor) -> Tensor:
        """Focal class cost (N, T) of N predictions' float32 logits (N, K) against T target labels."""
        return focal_class_cost(logits, self.alpha, self.gamma)[:, tgt_labels]


@DETR_CRITERION_REGISTRY.register()
class FocalSetCriterion(SetCriterion):
    """:class:`~d2_detr.modeling.criterion.SetCriterion` whose ``loss_ce`` is the sigmoid focal loss.

    Every (query, class) pair is a binary problem: positive for a matched query's target class, negative
    otherwise. As in Deformable DETR, the loss of a layer is the focal loss averaged over the queries, summed over
    images and classes, divided by ``num_boxes`` and multiplied by the number of queries, that is the sum over all
    pairs divided by ``num_boxes`` (so it normalises over processes and accumulated micro-batches as the box losses
    do). Weights 2 (class), 5 (L1), 2 (GIoU) in Deformable DETR.
    """

    @configurable
    def __init__(self, num_classes: int, matcher: nn.Module, class_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, deep_supervision: bool = True, alpha: float = 0.25, gamma: float = 2.0):
        """
        Args:
            num_classes: number K of foreground classes = class logits per query.
            matcher, l1_weight, giou_weight, deep_supervision: as in
                :class:`~d2_detr.modeling.criterion.SetCriterion`.
            class_weight: weight of the focal ``loss_ce``.
            alpha: focal weight of the positives (1 - alpha for the negatives).
            gamma: focal exponent.
        """
        super().__init__(num_classes=num_classes, matcher=matcher, class_weight=class_weight, l1_weight=l1_weight,
                         giou_weight=giou_weight, deep_supervision=deep_supervision)
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        args = super().from_config(cfg)
        del args["eos_coef"]  # no "no object" class
        del args["loss_ce_norm_across_processes"]  # no class weights: the focal loss is normalised by the boxes
        return {**args, "alpha": cfg.MODEL.DETR.FOCAL_ALPHA, "gamma": cfg.MODEL.DETR.FOCAL_GAMMA}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_weight={self.class_weight}, l1_weight={self.l1_weight}, "
            f"giou_weight={self.giou_weight}, deep_supervision={self.deep_supervision}, alpha={self.alpha}, "
            f"gamma={self.gamma}"
        )

    def _class_loss(self, logits: Tensor, tgt_labels: Tensor, flat_indices: Tuple[Tensor, Tensor, Tensor],
                    num_boxes: Tensor, class_weight_sum: Tensor) -> Tensor:
        """Unweighted () focal loss of one layer from its float32 logits (B, Q, K); ``class_weight_sum`` is unused."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"FocalSetCriterion expects {self.num_classes} class logits per query (one per class, no "
                             f"'no object'), got {logits.shape[-1]}: use it with a sigmoid class head such as "
                             "DeformableDetr's, and SetCriterion with Detr")
        batch_idx, query_idx, target_idx = flat_indices
        onehot = torch.zeros_like(logits)  # (B, Q, K)
        onehot[batch_idx, query_idx, tgt_labels[target_idx]] = 1
        num_queries = logits.shape[1]
        # (B * K, Q) rows: the focal loss's mean over each row is the mean over queries.
        return sigmoid_focal_loss(logits.transpose(1, 2).flatten(0, 1), onehot.transpose(1, 2).flatten(0, 1),
                                  num_boxes, self.alpha, self.gamma) * num_queries
