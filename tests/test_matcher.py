import itertools

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from scipy.optimize import linear_sum_assignment

import d2_detr.modeling.matcher as matcher_module
from d2_detr.config import add_detr_config
from d2_detr.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from d2_detr.modeling.matcher import HungarianMatcher, solve_assignments
from d2_detr.modeling.registry import build_matcher


def _random_case(g, batch_size, num_queries, num_classes, sizes, dtype=torch.float32):
    outputs = {
        "pred_logits": torch.randn(batch_size, num_queries, num_classes + 1, generator=g).to(dtype),
        "pred_boxes": (torch.rand(batch_size, num_queries, 4, generator=g) * 0.5 + 0.25).to(dtype),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25,
        }
        for n in sizes
    ]
    return outputs, targets


def _reference_cost(matcher, logits, boxes, labels, tgt_boxes):
    """Cost (Q, n) of one image, computed independently of the matcher's batched code."""
    prob = logits.float().softmax(-1)
    cost = -matcher.cost_class * prob[:, labels]
    cost = cost + matcher.cost_bbox * (boxes.float()[:, None, :] - tgt_boxes[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes))
    return cost - matcher.cost_giou * giou


def test_obvious_pairs_are_chosen():
    # Query 2 predicts target 0 exactly, query 0 predicts target 1 exactly; query 1 is junk.
    logits = torch.tensor([[[-5.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, -5.0, 0.0]]])
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.3, 0.1, 0.2]]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    (pred_idx, tgt_idx), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
    assert pred_idx.tolist() == [0, 2]
    assert tgt_idx.tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, n = 5, 3
    outputs, targets = _random_case(g, 1, num_queries, 3, [n])
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    (pred_idx, tgt_idx), = matcher(outputs, targets)
    cost = _reference_cost(
        matcher, outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"]
    )
    assert len(pred_idx) == n and sorted(tgt_idx.tolist()) == list(range(n))
    assert len(set(pred_idx.tolist())) == n
    got = cost[pred_idx, tgt_idx].sum().item()
    perms = itertools.permutations(range(num_queries), n)  # perm[t] = query given to target t
    best = min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in perms)
    assert got == pytest.approx(best, abs=1e-5)


def test_more_targets_than_queries_matches_every_query():
    g = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(g, 1, 2, 3, [4])
    (pred_idx, tgt_idx), = HungarianMatcher()(outputs, targets)
    assert pred_idx.tolist() == [0, 1] and len(set(tgt_idx.tolist())) == 2


def test_batched_equals_per_image_and_handles_empty_image():
    g = torch.Generator().manual_seed(4)
    sizes = [2, 0, 3, 1]
    outputs, targets = _random_case(g, len(sizes), 6, 4, sizes)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == len(sizes)
    for i, (pred_idx, tgt_idx) in enumerate(batched):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [targets[i]])[0]
        assert torch.equal(pred_idx, single[0]) and torch.equal(tgt_idx, single[1])
        assert len(pred_idx) == len(tgt_idx) == sizes[i]
    assert batched[1][0].shape == (0,) and batched[1][0].dtype == torch.int64
    assert batched[1][1].shape == (0,) and batched[1][1].dtype == torch.int64


