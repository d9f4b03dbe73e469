"""DinoCriterion: the denoising losses on a hand-computed example, class-aware encoder losses, normalisation."""
import math

import torch

from d2_detr.modeling.dino_criterion import DinoCriterion
from d2_detr.modeling.focal import FocalHungarianMatcher, FocalSetCriterion


def _focal(logit: float, positive: bool, alpha=0.25, gamma=2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if positive:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def _criterion(**kwargs):
    return DinoCriterion(num_classes=2, matcher=FocalHungarianMatcher(), class_weight=1.0, l1_weight=5.0,
                         giou_weight=2.0, **kwargs)


def _outputs(dn_logits, dn_boxes):
    logits = torch.zeros(1, 3, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3])
    return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [],
            "dn_outputs": {"pred_logits": dn_logits, "pred_boxes": dn_boxes, "aux_outputs": []}, "dn_groups": (2, 2)}


def test_denoising_losses_by_hand():
    # One target box (class 1); 2 groups of 2 queries: positives at 0 and 2, negatives at 1 and 3.
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    dn_logits = torch.tensor([[[-1.0, 2.0], [0.5, 1.0], [0.0, -2.0], [1.5, -0.5]]])
    dn_boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4],  # exact: L1 0, GIoU 1
                              [0.1, 0.1, 0.1, 0.1],  # negative: no box loss
                              [0.5, 0.5, 0.2, 0.2],  # same centre, half size: L1 0.4, IoU = GIoU = 0.25
                              [0.9, 0.9, 0.1, 0.1]]])
    losses, _ = _criterion()(_outputs(dn_logits, dn_boxes), [target])
    normaliser = 1 * 2  # boxes x groups
    positives = {(0, 1), (2, 1)}
    focal = sum(_focal(dn_logits[0, q, k].item(), (q, k) in positives) for q in range(4) for k in range(2))
    torch.testing.assert_close(losses["loss_ce_dn"], torch.tensor(focal / normaliser))
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(5.0 * 0.4 / normaliser))
    torch.testing.assert_close(losses["loss_giou_dn"], torch.tensor(2.0 * (0.0 + 0.75) / normaliser))


def test_denoising_losses_of_every_layer_and_step_normalisation():
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])}
    dn = {"pred_logits": torch.randn(1, 4, 2), "pred_boxes": torch.rand(1, 4, 4) * 0.5 + 0.1}
    outputs = _outputs(dn["pred_logits"], dn["pred_boxes"])
    outputs["dn_outputs"]["aux_outputs"] = [dict(dn)]
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
    criterion = _criterion()
    losses, _ = criterion(outputs, [target])
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"{name}_dn_0"], losses[f"{name}_dn"])
    # Within an accumulated step of 4 boxes in all, this micro-batch's single box counts for a quarter.
    with criterion.normalize_over([1, 3]):
        step_losses, _ = criterion(outputs, [target])
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        torch.testing.assert_close(step_losses[name], losses[name] / 4)


def test_encoder_losses_use_the_target_classes():
    torch.manual_seed(0)
    target = {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}
    enc = {"pred_logits": torch.randn(1, 5, 2), "pred_boxes": torch.rand(1, 5, 4) * 0.5 + 0.2}
    outputs = {"pred_logits": torch.zeros(1, 5, 2), "pred_boxes": torch.full((1, 5, 4), 0.5), "aux_outputs": [],
               "enc_outputs": enc}
    losses, _ = _criterion()(outputs, [target])
    as_decoder, _ = FocalSetCriterion(num_classes=2, matcher=FocalHungarianMatcher(), class_weight=1.0)(
        {**enc, "aux_outputs": []}, [target])
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"{name}_enc"], as_decoder[name])
    agnostic, _ = FocalSetCriterion(num_classes=2, matcher=FocalHungarianMatcher(), class_weight=1.0)(outputs, [target])
    assert not torch.allclose(agnostic["loss_ce_enc"], losses["loss_ce_enc"])


def test_no_denoising_outputs_no_denoising_losses():
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    outputs = _outputs(torch.zeros(1, 4, 2), torch.full((1, 4, 4), 0.5))
    del outputs["dn_outputs"], outputs["dn_groups"]
    losses, _ = _criterion()(outputs, [target])
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
