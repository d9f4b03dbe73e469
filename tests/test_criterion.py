import math

import pytest
import torch
import torch.distributed
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.utils import comm
from torch import nn

from d2_detr.config import add_detr_config
from d2_detr.modeling.criterion import SetCriterion
from d2_detr.modeling.matcher import HungarianMatcher
from d2_detr.modeling.registry import build_criterion

NUM_CLASSES = 2


class FixedMatcher(nn.Module):
    """Returns the same matches for every layer (and has no ``match_layers``)."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return [(torch.tensor(p, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for p, t in self.indices]


# Two images, three queries, two foreground classes (index 2 = "no object").
LOGITS = [
    [[2.0, 0.5, -1.0], [0.1, 0.2, 1.5], [-0.3, 1.0, 0.4]],
    [[0.0, 0.0, 3.0], [1.2, -0.7, 0.3], [0.6, 0.9, 0.1]],
]
BOXES = [
    [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.8, 0.2, 0.1, 0.3]],
    [[0.6, 0.6, 0.3, 0.3], [0.4, 0.4, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1]],
]
# Image 0: one target matched to query 0; image 1: one target matched to query 2.
TARGETS = [([1], [[0.55, 0.5, 0.2, 0.2]]), ([0], [[0.75, 0.75, 0.1, 0.1]])]
MATCHES = [([0], [0]), ([2], [0])]


def _outputs(logits=LOGITS, boxes=BOXES):
    return {
        "pred_logits": torch.tensor(logits, requires_grad=True),
        "pred_boxes": torch.tensor(boxes, requires_grad=True),
    }


def _targets(targets=TARGETS):
    return [
        {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes).reshape(-1, 4)}
        for labels, boxes in targets
    ]


def _hand_ce(eos_coef):
    """Weighted mean cross-entropy: sum_q w[y_q] * -log p_q(y_q) / sum_q w[y_q]."""
    labels = [[1, 2, 2], [2, 2, 0]]
    num, den = 0.0, 0.0
    for image_logits, image_labels in zip(LOGITS, labels):
        for logits, y in zip(image_logits, image_labels):
            log_p = logits[y] - math.log(sum(math.exp(v) for v in logits))
            w = eos_coef if y == NUM_CLASSES else 1.0
            num += -w * log_p
            den += w
    return num / den


def _criterion(**kwargs):
    kwargs.setdefault("matcher", FixedMatcher(MATCHES))
    return SetCriterion(num_classes=NUM_CLASSES, **kwargs)


def test_losses_match_hand_computed_values():
    criterion = _criterion(eos_coef=0.1, class_weight=1.5, l1_weight=5.0, giou_weight=2.0, deep_supervision=False)
    losses, _ = criterion(_outputs(), _targets())
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    num_boxes = 2
    # Pair 0: (0.5,0.5,0.2,0.2) vs (0.55,0.5,0.2,0.2): L1 0.05; xyxy [.4,.4,.6,.6] vs [.45,.4,.65,.6]:
    #   inter 0.03, union 0.05, enclosing 0.05 -> GIoU 0.6.
    # Pair 1: (0.25,0.25,0.1,0.1) vs (0.75,0.75,0.1,0.1): L1 1.0; [.2,.2,.3,.3] vs [.7,.7,.8,.8]:
    #   inter 0, union 0.02, enclosing 0.36 -> GIoU -0.34/0.36.
    l1_sum = 0.05 + 1.0
    giou_loss_sum = (1 - 0.6) + (1 + 0.34 / 0.36)
    assert losses["loss_ce"].item() == pytest.approx(1.5 * _hand_ce(0.1), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * l1_sum / num_boxes, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2.0 * giou_loss_sum / num_boxes, rel=1e-5)


def test_eos_coef_changes_loss_ce():
    losses_01, _ = _criterion(eos_coef=0.1)(_outputs(), _targets())
    losses_1, _ = _criterion(eos_coef=1.0)(_outputs(), _targets())
    assert losses_01["loss_ce"].item() != pytest.approx(losses_1["loss_ce"].item(), rel=1e-3)
    plain = F.cross_entropy(torch.tensor(LOGITS).transpose(1, 2), torch.tensor([[1, 2, 2], [2, 2, 0]]))
    assert losses_1["loss_ce"].item() == pytest.approx(plain.item(), rel=1e-5)
    assert losses_1["loss_ce"].item() == pytest.approx(_hand_ce(1.0), rel=1e-5)


def test_metrics_hand_computed_and_not_in_losses():
    losses, metrics = _criterion()(_outputs(), _targets())
    assert set(metrics) == {"class_error", "cardinality_error"}
    assert not set(metrics) & set(losses)
    assert all(not v.requires_grad for v in metrics.values())
    # Matched queries: image 0 query 0 predicts class 0 (target 1, wrong); image 1 query 2 predicts 1 (target 0,
    # wrong) -> class_error 100.
    assert metrics["class_error"].item() == pytest.approx(100.0)
    # Non-"no object" argmax: image 0 queries 0, 2 -> 2 (1 target); image 1 queries 1, 2 -> 2 (1 target).
    assert metrics["cardinality_error"].item() == pytest.approx(1.0)

    logits = [row[:] for row in LOGITS]
    logits[0] = [[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]  # query 0 now right, one detection
    _, metrics = _criterion()(_outputs(logits=logits), _targets())
    assert metrics["class_error"].item() == pytest.approx(50.0)
    assert metrics["cardinality_error"].item() == pytest.approx(0.5)


def test_deep_supervision_keys_and_values():
    outputs = _outputs()
    aux = [_outputs(logits=[[[v * (k + 2) for v in row] for row in image] for image in LOGITS]) for k in range(2)]
    outputs["aux_outputs"] = aux
    criterion = _criterion(deep_supervision=True)
    losses, metrics = criterion(outputs, _targets())
    expected = {f"{name}{suffix}" for name in ("loss_ce", "loss_bbox", "loss_giou") for suffix in ("", "_0", "_1")}
    assert set(losses) == expected
    for k, layer in enumerate(aux):
        layer_losses, _ = criterion(layer, _targets())
        for name in ("loss_ce", "loss_bbox", "loss_giou"):
            torch.testing.assert_close(losses[f"{name}_{k}"], layer_losses[name])
    assert losses["loss_ce_1"].item() != pytest.approx(losses["loss_ce"].item(), rel=1e-3)
    _, main_metrics = criterion(_outputs(), _targets())
    torch.testing.assert_close(metrics["class_error"], main_metrics["class_error"])

    losses, _ = _criterion(deep_supervision=False)(outputs, _targets())
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_real_matcher_all_layers_and_matches_fixed():
    outputs = _outputs()
    outputs["aux_outputs"] = [_outputs()]
    matcher = HungarianMatcher()
    real, _ = _criterion(matcher=matcher)(outputs, _targets())
    assert set(real) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    # The matching found for the last layer, replayed by a matcher without match_layers, gives the same losses.
    indices = [(p.tolist(), t.tolist()) for p, t in matcher(outputs, _targets())]
    assert indices != MATCHES  # so this test does not duplicate the fixed-matching ones
    fixed, _ = _criterion(matcher=FixedMatcher(indices))(outputs, _targets())
    for name, value in fixed.items():
        torch.testing.assert_close(real[name], value)


def test_gradients_flow_to_logits_and_matched_boxes():
    outputs = _outputs()
    losses, _ = _criterion()(outputs, _targets())
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    box_grad = outputs["pred_boxes"].grad
    assert box_grad[0, 0].abs().sum() > 0 and box_grad[1, 2].abs().sum() > 0
    assert box_grad[0, 1].abs().sum() == 0  # unmatched query


def test_empty_targets_everywhere():
    outputs = _outputs()
    outputs["aux_outputs"] = [_outputs()]
    targets = _targets([([], []), ([], [])])
    losses, metrics = _criterion(matcher=HungarianMatcher())(outputs, targets)
    for name in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert losses[name].item() == 0.0
        assert losses[name].requires_grad
    # Every query is "no object", so all weights are equal and the weighted mean is the plain mean.
    plain = F.cross_entropy(torch.tensor(LOGITS).transpose(1, 2), torch.full((2, 3), NUM_CLASSES))
    assert losses["loss_ce"].item() == pytest.approx(plain.item(), rel=1e-5)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_boxes"].grad is not None and (outputs["pred_boxes"].grad == 0).all()
    assert torch.isfinite(metrics["class_error"]) and torch.isfinite(metrics["cardinality_error"])


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    # Simulate 2 processes: this one has 2 target boxes, the other 4 -> num_boxes = 6 / 2 = 3.
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: tensor.add_(4.0))
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    losses, _ = _criterion(l1_weight=1.0)(_outputs(), _targets())
    assert losses["loss_bbox"].item() == pytest.approx(1.05 / 3, rel=1e-5)


def test_bfloat16_inputs_give_float32_losses():
    outputs = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in _outputs().items()}
    losses, metrics = _criterion()(outputs, _targets())
    assert all(v.dtype == torch.float32 for v in losses.values())
    reference, _ = _criterion()({k: v.detach().float() for k, v in outputs.items()}, _targets())
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value)
    sum(losses.values()).backward()
    assert outputs["pred_boxes"].grad.dtype == torch.bfloat16


def test_built_from_config():
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.NUM_CLASSES = 5
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.25
    cfg.MODEL.DETR.DEEP_SUPERVISION = False
    criterion = build_criterion(cfg)
    assert isinstance(criterion, SetCriterion) and isinstance(criterion.matcher, HungarianMatcher)
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0] * 5 + [0.25]))
    assert criterion.deep_supervision is False
    assert (criterion.class_weight, criterion.l1_weight, criterion.giou_weight) == (1.0, 5.0, 2.0)


def test_class_weights_are_not_checkpointed():
    """empty_weight follows MODEL.DETR.NO_OBJECT_WEIGHT; a checkpoint must not override the config's value."""
    assert "empty_weight" not in _criterion(eos_coef=0.3).state_dict()