def test_all_images_empty():
    g = torch.Generator().manual_seed(5)
    outputs, targets = _random_case(g, 3, 4, 2, [0, 0, 0])
    matches = HungarianMatcher()(outputs, targets)
    assert len(matches) == 3
    for pred_idx, tgt_idx in matches:
        assert pred_idx.shape == tgt_idx.shape == (0,)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_each_cost_weight_changes_the_result():
    # Target: class 0, box (0.5, 0.5, 0.2, 0.2).
    # Query 0: confident class 0, far box. Query 1: small centred box (L1 0.36, GIoU 0.01).
    # Query 2: large centred box (L1 0.40, GIoU 0.25). Queries 1 and 2 are unsure about the class.
    logits = torch.tensor([[[6.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]]])
    boxes = torch.tensor([[[0.1, 0.1, 0.05, 0.05], [0.5, 0.5, 0.02, 0.02], [0.5, 0.5, 0.4, 0.4]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]

    def chosen(**weights):
        return HungarianMatcher(**weights)(outputs, targets)[0][0].tolist()

    assert chosen(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0) == [0]
    assert chosen(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0) == [1]
    assert chosen(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0) == [2]
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0)


def _count_host_copies(monkeypatch):
    """Record every ``Tensor.cpu()`` call and every ``Tensor.to`` that moves a non-CPU tensor to the CPU."""
    calls = []
    original_cpu, original_to = torch.Tensor.cpu, torch.Tensor.to

    def cpu(self, *args, **kwargs):
        calls.append("cpu")
        return original_cpu(self, *args, **kwargs)

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" and self.device.type != "cpu":
            calls.append("to")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_one_host_copy_per_call(monkeypatch):
    g = torch.Generator().manual_seed(6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    outputs, targets = _random_case(g, 4, 5, 3, [2, 1, 0, 3])
    outputs = {k: v.to(device) for k, v in outputs.items()}
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    matcher = HungarianMatcher()
    calls = _count_host_copies(monkeypatch)
    matcher(outputs, targets)
    assert len(calls) == 1

    calls.clear()
    layers = [outputs, outputs, outputs]
    matcher.match_layers(layers, targets)
    assert len(calls) == 1


def test_match_layers_equals_separate_calls():
    g = torch.Generator().manual_seed(7)
    sizes = [3, 0, 2]
    layers = [_random_case(g, 3, 5, 3, sizes)[0] for _ in range(3)]
    _, targets = _random_case(g, 3, 5, 3, sizes)
    matcher = HungarianMatcher()
    together = matcher.match_layers(layers, targets)
    assert len(together) == 3
    for layer_outputs, layer_matches in zip(layers, together):
        for (p1, t1), (p2, t2) in zip(layer_matches, matcher(layer_outputs, targets)):
            assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_costs_are_float32_for_half_inputs(monkeypatch):
    g = torch.Generator().manual_seed(8)
    outputs, targets = _random_case(g, 2, 5, 3, [2, 3], dtype=torch.bfloat16)
    seen = []
    original_lsa = matcher_module.linear_sum_assignment

    def recording_lsa(cost):
        seen.append(cost)
        return original_lsa(cost)

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", recording_lsa)
    matcher = HungarianMatcher()
    matcher(outputs, targets)
    assert [c.dtype for c in seen] == [np.float32, np.float32]
    for i, cost in enumerate(seen):
        expected = _reference_cost(
            matcher, outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i]["labels"], targets[i]["boxes"]
        )
        np.testing.assert_allclose(cost, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_built_from_config():
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.COST_CLASS, cfg.MODEL.DETR.COST_BBOX, cfg.MODEL.DETR.COST_GIOU = 3.0, 4.0, 0.5
    matcher = build_matcher(cfg)
    assert isinstance(matcher, HungarianMatcher)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (3.0, 4.0, 0.5)


@pytest.mark.parametrize("ties", [False, True])
def test_solve_assignments_equals_per_image_scipy_calls(ties):
    """Batched solving (every layer and image of one host array) returns exactly what one
    linear_sum_assignment call per (layer, image) block returns: also with empty images, more targets than
    queries, and (integer costs from a tiny range) many equal-cost optima."""
    rng = np.random.default_rng(11)
    sizes = [3, 0, 7, 1, 0, 5]  # 5 queries: the image with 7 targets gets only 5 matches
    num_layers, num_queries = 4, 5
    shape = (num_layers, len(sizes), num_queries, sum(sizes))
    cost = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    matches = solve_assignments(cost, sizes)
    bounds = np.cumsum([0] + sizes)
    assert len(matches) == num_layers
    for layer in range(num_layers):
        assert len(matches[layer]) == len(sizes)
        for image, (pred_idx, tgt_idx) in enumerate(matches[layer]):
            assert pred_idx.dtype == tgt_idx.dtype == torch.int64
            block = cost[layer, image][:, bounds[image] : bounds[image + 1]]  # (Q, n_image)
            expected_pred, expected_tgt = linear_sum_assignment(block)
            assert pred_idx.tolist() == expected_pred.tolist() and tgt_idx.tolist() == expected_tgt.tolist()
            assert len(pred_idx) == min(num_queries, sizes[image])
    if ties:  # the tiny cost range does produce ties: several assignments reach the optimum
        block = cost[0, 0][:, : sizes[0]]
        optimum = block[linear_sum_assignment(block)].sum()
        perms = itertools.permutations(range(num_queries), sizes[0])
        assert sum(block[list(p), range(sizes[0])].sum() == optimum for p in perms) > 1


def test_solve_assignments_without_targets():
    cost = np.zeros((2, 3, 4, 0), dtype=np.float32)
    matches = solve_assignments(cost, [0, 0, 0])
    assert [[tuple(t.shape) for pair in layer for t in pair] for layer in matches] == [[(0,)] * 6] * 2
