"""The focal matcher and criterion variants (d2_detr.modeling.focal) on hand-computed examples."""
import math

import pytest
import torch

from d2_detr.modeling.criterion import SetCriterion
from d2_detr.modeling.focal import FocalHungarianMatcher, FocalSetCriterion, focal_class_cost
from d2_detr.modeling.registry import build_criterion, build_matcher

from .conftest import REPO_DIR, load_config


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _focal_term(logit, positive, alpha=0.25, gamma=2.0):
    """Focal loss of one (query, class) pair by hand."""
    p = _sigmoid(logit)
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_focal_class_cost_hand_computed():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    expected = [_focal_term(x, True) - _focal_term(x, False) for x in (0.0, 2.0, -1.0)]
    torch.testing.assert_close(focal_class_cost(logits), torch.tensor([expected]), rtol=0, atol=1e-6)
    assert focal_class_cost(torch.tensor([0.0])).item() == pytest.approx(-0.5 * 0.25 * math.log(2), abs=1e-6)


def test_matcher_prefers_the_confident_class_when_boxes_tie():
    """Two queries with the same box, one confident in class 1 and one in class 0: each target goes to the
    query confident in its class (the focal cost decides; the softmax cost of HungarianMatcher is not used)."""
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # (1, 2, K=2): query 0 says class 0, query 1 class 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    ((pred, tgt),) = FocalHungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert dict(zip(pred.tolist(), tgt.tolist())) == {0: 1, 1: 0}


def test_matcher_cost_is_weighted_sum():
    matcher = FocalHungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    logits = torch.tensor([[0.3, -0.7]])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    tgt_boxes = torch.tensor([[0.6, 0.5, 0.4, 0.2]])
    cost = matcher._cost(logits, boxes, torch.tensor([1]), tgt_boxes)
    l1 = 0.1 + 0.0 + 0.0 + 0.2
    # xyxy: (0.3, 0.3, 0.7, 0.7) and (0.4, 0.4, 0.8, 0.6): intersection 0.3 x 0.2, union 0.16 + 0.08 - 0.06,
    # enclosing 0.5 x 0.4
    iou = 0.06 / 0.18
    giou = iou - (0.2 - 0.18) / 0.2
    class_cost = _focal_term(-0.7, True) - _focal_term(-0.7, False)
    assert cost.item() == pytest.approx(2 * class_cost + 5 * l1 - 2 * giou, abs=1e-5)


def _outputs():
    logits = torch.tensor([[[1.0, -2.0, 0.5], [-1.0, 0.0, -3.0]]])  # (B=1, Q=2, K=3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    return {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}


class _FixedMatcher(torch.nn.Module):
    """Query 0 <-> target 0 in every image."""

    def forward(self, outputs, targets):
        return [(torch.tensor([0]), torch.tensor([0])) for _ in targets]


def test_focal_loss_hand_computed():
    """loss_ce = class_weight * (focal terms of every (query, class) pair) / num_boxes, i.e. the original's
    mean over queries, summed, divided by num_boxes, times the number of queries."""
    criterion = FocalSetCriterion(num_classes=3, matcher=_FixedMatcher(), class_weight=2.0)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses, _ = criterion(_outputs(), targets)
    logits = _outputs()["pred_logits"][0].tolist()
    total = sum(_focal_term(logits[q][k], (q, k) == (0, 2)) for q in range(2) for k in range(3))
    assert losses["loss_ce"].item() == pytest.approx(2.0 * total / 1, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_equals_original_formula_and_normalises_over_micro_batches():
    """Two images at once, or each alone within normalize_over([n_0, n_1]): the losses sum to the same values, and
    equal the original formula sigmoid_focal_loss(...).mean(1).sum() / num_boxes * Q."""
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 5, 4, generator=g), torch.rand(2, 5, 2, generator=g) * 0.3 + 0.3
    boxes = torch.cat([boxes, torch.full_like(boxes, 0.2)], -1)
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.6, 0.5, 0.1, 0.1]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    criterion = FocalSetCriterion(num_classes=4, matcher=FocalHungarianMatcher(), class_weight=1.0)
    whole, _ = criterion(outputs, targets)

    indices = criterion.matcher(outputs, targets)
    onehot = torch.zeros_like(logits)
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, targets[b]["labels"][tgt]] = 1
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    torch.testing.assert_close(whole["loss_ce"], focal.mean(1).sum() / 3 * 5)

    parts = []
    with criterion.normalize_over([2, 1]):
        for b in range(2):
            part = {"pred_logits": logits[b : b + 1], "pred_boxes": boxes[b : b + 1], "aux_outputs": []}
            parts.append(criterion(part, targets[b : b + 1])[0])
    for name in whole:
        torch.testing.assert_close(parts[0][name] + parts[1][name], whole[name])


def test_encoder_outputs_get_class_agnostic_losses():
    """Two-stage: enc_outputs are matched and supervised as if every target had label 0."""
    criterion = FocalSetCriterion(num_classes=3, matcher=_FixedMatcher(), class_weight=1.0)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    enc = _outputs()
    outputs = {**_outputs(), "enc_outputs": {"pred_logits": enc["pred_logits"], "pred_boxes": enc["pred_boxes"]}}
    losses, _ = criterion(outputs, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    logits = enc["pred_logits"][0].tolist()
    total = sum(_focal_term(logits[q][k], (q, k) == (0, 0)) for q in range(2) for k in range(3))
    assert losses["loss_ce_enc"].item() == pytest.approx(total, rel=1e-5)
    assert losses["loss_ce"].item() != pytest.approx(losses["loss_ce_enc"].item())  # label 2 there


def test_softmax_criterion_supports_encoder_outputs_too():
    criterion = SetCriterion(num_classes=2, matcher=_FixedMatcher())
    logits = torch.randn(1, 3, 3)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4) * 0.2 + 0.4, "aux_outputs": [],
               "enc_outputs": {"pred_logits": torch.randn(1, 7, 3), "pred_boxes": torch.rand(1, 7, 4) * 0.2 + 0.4}}
    losses, _ = criterion(outputs, [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    assert torch.isfinite(losses["loss_ce_enc"])


def test_softmax_head_is_refused():
    criterion = FocalSetCriterion(num_classes=3, matcher=_FixedMatcher())
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_boxes": torch.full((1, 2, 4), 0.5), "aux_outputs": []}
    with pytest.raises(ValueError, match="expects 3 class logits"):
        criterion(outputs, [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])


def test_built_from_config():
    cfg = load_config(f"{REPO_DIR}/configs/deformable_detr_r50.yaml", "MODEL.DETR.FOCAL_ALPHA", 0.3)
    matcher, criterion = build_matcher(cfg), build_criterion(cfg)
    assert isinstance(matcher, FocalHungarianMatcher) and isinstance(criterion, FocalSetCriterion)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou, matcher.alpha) == (2.0, 5.0, 2.0, 0.3)
    assert (criterion.class_weight, criterion.l1_weight, criterion.giou_weight) == (2.0, 5.0, 2.0)
    assert criterion.num_classes == 80 and criterion.alpha == 0.3 and criterion.gamma == 2.0
