"""DETR's set criterion: Hungarian matching followed by classification and box losses.

For each supervised decoder layer the predictions are matched to the targets, then
``loss_ce`` (cross-entropy over all queries, unmatched ones labelled "no object", whose class weight is
``eos_coef``), ``loss_bbox`` (L1 on matched normalised cxcywh boxes) and ``loss_giou`` (1 - GIoU of matched
boxes) are computed; the two box losses are sums divided by the batch's number of target boxes averaged over
processes (as in the original), and ``loss_ce`` is the class-weighted sum divided by the batch's sum of class
weights averaged over processes (in one process: the weighted mean of ``F.cross_entropy``). Every returned loss
is already multiplied by its weight.

Both normalisers count the whole batch of an optimisation step, so that the gradient, once averaged over
processes by DistributedDataParallel, does not depend on how the batch is split between processes; within
:meth:`SetCriterion.normalize_over` they also count the step's other accumulated micro-batches. The original
implementation divides ``loss_ce`` by the local batch's class weights (``F.cross_entropy`` with class weights in
each process), so with several processes its gradient weights each process's queries by how many targets that
process drew; ``loss_ce_norm_across_processes=False`` (``MODEL.DETR.LOSS_CE_NORM_ACROSS_PROCESSES False``)
does that.

Outputs with ``"enc_outputs"`` (two-stage models: predictions from the encoder output) also get the three losses
of those predictions (suffix ``_enc``), matched and computed against the targets with every label set to 0
(class-agnostic proposals; with the target labels when ``class_agnostic_encoder`` is False), with the same
normalisers.
"""
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.utils import comm
from torch import Tensor, nn

from d2_detr.layers.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from d2_detr.modeling.registry import DETR_CRITERION_REGISTRY, build_matcher

__all__ = ["SetCriterion"]

MatchIndices = Tuple[Tensor, Tensor]


