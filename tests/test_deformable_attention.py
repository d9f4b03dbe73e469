"""Tests of multi-scale deformable attention against a naive loop that samples every point by hand."""
import io
import math
import warnings
from typing import List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from d2_detr.layers.deformable_attention import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    sample_by_bags,
    sample_by_grid,
)

# Levels of different sizes, including a single row and a single column.
SHAPES = [(3, 4), (1, 5), (2, 1)]
# The two implementations (the layer uses the first on CPU in eager mode, the second elsewhere).
IMPLEMENTATIONS = pytest.mark.parametrize("sample", [sample_by_bags, sample_by_grid], ids=["bags", "grid"])


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _bilinear(level: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One point of one level by hand: level (h, w, D); x, y pixel coordinates (pixel centres at integers);
    the four neighbours weighted by (1 - |dx|)(1 - |dy|), those outside the map read as zero."""
    h, w, _ = level.shape
    x0, y0 = math.floor(x.item()), math.floor(y.item())
    out = level.new_zeros(level.shape[-1])
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= xi < w and 0 <= yi < h:
                out = out + (1 - (x - xi).abs()) * (1 - (y - yi).abs()) * level[yi, xi]
    return out


def _naive(value, shapes, locations, weights):
    """value (B, S, H, D), locations (B, Q, H, L, P, 2), weights (B, Q, H, L, P) -> (B, Q, H*D), one point at a
    time; locations (x, y) in [0, 1] map to pixel coordinates x * W - 0.5 (align_corners=False)."""
    batch, _, heads, dim = value.shape
    queries, points = locations.shape[1], locations.shape[4]
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = value.new_zeros(batch, queries, heads, dim)
    rows = []
    for b in range(batch):
        for q in range(queries):
            per_head = []
            for m in range(heads):
                acc = value.new_zeros(dim)
                for lvl, (h, w) in enumerate(shapes):
                    level = value[b, starts[lvl]:starts[lvl + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        acc = acc + weights[b, q, m, lvl, p] * _bilinear(level, x, y)
                per_head.append(acc)
            rows.append(torch.cat(per_head))
    out = torch.stack(rows).view(batch, queries, heads * dim)
    return out


def _inputs(shapes=SHAPES, batch=2, queries=3, heads=2, points=2, dim=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g, dtype=dtype)
    # Some locations fall outside [0, 1], where the map reads zeros (and partly, within half a pixel).
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype)
    return value, locations, weights


@IMPLEMENTATIONS
def test_function_matches_naive_loop(sample):
    value, locations, weights = _inputs()
    out = sample(value, SHAPES, locations, weights)
    assert out.shape == (2, 3, 2 * 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, _naive(value, SHAPES, locations, weights), rtol=1e-10, atol=1e-10)


@IMPLEMENTATIONS
def test_function_borders_and_outside(sample):
    """Points on pixel centres, half a pixel inside/outside the edge and beyond it, on a 1 x 4 level."""
    shapes = [(1, 4)]
    value = torch.arange(1.0, 5.0, dtype=torch.float64).view(1, 4, 1, 1)
    xs = torch.tensor([0.125, 0.0, -0.125, 1.0, 1.125, -3.0, 0.5], dtype=torch.float64)  # x * 4 - 0.5 in pixels
    locations = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, len(xs), 1, 1, 1, 2)
    weights = torch.ones(1, len(xs), 1, 1, 1, dtype=torch.float64)
    out = sample(value, shapes, locations, weights).flatten()
    # pixel 0 -> 1; -0.5 -> half of pixel 0; -1 -> 0; 3.5 -> half of pixel 3; 4 and beyond -> 0; 1.5 -> 2.5
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(out, _naive(value, shapes, locations, weights).flatten())


@IMPLEMENTATIONS
def test_function_gradcheck(sample):
    value, locations, weights = _inputs(shapes=[(2, 3), (1, 2)], batch=1, queries=2, heads=2, points=2, dim=2)
    for t in (value, locations, weights):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, s, a: sample(v, [(2, 3), (1, 2)], s, a),
        (value, locations, weights), eps=1e-6, atol=1e-6,
    )


@IMPLEMENTATIONS
def test_function_gradients_match_naive_loop(sample):
    value, locations, weights = _inputs(batch=1, queries=2)
    grads = []
    for fn in (sample, _naive):
        inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(inputs[0], SHAPES, inputs[1], inputs[2])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([t.grad for t in inputs])
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-10)


@IMPLEMENTATIONS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_function_low_precision_inputs(sample, dtype):
    value, locations, weights = _inputs(dtype=torch.float32)
    expected = sample(value, SHAPES, locations, weights)
    low = [t.to(dtype).requires_grad_(True) for t in (value, locations, weights)]
    out = sample(low[0], SHAPES, low[1], low[2])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in low)


def test_function_uses_bags_on_cpu_and_agrees_with_grid():
    value, locations, weights = _inputs(dtype=torch.float32, queries=50)
    out = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    assert torch.equal(out, sample_by_bags(value, SHAPES, locations, weights))
    torch.testing.assert_close(out, sample_by_grid(value, SHAPES, locations, weights), rtol=1e-5, atol=1e-6)


def test_bags_out_of_range_and_non_finite_locations():
    """Far-away, infinite and NaN locations never index outside ``value``; far-away ones read zero."""
    value, locations, weights = _inputs(dtype=torch.float32)
    locations[0, 0, 0, 0, 0] = torch.tensor([1e12, -1e12])
    locations[0, 1, 0, 0, 0] = torch.tensor([float("inf"), float("-inf")])
    locations[1, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    out = sample_by_bags(value, SHAPES, locations, weights)
    expected = sample_by_grid(value, SHAPES, locations, weights)
    torch.testing.assert_close(out[0, 0], expected[0, 0])
    assert torch.isfinite(out[1, 1:]).all()


def _random_module(embed_dim=8, heads=2, levels=3, points=2, seed=0) -> MultiScaleDeformableAttention:
    """A module with all parameters random (the initialisation's zero weights would hide offset mistakes)."""
    torch.manual_seed(seed)
    module = MultiScaleDeformableAttention(embed_dim, heads, levels, points)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module.double()


def _module_inputs(reference_dim, batch=2, queries=3, embed_dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, queries, embed_dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, total, embed_dim, generator=g, dtype=torch.float64)
    reference = torch.rand(batch, queries, len(SHAPES), reference_dim, generator=g, dtype=torch.float64)
    return query, reference, value


def _module_by_hand(module, query, reference, value, mask=None):
    """The module's computation written out, sampling location by location with the naive loop."""
    heads, levels, points = module.num_heads, module.num_levels, module.num_points
    batch, queries, _ = query.shape
    projected = value @ module.value_proj.weight.T + module.value_proj.bias
    if mask is not None:
        projected = projected * (~mask[..., None])
    offsets = (query @ module.sampling_offsets.weight.T + module.sampling_offsets.bias)
    offsets = offsets.view(batch, queries, heads, levels, points, 2)
    logits = (query @ module.attention_weights.weight.T + module.attention_weights.bias)
    weights = logits.view(batch, queries, heads, levels * points).softmax(-1).view(offsets.shape[:-1])
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(SHAPES):
        for p in range(points):
            ref = reference[:, :, None, lvl]  # (B, Q, 1, 2 or 4)
            off = offsets[:, :, :, lvl, p]  # (B, Q, H, 2)
            if reference.shape[-1] == 2:
                locations[:, :, :, lvl, p, 0] = ref[..., 0] + off[..., 0] / w
                locations[:, :, :, lvl, p, 1] = ref[..., 1] + off[..., 1] / h
            else:
                locations[:, :, :, lvl, p, 0] = ref[..., 0] + off[..., 0] / points * ref[..., 2] * 0.5
                locations[:, :, :, lvl, p, 1] = ref[..., 1] + off[..., 1] / points * ref[..., 3] * 0.5
    sampled = _naive(projected.view(batch, -1, heads, module.head_dim), SHAPES, locations, weights)
    return sampled @ module.output_proj.weight.T + module.output_proj.bias


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_matches_computation_by_hand(reference_dim):
    module = _random_module()
    query, reference, value = _module_inputs(reference_dim)
    out = module(query, reference, value, SHAPES)
    assert out.shape == query.shape
    torch.testing.assert_close(out, _module_by_hand(module, query, reference, value), rtol=1e-10, atol=1e-10)


def test_module_padding_mask_zeroes_padded_values():
    module = _random_module()
    query, reference, value = _module_inputs(2)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 2:5] = True  # part of the first level's first image
    mask[1, -3:] = True  # the second image's last level and the end of the one before
    out = module(query, reference, value, SHAPES, value_padding_mask=mask)
    torch.testing.assert_close(out, _module_by_hand(module, query, reference, value, mask), rtol=1e-10,
                               atol=1e-10)
    assert not torch.allclose(out, module(query, reference, value, SHAPES))
    changed = value.masked_fill(mask[..., None], 1e3)  # what lies under the padding does not matter
    torch.testing.assert_close(module(query, reference, changed, SHAPES, value_padding_mask=mask), out)


def test_module_initialisation():
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=8, num_levels=3, num_points=2)
    assert module.sampling_offsets.weight.abs().sum() == 0
    bias = module.sampling_offsets.bias.view(8, 3, 2, 2)
    # Head h points along angle 2*pi*h/8, scaled so that the larger coordinate is 1: (1, 0), (1, 1), (0, 1), ...
    unit = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    for lvl in range(3):
        for p in range(2):
            torch.testing.assert_close(bias[:, lvl, p], unit * (p + 1), atol=1e-5, rtol=0)
    assert module.attention_weights.weight.abs().sum() == 0 and module.attention_weights.bias.abs().sum() == 0
    for proj in (module.value_proj, module.output_proj):
        assert proj.bias.abs().sum() == 0
        bound = math.sqrt(6 / (16 + 16))
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4
    # Uniform attention over levels and points at initialisation.
    weights = module.attention_weights(torch.randn(1, 2, 16)).view(1, 2, 8, 6).softmax(-1)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))


