"""SetCriterionWithMasks (d2_detr.modeling.mask_losses): padding left out of the mask losses, or counted as in the
original implementation (MODEL.DETR.MASK_LOSS_IGNORE_PADDING)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from d2_detr.config import add_detr_config
from d2_detr.modeling.mask_losses import SetCriterionWithMasks, dice_loss, sigmoid_focal_loss
from d2_detr.modeling.registry import build_criterion

STRIDE = 4
SIZES = [(8, 8), (12, 6)]  # image 0 is padded by 4 rows, image 1 by 2 columns: the batch is 12 x 8


class FixedMatcher(torch.nn.Module):
    """Image 0: query 1 -> its target 0; image 1: query 0 -> its target 0."""

    def forward(self, outputs, targets):
        return [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]


def _batch():
    g = torch.Generator().manual_seed(0)
    pred_masks = torch.randn(2, 3, 12 // STRIDE, 8 // STRIDE, generator=g) * 3  # (B, Q, h, w) of the padded batch
    targets = []
    for h, w in SIZES:
        masks = torch.rand(1, h, w, generator=g) > 0.5  # (1, H_i, W_i)
        targets.append({"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "masks": masks})
    outputs = {"pred_logits": torch.zeros(2, 3, 3), "pred_boxes": torch.full((2, 3, 4), 0.5),
               "pred_masks": pred_masks, "mask_stride": STRIDE, "aux_outputs": []}
    return outputs, targets


def _expected(outputs, targets, ignore_padding: bool):
    """Reference losses of the two matched masks (num_boxes = 2)."""
    src = outputs["pred_masks"][[0, 1], [1, 0]]  # (2, h, w): the matched queries
    num_boxes = torch.tensor(2.0)
    if ignore_padding:  # upsampled by the stride, each mask cropped to its own image
        up = F.interpolate(src[:, None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[:, 0]
        focal = sum(sigmoid_focal_loss(up[i, :h, :w].reshape(1, -1), t["masks"].reshape(1, -1).float(), num_boxes)
                    for i, ((h, w), t) in enumerate(zip(SIZES, targets)))
        dice = sum(dice_loss(up[i, :h, :w].reshape(1, -1), t["masks"].reshape(1, -1).float(), num_boxes)
                   for i, ((h, w), t) in enumerate(zip(SIZES, targets)))
        return focal, dice
    # the original: resized to the largest target size (12 x 8), targets zero-padded, every pixel counted
    up = F.interpolate(src[:, None], size=(12, 8), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    padded = torch.stack([F.pad(t["masks"][0].float(), (0, 8 - t["masks"].shape[-1], 0, 12 - t["masks"].shape[-2]))
                          for t in targets]).flatten(1)
    return sigmoid_focal_loss(up, padded, num_boxes), dice_loss(up, padded, num_boxes)


def _criterion(source: str, ignore_padding: bool) -> SetCriterionWithMasks:
    if source == "arguments":
        return SetCriterionWithMasks(num_classes=2, matcher=FixedMatcher(), mask_loss_ignore_padding=ignore_padding)
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.NUM_CLASSES = 2
    cfg.MODEL.DETR.CRITERION_NAME = "SetCriterionWithMasks"
    cfg.MODEL.DETR.MASK_LOSS_IGNORE_PADDING = ignore_padding
    criterion = build_criterion(cfg)
    criterion.matcher = FixedMatcher()
    return criterion


@pytest.mark.parametrize("source", ["arguments", "config"])
@pytest.mark.parametrize("ignore_padding", [True, False])
def test_mask_losses_with_and_without_padding(source, ignore_padding):
    criterion = _criterion(source, ignore_padding)
    assert isinstance(criterion, SetCriterionWithMasks) and criterion.mask_loss_ignore_padding is ignore_padding
    outputs, targets = _batch()
    losses, _ = criterion(outputs, targets)
    focal, dice = _expected(outputs, targets, ignore_padding)
    torch.testing.assert_close(losses["loss_mask"], focal)
    torch.testing.assert_close(losses["loss_dice"], dice)
    other_focal, _ = _expected(outputs, targets, not ignore_padding)
    assert abs(losses["loss_mask"].item() - other_focal.item()) > 1e-3  # the two settings really differ here


def test_default_leaves_padding_out():
    cfg = get_cfg()
    add_detr_config(cfg)
    assert cfg.MODEL.DETR.MASK_LOSS_IGNORE_PADDING
    assert SetCriterionWithMasks(num_classes=2, matcher=FixedMatcher()).mask_loss_ignore_padding
