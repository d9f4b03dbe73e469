"""DINO's set criterion: the focal set criterion plus the losses of the denoising queries.

The matching queries get :class:`~d2_detr.modeling.focal.FocalSetCriterion`'s losses at every decoder layer, and the
encoder's selected cells (``outputs["enc_outputs"]``) the same losses against the targets with their classes
(suffix ``_enc``, DINO's "interm" loss). The denoising queries (``outputs["dn_outputs"]``) are not matched: group
g's positive query j reconstructs ground-truth box j (its class, L1 and GIoU losses), negatives and padding
learn "no object" (the class loss only). Their losses (suffix ``_dn``, ``_dn_i`` for the earlier layers) have the
same weights and are normalised by the step's number of boxes (over processes and accumulated micro-batches, as
the others) times the number of groups.
"""
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from .denoising import denoising_match_indices
from .focal import FocalSetCriterion
from .registry import DETR_CRITERION_REGISTRY

__all__ = ["DinoCriterion"]


@DETR_CRITERION_REGISTRY.register()
class DinoCriterion(FocalSetCriterion):
    """:class:`~d2_detr.modeling.focal.FocalSetCriterion` with class-aware encoder losses and the denoising losses
    (module docstring). Weights 1 (class), 5 (L1), 2 (GIoU) in DINO, matching costs 2/5/2."""

    class_agnostic_encoder = False

    def _losses_and_metrics(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        losses, metrics = super()._losses_and_metrics(outputs, targets)
        if "dn_outputs" in outputs:
            losses.update(self._denoising_losses(outputs["dn_outputs"], outputs["dn_groups"], targets))
        return losses, metrics

    def _denoising_losses(self, dn_outputs: Mapping[str, Any], dn_groups: Tuple[int, int],
                          targets: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
        """Weighted losses of the denoising queries of every supervised layer: ``dn_outputs`` "pred_logits"
        (B, N, K), "pred_boxes" (B, N, 4) and "aux_outputs" (earlier layers), ``dn_groups`` (groups, group size)."""
        num_groups, group_size = dn_groups
        device = dn_outputs["pred_logits"].device
        sizes = [len(t["labels"]) for t in targets]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)  # (T, 4)
        num_boxes, _ = self._normalizers(sizes, dn_outputs["pred_logits"].shape[1], device)
        flat_indices = self._flatten_indices(denoising_match_indices(sizes, num_groups, group_size), sizes, device)
        layers: List[Mapping[str, Tensor]] = [dn_outputs]
        if self.deep_supervision:
            layers += list(dn_outputs.get("aux_outputs", ()))
        losses: Dict[str, Tensor] = {}
        for layer_id, layer_outputs in enumerate(layers):
            suffix = "_dn" if layer_id == 0 else f"_dn_{layer_id - 1}"
            layer_losses = self._layer_losses(layer_outputs, tgt_labels, tgt_boxes, flat_indices,
                                              num_boxes * num_groups, num_boxes)
            losses.update({k + suffix: v for k, v in layer_losses.items()})
        return losses