def test_module_initialisation_other_head_counts():
    module = MultiScaleDeformableAttention(embed_dim=6, num_heads=3, num_levels=1, num_points=1)
    bias = module.sampling_offsets.bias.view(3, 2)
    for h in range(3):
        direction = torch.tensor([math.cos(2 * math.pi * h / 3), math.sin(2 * math.pi * h / 3)])
        torch.testing.assert_close(bias[h], direction / direction.abs().max())


def test_module_parameters_named_as_original():
    module = MultiScaleDeformableAttention()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="embed_dim .*divisible by num_heads"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=8)
    with pytest.raises(ValueError, match="num_points must be a positive integer"):
        MultiScaleDeformableAttention(num_points=0)
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2).double()
    query, reference, value = _module_inputs(2)
    with pytest.raises(ValueError, match="built for 3 levels but got 2"):
        module(query, reference, value, SHAPES[:2])
    with pytest.raises(ValueError, match="value has shape"):
        module(query, reference, value[:, 1:], SHAPES)
    with pytest.raises(ValueError, match="must have shape .*got \\(2, 3, 3, 3\\)"):
        module(query, reference[..., :1].expand(-1, -1, -1, 3), value, SHAPES)
    with pytest.raises(ValueError, match="value_padding_mask has shape"):
        module(query, reference, value, SHAPES, value_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_under_cpu_autocast_and_in_low_precision(dtype):
    module = _random_module().float()
    query, reference, value = (t.float() for t in _module_inputs(4))
    expected = module(query, reference, value, SHAPES)
    with torch.autocast("cpu", dtype=dtype):
        out = module(query.requires_grad_(True), reference, value, SHAPES)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)
    out.float().sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(module.sampling_offsets.weight.grad).all()
    low = module.to(dtype)
    out = low(query.detach().to(dtype), reference.to(dtype), value.to(dtype), SHAPES)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