@DETR_CRITERION_REGISTRY.register()
class SetCriterion(nn.Module):
    """DETR's loss with optional deep supervision of the intermediate decoder layers.

    ``forward`` returns ``(losses, metrics)``: ``losses`` holds exactly the weighted scalar terms to sum and
    optimise (``loss_ce``, ``loss_bbox``, ``loss_giou`` for the last layer, plus ``loss_ce_i``, ``loss_bbox_i``,
    ``loss_giou_i`` for auxiliary layer i when deep supervision is on, and ``loss_ce_enc``, ``loss_bbox_enc``,
    ``loss_giou_enc`` for ``outputs["enc_outputs"]`` when present); ``metrics`` holds detached,
    logging-only values (``class_error``, ``cardinality_error``) of the last layer.
    """

    #: Supervise ``outputs["enc_outputs"]`` class-agnostically (every label 0: Deformable DETR's two-stage
    #: proposals) instead of with the target classes (DINO's encoder queries).
    class_agnostic_encoder: bool = True

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        eos_coef: float = 0.1,
        class_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        deep_supervision: bool = True,
        loss_ce_norm_across_processes: bool = True,
    ):
        """
        Args:
            num_classes: number K of foreground classes; index K of the class logits is "no object".
            matcher: called as ``matcher(outputs, targets)`` for a list of B ``(pred_idx, tgt_idx)`` tuples;
                if it has a ``match_layers(layer_outputs, targets)`` method, all layers are matched in one call.
            eos_coef: cross-entropy weight of the "no object" class.
            class_weight: weight of ``loss_ce``.
            l1_weight: weight of ``loss_bbox``.
            giou_weight: weight of ``loss_giou``.
            deep_supervision: also compute the losses of ``outputs["aux_outputs"]``.
            loss_ce_norm_across_processes: divide ``loss_ce`` by the class weights of the whole step averaged over
                processes (True), or by this process's own (False, the original: ``F.cross_entropy``'s weighted
                mean over the local batch, or over the local micro-batches of the step with accumulation).
                Identical in one process.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.deep_supervision = deep_supervision
        self.loss_ce_norm_across_processes = loss_ce_norm_across_processes
        empty_weight = torch.ones(num_classes + 1)  # (K+1,)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)  # derived from the config
        self._step_num_targets: Optional[List[int]] = None  # set by normalize_over

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        detr = cfg.MODEL.DETR
        return {
            "num_classes": detr.NUM_CLASSES,
            "matcher": build_matcher(cfg),
            "eos_coef": detr.NO_OBJECT_WEIGHT,
            "class_weight": detr.CLASS_WEIGHT,
            "l1_weight": detr.L1_WEIGHT,
            "giou_weight": detr.GIOU_WEIGHT,
            "deep_supervision": detr.DEEP_SUPERVISION,
            "loss_ce_norm_across_processes": detr.LOSS_CE_NORM_ACROSS_PROCESSES,
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, class_weight={self.class_weight}, "
            f"l1_weight={self.l1_weight}, giou_weight={self.giou_weight}, deep_supervision={self.deep_supervision}, "
            f"loss_ce_norm_across_processes={self.loss_ce_norm_across_processes}"
        )

    @contextmanager
    def normalize_over(self, num_targets: Sequence[int]) -> Iterator[None]:
        """Normalise the losses of every batch passed in this context as if it were part of one batch made
        of images with ``num_targets`` target boxes (one count per image: all the micro-batches that this
        process accumulates into one optimisation step). Summed over those micro-batches, the losses and
        their gradients then equal those of one forward pass on all of them."""
        previous = self._step_num_targets
        self._step_num_targets = list(num_targets)
        try:
            yield
        finally:
            self._step_num_targets = previous

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Compute the losses and metrics of a batch, in float32 also inside an autocast region.

        Args:
            outputs: ``"pred_logits"`` (B, Q, K+1), ``"pred_boxes"`` (B, Q, 4) normalised cxcywh, and optionally
                ``"aux_outputs"``: a list of dicts with the same two keys for the first L-1 decoder layers.
            targets: B dicts with ``"labels"`` int64 (n_i,) and ``"boxes"`` (n_i, 4) normalised cxcywh.

        Returns:
            ``(losses, metrics)``: weighted scalar losses to optimise, and detached logging-only scalars.
        """
        # Mixed precision: the matching costs and the losses must not be autocast to float16/bfloat16.
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            return self._losses_and_metrics(outputs, targets)

    def _losses_and_metrics(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """:meth:`forward`'s work, outside autocast."""
        layers: List[Mapping[str, Tensor]] = [outputs]
        if self.deep_supervision:
            layers += list(outputs.get("aux_outputs", ()))
        layer_indices = self._match(layers, targets)

        device = outputs["pred_logits"].device
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)  # (T, 4)
        sizes = [len(t["labels"]) for t in targets]
        num_boxes, class_weight_sum = self._normalizers(sizes, outputs["pred_logits"].shape[1], device)

        losses: Dict[str, Tensor] = {}
        metrics: Dict[str, Tensor] = {}
        for layer_id, (layer_outputs, indices) in enumerate(zip(layers, layer_indices)):
            suffix = "" if layer_id == 0 else f"_{layer_id - 1}"
            flat_indices = self._flatten_indices(indices, sizes, device)
            layer_losses = self._layer_losses(
                layer_outputs, tgt_labels, tgt_boxes, flat_indices, num_boxes, class_weight_sum
            )
            losses.update({k + suffix: v for k, v in layer_losses.items()})
            if layer_id == 0:
                metrics = self._metrics(layer_outputs, tgt_labels, flat_indices, sizes)
                losses.update(self._last_layer_losses(layer_outputs, targets, flat_indices, num_boxes))
        if "enc_outputs" in outputs:
            enc_targets, enc_labels = targets, tgt_labels
            if self.class_agnostic_encoder:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                enc_labels = torch.zeros_like(tgt_labels)
            enc_outputs = outputs["enc_outputs"]
            (indices,) = self._match([enc_outputs], enc_targets)
            _, enc_class_weight_sum = self._normalizers(sizes, enc_outputs["pred_logits"].shape[1], device)
            enc_losses = self._layer_losses(enc_outputs, enc_labels, tgt_boxes,
                                            self._flatten_indices(indices, sizes, device), num_boxes,
                                            enc_class_weight_sum)
            losses.update({k + "_enc": v for k, v in enc_losses.items()})
        return losses, metrics

    def _last_layer_losses(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        flat_indices: Tuple[Tensor, Tensor, Tensor],
        num_boxes: Tensor,
    ) -> Dict[str, Tensor]:
        """Further weighted losses of the last decoder layer, with its matching ``flat_indices`` (batch, query,
        target index) and normaliser ``num_boxes``; none here (subclasses add some, e.g. the mask losses of
        :class:`~d2_detr.modeling.mask_losses.SetCriterionWithMasks`)."""
        return {}

    def _match(
        self, layers: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> List[List[MatchIndices]]:
        """Matches of every layer, in one call when the matcher supports it."""
        match_layers = getattr(self.matcher, "match_layers", None)
        if match_layers is not None:
            return match_layers(layers, targets)
        return [self.matcher(layer, targets) for layer in layers]

    def _normalizers(self, sizes: Sequence[int], num_queries: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """``(num_boxes, class_weight_sum)`` of the step, per process (averaged over processes; with
        ``loss_ce_norm_across_processes`` False, ``class_weight_sum`` is this process's own), as () tensors.

        ``num_boxes`` counts the target boxes, clamped to >= 1. ``class_weight_sum`` is the sum over all
        queries of the cross-entropy weight of their target class when each image's ``min(Q, n_i)`` matches
        are foreground (weight 1) and the other queries "no object" (``eos_coef``): the denominator of
        ``F.cross_entropy``'s weighted mean for a one-to-one matching such as the Hungarian one.
        Both count ``sizes`` (the targets per image of this batch), or within :meth:`normalize_over` the
        targets of the whole accumulated step.
        """
        counts = sizes if self._step_num_targets is None else self._step_num_targets
        matched = sum(min(num_queries, n) for n in counts)
        unmatched = len(counts) * num_queries - matched
        totals = torch.tensor([float(sum(counts)), matched + self.eos_coef * unmatched], device=device)
        local_class_weight_sum = totals[1].clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals / comm.get_world_size()
        class_weight_sum = totals[1] if self.loss_ce_norm_across_processes else local_class_weight_sum
        return totals[0].clamp(min=1), class_weight_sum.clamp(min=torch.finfo(totals.dtype).tiny)

    @staticmethod
    def _flatten_indices(
        indices: Sequence[MatchIndices], sizes: Sequence[int], device: torch.device
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Turn per-image matches into ``(batch_idx, query_idx, target_idx)``, each int64 (M,) on ``device``.

        ``target_idx`` indexes the concatenation of all images' targets.
        """
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])  # (M,)
        query_idx = torch.cat([src for src, _ in indices])  # (M,)
        target_idx = torch.cat([tgt + offset for (_, tgt), offset in zip(indices, offsets)])  # (M,)
        flat = torch.stack([batch_idx, query_idx, target_idx]).to(device=device, dtype=torch.int64)  # (3, M)
        return flat[0], flat[1], flat[2]

    def _layer_losses(
        self,
        outputs: Mapping[str, Tensor],
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        flat_indices: Tuple[Tensor, Tensor, Tensor],
        num_boxes: Tensor,
        class_weight_sum: Tensor,
    ) -> Dict[str, Tensor]:
        """Weighted ``loss_ce``, ``loss_bbox`` and ``loss_giou`` of one layer, computed in float32."""
        boxes = outputs["pred_boxes"].float()  # (B, Q, 4)
        batch_idx, query_idx, target_idx = flat_indices
        loss_ce = self._class_loss(outputs["pred_logits"].float(), tgt_labels, flat_indices, num_boxes,
                                   class_weight_sum)

        src_boxes = boxes[batch_idx, query_idx]  # (M, 4)
        matched_tgt_boxes = tgt_boxes[target_idx]  # (M, 4)
        # Sums over M = 0 matches are zeros that stay attached to the graph, so backward works on empty batches.
        loss_bbox = F.l1_loss(src_boxes, matched_tgt_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(matched_tgt_boxes)
        )  # (M,)
        loss_giou = (1 - giou).sum() / num_boxes
        return {
            "loss_ce": self.class_weight * loss_ce,
            "loss_bbox": self.l1_weight * loss_bbox,
            "loss_giou": self.giou_weight * loss_giou,
        }

    def _class_loss(self, logits: Tensor, tgt_labels: Tensor, flat_indices: Tuple[Tensor, Tensor, Tensor],
                    num_boxes: Tensor, class_weight_sum: Tensor) -> Tensor:
        """Unweighted () classification loss of one layer from its float32 logits (B, Q, K+1): the class-weighted
        cross-entropy of all queries (unmatched ones labelled "no object"), divided by ``class_weight_sum``."""
        batch_idx, query_idx, target_idx = flat_indices
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q)
        target_classes[batch_idx, query_idx] = tgt_labels[target_idx]
        return F.cross_entropy(
            logits.transpose(1, 2), target_classes, weight=self.empty_weight.to(dtype=logits.dtype), reduction="none"
        ).sum() / class_weight_sum  # (B, Q) class-weighted terms -> their weighted mean over the step

    @torch.no_grad()
    def _metrics(
        self,
        outputs: Mapping[str, Tensor],
        tgt_labels: Tensor,
        flat_indices: Tuple[Tensor, Tensor, Tensor],
        sizes: Sequence[int],
    ) -> Dict[str, Tensor]:
        """``class_error`` and ``cardinality_error`` of one layer, as detached () float tensors.

        As in the original implementation, ``class_error`` is 100 when nothing is matched.
        """
        logits = outputs["pred_logits"].detach().float()  # (B, Q, K+1)
        batch_idx, query_idx, target_idx = flat_indices
        matched_logits = logits[batch_idx, query_idx]  # (M, K+1)
        if matched_logits.shape[0] == 0:
            accuracy = torch.zeros((), device=logits.device)
        else:
            correct = matched_logits.argmax(-1) == tgt_labels[target_idx]  # (M,)
            accuracy = correct.float().mean() * 100
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # (B,)
        card_tgt = torch.tensor(sizes, dtype=torch.float32, device=logits.device)  # (B,)
        return {"class_error": 100 - accuracy, "cardinality_error": F.l1_loss(card_pred, card_tgt)}