def _criterion_from(source: str, across_processes: bool, matches) -> SetCriterion:
    """A criterion with eos_coef 0.1 and the given matches, built from plain arguments or from the config."""
    if source == "arguments":
        return _criterion(eos_coef=0.1, matcher=FixedMatcher(matches),
                          loss_ce_norm_across_processes=across_processes)
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.DETR.LOSS_CE_NORM_ACROSS_PROCESSES = across_processes
    criterion = build_criterion(cfg)
    criterion.matcher = FixedMatcher(matches)
    return criterion


def _adds(other):
    """A stand-in for ``dist.all_reduce`` that adds the other process's values."""

    def all_reduce(tensor, *args, **kwargs):
        return tensor.add_(torch.tensor(other))

    return all_reduce


@pytest.mark.parametrize("source", ["arguments", "config"])
def test_loss_ce_normalisation_across_processes_or_per_process(monkeypatch, source):
    """Two simulated processes, one image each: image 0 with one target (class weights 1 + 0.1 + 0.1 = 1.2),
    image 1 with none (0.3). Across processes (default) both divide by the average 0.75, so the processes'
    mean loss (what DistributedDataParallel's averaged gradient follows) is the one-process loss of both
    images; per process (the original), each divides by its own weights: F.cross_entropy of its image."""
    logits = torch.tensor(LOGITS)
    labels = torch.tensor([[1, 2, 2], [2, 2, 2]])  # image 1 has no target: every query is "no object"
    weight = torch.tensor([1.0, 1.0, 0.1])
    one_process = F.cross_entropy(logits.transpose(1, 2), labels, weight=weight)
    processes = [  # (image, matches, targets, the other process's (target count, class weight sum))
        (0, [([0], [0])], [([1], [[0.55, 0.5, 0.2, 0.2]])], [0.0, 0.3]),
        (1, [([], [])], [([], [])], [1.0, 1.2]),
    ]
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for across in (True, False):
        per_process = []
        for image, matches, targets, other in processes:
            monkeypatch.setattr(torch.distributed, "all_reduce", _adds(other))
            criterion = _criterion_from(source, across, matches)
            assert criterion.loss_ce_norm_across_processes is across
            losses, _ = criterion(_outputs(logits=[LOGITS[image]], boxes=[BOXES[image]]), _targets(targets))
            per_process.append(losses["loss_ce"])
            own = F.cross_entropy(logits[image].T[None], labels[image][None], weight=weight)
            if not across:
                torch.testing.assert_close(losses["loss_ce"], own)  # the original's weighted mean, locally
                if image == 0:  # accumulating image 1 as this process's second micro-batch: its weights count
                    with criterion.normalize_over([1, 0]):
                        accumulated, _ = criterion(_outputs(logits=[LOGITS[0]], boxes=[BOXES[0]]), _targets(targets))
                    torch.testing.assert_close(accumulated["loss_ce"], own * 1.2 / 1.5)
        mean = (per_process[0] + per_process[1]) / 2
        if across:
            torch.testing.assert_close(mean, one_process)
        else:
            assert abs(mean.item() - one_process.item()) > 0.1