class _Encoder(nn.Module):
    """Feature maps in, deformable self-attention over all their cells out, with the spatial shapes read from
    the maps as a model would (so that a trace follows the input size)."""

    def __init__(self):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2)

    def forward(self, f0: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        features = [f0, f1, f2]
        shapes: List[Tuple[int, int]] = [(f.shape[2], f.shape[3]) for f in features]
        value = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)  # (B, S, C)
        reference = torch.sigmoid(value[..., :2])[:, :, None].expand(-1, -1, 3, -1)
        return self.attn(value, reference, value, shapes)


def _features(sizes, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 8, h, w, generator=g) for h, w in sizes)


SIZE_A = [(6, 5), (3, 3), (1, 2)]
SIZE_B = [(4, 7), (2, 4), (1, 1)]


def test_trace_follows_the_input_size():
    torch.manual_seed(0)
    model = _Encoder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing the trace would get wrong
        traced = torch.jit.trace(model, _features(SIZE_A))
    for sizes, batch in ((SIZE_A, 2), (SIZE_B, 1)):
        inputs = _features(sizes, batch=batch, seed=1)
        torch.testing.assert_close(traced(*inputs), model(*inputs))


def test_function_scripts():
    scripted = torch.jit.script(multi_scale_deformable_attention)
    for shapes in (SHAPES, [(2, 2), (1, 3)]):
        value, locations, weights = _inputs(shapes=shapes)
        torch.testing.assert_close(scripted(value, shapes, locations, weights),
                                   multi_scale_deformable_attention(value, shapes, locations, weights))


def test_onnx_export_follows_the_input_size():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Encoder().eval()
    names = ["f0", "f1", "f2"]
    buffer = io.BytesIO()
    torch.onnx.export(model, _features(SIZE_A), buffer, dynamo=False, opset_version=17, input_names=names,
                      output_names=["out"],
                      dynamic_axes={**{n: {0: "batch", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(names)},
                                    "out": {0: "batch", 1: "tokens"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for sizes, batch in ((SIZE_A, 2), (SIZE_B, 1)):
        inputs = _features(sizes, batch=batch, seed=2)
        (out,) = session.run(None, {n: f.numpy() for n, f in zip(names, inputs)})
        expected = model(*inputs).detach().numpy()
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_cpu_bag_path_is_capability_checked(monkeypatch):
    """The embedding-bag path is used on CPU only when it reproduces grid_sample on this torch build, from any
    context (inference mode included); a build where it disagrees falls back to grid_sample."""
    from d2_detr.layers import deformable_attention as module

    module._bags_path_works.cache_clear()
    with torch.inference_mode():
        assert module._bags_path_works()
    module._bags_path_works.cache_clear()
    monkeypatch.setattr(module, "sample_by_bags", lambda value, *args: module.sample_by_grid(value * 1.01, *args))
    try:
        assert not module._bags_path_works()
        assert not module._bags_apply(torch.zeros(1, 4, 1, 2))
    finally:
        module._bags_path_works.cache_clear()
