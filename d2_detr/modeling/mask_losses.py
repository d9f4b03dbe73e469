"""DETR's mask losses: sigmoid focal loss and DICE loss on the masks of matched queries.

:class:`SetCriterionWithMasks` adds ``loss_mask`` (focal, alpha 0.25, gamma 2) and ``loss_dice`` to
:class:`~d2_detr.modeling.criterion.SetCriterion`'s losses, for the last decoder layer only and with the SAME
Hungarian matching as its box losses (no second matching). As in the original implementation, the predicted
stride-s logits of the matched queries are bilinearly upsampled to the input resolution (here by exactly s,
so that a feature cell covers its own s x s pixels whatever the batch's padding) and compared with the
full-resolution target masks; each loss is a sum over masks divided by ``num_boxes``.

One departure, so that a loss does not depend on which images share a batch: pixels in the padding of an image
are left out (the focal loss averages over the image's own pixels, the DICE sums skip the padding), where the
original averaged over the whole padded batch. Without padding both are the same. ``mask_loss_ignore_padding=
False`` (``MODEL.DETR.MASK_LOSS_IGNORE_PADDING False``) computes the original's losses instead: predictions
resized to the batch's largest target size, padding included in both losses.
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from torch import Tensor

from .criterion import SetCriterion
from .registry import DETR_CRITERION_REGISTRY

__all__ = ["SetCriterionWithMasks", "dice_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_boxes: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Focal loss (Lin et al. 2017) of M masks: per mask the mean over its (valid) pixels, summed over masks,
    divided by ``num_boxes``.

    Args:
        inputs: (M, P) mask logits.
        targets: (M, P) binary targets (float).
        num_boxes: () normaliser.
        alpha: weight of the positive pixels (1 - alpha for the negatives); < 0 disables the weighting.
        gamma: focusing exponent on (1 - p_t).
        valid: (M, P) bool, the pixels that count; None = all.

    Returns:
        () loss.
    """
    prob = inputs.sigmoid()  # (M, P)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # (M, P)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is None:
        per_mask = loss.mean(1)  # (M,)
    else:
        per_mask = (loss * valid).sum(1) / valid.sum(1).clamp(min=1)  # (M,)
    return per_mask.sum() / num_boxes


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """DICE loss of M masks, ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with p = sigmoid(inputs), summed over masks and
    divided by ``num_boxes``.

    Args:
        inputs: (M, P) mask logits.
        targets: (M, P) binary targets (float).
        num_boxes: () normaliser.
        valid: (M, P) bool, the pixels that count; None = all.

    Returns:
        () loss.
    """
    prob = inputs.sigmoid()  # (M, P)
    if valid is not None:
        prob = prob * valid
        targets = targets * valid
    numerator = 2 * (prob * targets).sum(1)  # (M,)
    denominator = prob.sum(1) + targets.sum(1)  # (M,)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def _padded_target_masks(
    targets: Sequence[Mapping[str, Tensor]], target_idx: Tensor, size: Tuple[int, int]
) -> Tuple[Tensor, Tensor]:
    """The matched targets' masks zero-padded to ``size`` (float (M, H, W)) and where each image's own pixels
    are (bool (M, H, W)); ``target_idx`` indexes the concatenation of all images' targets."""
    height, width = size
    device = target_idx.device
    masks = torch.cat([
        F.pad(t["masks"].to(device=device, dtype=torch.float32),
              (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
        for t in targets
    ])[target_idx]  # (M, H, W)
    image_hw = torch.cat([
        torch.tensor([t["masks"].shape[-2:]], device=device).expand(len(t["masks"]), 2) for t in targets
    ])[target_idx]  # (M, 2)
    rows = torch.arange(height, device=device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(width, device=device)[None, None, :]  # (1, 1, W)
    valid = (rows < image_hw[:, 0, None, None]) & (cols < image_hw[:, 1, None, None])  # (M, H, W)
    return masks, valid


@DETR_CRITERION_REGISTRY.register()
class SetCriterionWithMasks(SetCriterion):
    """:class:`SetCriterion` plus ``loss_mask`` (sigmoid focal) and ``loss_dice`` on the last layer's matches.

    Needs ``outputs["pred_masks"]`` (B, Q, h, w) logits at stride ``outputs["mask_stride"]`` of the padded batch,
    and ``targets[i]["masks"]`` (n_i, H_i, W_i) bool at the size of image i (``Detr`` provides both with
    ``MODEL.MASK_ON``).
    """

    computes_mask_losses = True

    @configurable
    def __init__(
        self,
        *,
        mask_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        mask_loss_ignore_padding: bool = True,
        **kwargs: Any,
    ):
        """
        Args:
            mask_weight: weight of ``loss_mask`` (focal loss).
            dice_weight: weight of ``loss_dice``.
            focal_alpha, focal_gamma: focal loss parameters (0.25 and 2 in DETR).
            mask_loss_ignore_padding: leave each image's padding out of both losses, the predictions upsampled by
                exactly their stride (True); or, as the original, resize the predictions to the batch's largest
                target size and count the padding (False: a loss then depends on the batch's other images).
            kwargs: :class:`SetCriterion`'s arguments.
        """
        super().__init__(**kwargs)
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_loss_ignore_padding = mask_loss_ignore_padding

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        ret = super().from_config(cfg)
        ret.update(mask_weight=cfg.MODEL.DETR.MASK_WEIGHT, dice_weight=cfg.MODEL.DETR.DICE_WEIGHT,
                   mask_loss_ignore_padding=cfg.MODEL.DETR.MASK_LOSS_IGNORE_PADDING)
        return ret

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mask_weight={self.mask_weight}, dice_weight={self.dice_weight}, "
                f"mask_loss_ignore_padding={self.mask_loss_ignore_padding}")

    def _last_layer_losses(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        flat_indices: Tuple[Tensor, Tensor, Tensor],
        num_boxes: Tensor,
    ) -> Dict[str, Tensor]:
        """Weighted ``loss_mask`` and ``loss_dice`` of the matched queries, in float32."""
        if "pred_masks" not in outputs:
            raise KeyError("SetCriterionWithMasks needs the model's pred_masks: set MODEL.MASK_ON True")
        if any("masks" not in t for t in targets):
            raise KeyError("SetCriterionWithMasks needs target masks: the dataset must have masks "
                           "(segmentation annotations or panoptic segments)")
        pred_masks = outputs["pred_masks"]  # (B, Q, h, w)
        stride = int(outputs["mask_stride"])
        batch_idx, query_idx, target_idx = flat_indices
        if batch_idx.numel() == 0:
            zero = pred_masks.sum() * 0.0  # stays attached to the graph, so backward works
            return {"loss_mask": zero, "loss_dice": zero}
        src = pred_masks[batch_idx, query_idx].float()  # (M, h, w)
        if self.mask_loss_ignore_padding:
            src = F.interpolate(src[:, None], scale_factor=stride, mode="bilinear", align_corners=False)[:, 0]
            target_masks, valid = _padded_target_masks(targets, target_idx, src.shape[-2:])  # (M, s*h, s*w) each
        else:  # the original: to the largest target size, padding counted
            size = tuple(max(t["masks"].shape[i] for t in targets) for i in (-2, -1))  # (H, W)
            src = F.interpolate(src[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (M, H, W)
            target_masks, valid = _padded_target_masks(targets, target_idx, size)[0], None
        src, target_masks = src.flatten(1), target_masks.flatten(1)  # (M, P)
        valid = None if valid is None else valid.flatten(1)  # (M, P)
        loss_mask = sigmoid_focal_loss(src, target_masks, num_boxes, self.focal_alpha, self.focal_gamma, valid)
        loss_dice = dice_loss(src, target_masks, num_boxes, valid)
        return {"loss_mask": self.mask_weight * loss_mask, "loss_dice": self.dice_weight * loss_dice}
