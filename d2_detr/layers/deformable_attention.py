"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), in plain PyTorch.

Each query attends, in each head, to ``num_points`` locations on each of ``num_levels`` feature maps: the
locations are the query's reference point plus learned offsets, the values there are read by bilinear
interpolation (zero outside the map, ``align_corners=False`` pixel centres) and summed with learned weights
that are softmaxed over all levels and points of the head.

The sampling is standard PyTorch operators (``grid_sample``, and on CPU a weighted ``embedding_bag``), so the
layer runs on any device and dtype PyTorch supports, and traces, scripts and exports to ONNX (``GridSample``,
opset 16 and newer).
"""
import functools
import logging
import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers.wrappers import shapes_to_tensor
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .linear import Linear

logger = logging.getLogger(__name__)

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention", "sample_by_bags", "sample_by_grid"]

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampling runs in: float32 for 16-bit inputs (a normalised coordinate in 16 bits is off by
    up to a pixel on a 100-pixel-wide map, and some kernels lack 16-bit CPU versions), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 or dtype == torch.bfloat16 else dtype


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The attention-weighted sum of bilinearly sampled values (no projections).

    Args:
        value: (B, S, H, Dh), the levels' values concatenated along S, each level flattened row-major;
            S = sum of H_l * W_l.
        spatial_shapes: (H_l, W_l) of each level, in the order of ``value``. Take them from the feature maps'
            ``.shape`` so that a traced graph follows the input size.
        sampling_locations: (B, Q, H, L, P, 2), (x, y) in [0, 1] relative to each level's map (0 and 1 are its
            outer edges); locations outside read zeros.
        attention_weights: (B, Q, H, L, P), the weight of each sample (softmaxed over L * P by the module).

    Returns:
        (B, Q, H * Dh) in ``value``'s dtype, heads major. 16-bit inputs are sampled in float32.

    On CPU in eager mode the sum is computed by :func:`sample_by_bags`, elsewhere (other devices, tracing,
    scripting, export, ``torch.compile``) by :func:`sample_by_grid`; both give the same result up to float
    rounding.
    """
    if not torch.jit.is_scripting() and _bags_apply(value):
        return sample_by_bags(value, spatial_shapes, sampling_locations, attention_weights)
    return sample_by_grid(value, spatial_shapes, sampling_locations, attention_weights)


@torch.jit.unused
def _bags_apply(value: Tensor) -> bool:
    """Whether :func:`sample_by_bags` is used: on CPU in eager mode; not while tracing or exporting (ONNX needs
    ``GridSample``) nor under ``torch.compile`` (the bag path, a custom autograd function with sparse operators,
    is made and measured for eager mode; ``grid_sample`` compiles)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return value.device.type == "cpu" and _bags_path_works()


@functools.lru_cache(maxsize=None)
def _bags_path_works() -> bool:
    """Capability check, once per process: :func:`sample_by_bags` (which relies on ``embedding_bag`` with
    per-sample weights and ``torch.sparse.sampled_addmm`` over an unsorted CSR pattern) gives the values and
    gradients of :func:`sample_by_grid` on a small random case with this torch build. Otherwise every call takes
    the ``grid_sample`` path, with a warning."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    inputs = [torch.randn(1, 16, 2, 4, generator=generator, dtype=torch.float64),
              torch.rand(1, 5, 2, 2, 2, 2, generator=generator, dtype=torch.float64) * 1.2 - 0.1,
              torch.rand(1, 5, 2, 2, 2, generator=generator, dtype=torch.float64)]
    results = []
    try:  # called from any context (inference mode, no_grad, autocast): check in plain float64 autograd
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            for sample in (sample_by_grid, sample_by_bags):
                leaves = [x.clone().requires_grad_() for x in inputs]
                out = sample(leaves[0], shapes, leaves[1], leaves[2])
                grads = torch.autograd.grad(out.square().sum(), leaves)
                results.append([out, *grads])
        works = all(torch.allclose(a, b, atol=1e-8) for a, b in zip(*results))
    except RuntimeError as e:  # an operator missing or changed in this torch build
        logger.warning(f"Deformable attention: the embedding-bag sampling fails on this torch build ({e}); "
                       "using grid_sample on CPU too")
        return False
    if not works:
        logger.warning("Deformable attention: the embedding-bag sampling disagrees with grid_sample on this torch "
                       "build; using grid_sample on CPU too")
    return works


def sample_by_grid(
    value: Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`multi_scale_deformable_attention` by one :func:`torch.nn.functional.grid_sample` per level (any
    device; traces and exports to ONNX ``GridSample``). Arguments and result as there."""
    batch, _, heads, head_dim = value.shape
    num_queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = _compute_dtype(value.dtype)
    # (B, Q, H, L, P, 2) -> (B*H, Q, L, P, 2), grid_sample's [-1, 1] coordinates.
    grids = (2 * sampling_locations.to(dtype) - 1).transpose(1, 2).flatten(0, 1)
    samples: List[Tensor] = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        level_value = value[:, start:start + h * w].to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        samples.append(F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*H, Dh, Q, P)
        start = start + h * w
    sampled = torch.cat(samples, dim=-1)  # (B*H, Dh, Q, L*P)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (sampled * weights).sum(-1)  # (B*H, Dh, Q)
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2).to(value.dtype)


@torch.jit.unused
def sample_by_bags(
    value: Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`multi_scale_deformable_attention` as one weighted sum of table rows per (query, head) (a weighted
    ``embedding_bag``): the rows are the 4 * L * P value cells around the head's sampling points, weighted by
    attention weight times bilinear weight. The table is a copy of ``value`` with every level framed by zeros
    (one row/column before, two after), so that points outside a map, clamped onto the frame, read zeros
    without any masking; no (samples x Dh) tensor is materialised, forward or backward. Arguments and result
    as in :func:`multi_scale_deformable_attention`.
    """
    batch, _, heads, head_dim = value.shape
    num_queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = _compute_dtype(value.dtype)
    device = value.device
    table, starts = _framed_levels(value.to(dtype), spatial_shapes)  # (B, T, H, Dh), (L,)
    num_rows = table.shape[0] * table.shape[1] * heads
    bags = batch * num_queries * heads
    index = torch.int32 if max(num_rows, bags * levels * points * 4) < 2**31 - 1 else torch.int64
    hw = torch.tensor(spatial_shapes, dtype=index, device=device).view(levels, 2)
    size = hw.flip(-1).view(levels, 1, 2)  # (L, 1, (W, H)), broadcasts against (B, Q, H, L, P, 2)
    # Pixel coordinates in the framed map (pixel centres at integers, align_corners=False, +1 for the frame),
    # clamped onto the frame: from there on the sample reads zeros, as outside the map.
    pixel = sampling_locations.to(dtype) * size + 0.5
    pixel = torch.minimum(pixel.clamp(min=0), size + 1)
    lower = pixel.detach().floor()
    frac = pixel - lower  # (B, Q, H, L, P, 2)
    corner = lower.nan_to_num(0.0).to(index)  # top-left neighbour (non-finite coordinates read the frame)
    # Rows of the (B*T*H, Dh) table: ((b * T + start_l + y * (W_l + 3) + x) * H + h), and the other three
    # corners at +H (right), +(W_l + 3)*H (below) and both.
    row_stride = (size[..., 0] + 3) * heads  # (L, 1)
    first = (torch.arange(batch, dtype=index, device=device) * (table.shape[1] * heads)).view(batch, 1, 1, 1, 1)
    first = first + torch.arange(heads, dtype=index, device=device).view(1, 1, heads, 1, 1)  # (B, 1, H, 1, 1)
    rows = corner[..., 1] * row_stride + corner[..., 0] * heads + (starts.to(index).view(levels, 1) * heads + first)
    steps = torch.stack([torch.zeros_like(row_stride), torch.full_like(row_stride, heads), row_stride,
                         row_stride + heads], -1)  # (L, 1, 4)
    rows = rows[..., None] + steps  # (B, Q, H, L, P, 4)
    out = _BilinearBagSum.apply(table.view(num_rows, head_dim), rows.view(bags, levels * points, 4),
                                attention_weights.to(dtype).reshape(bags, levels * points),
                                frac.view(bags, levels * points, 2))
    return out.view(batch, num_queries, heads * head_dim).to(value.dtype)


def _framed_levels(value: Tensor, spatial_shapes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
    """value (B, S, H, Dh) -> the levels each framed by zeros, one row/column before and two after,
    concatenated: (B, T, H, Dh) with T = sum (H_l + 3) * (W_l + 3), and the start of each level in T (L,)."""
    batch, _, heads, head_dim = value.shape
    framed: List[Tensor] = []
    starts: List[int] = []
    start, framed_start = 0, 0
    for h, w in spatial_shapes:
        level = value[:, start:start + h * w].reshape(batch, h, w, heads * head_dim)
        framed.append(F.pad(level, (0, 0, 1, 2, 1, 2)).view(batch, -1, heads, head_dim))
        starts.append(framed_start)
        start += h * w
        framed_start += (h + 3) * (w + 3)
    return torch.cat(framed, 1), torch.tensor(starts, device=value.device)


def _corner_weights(attention: Tensor, frac: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """attention (M, K), frac (M, K, 2) (x, y) -> corner weights (M, K, 2 (y), 2 (x)) = attention times the
    bilinear weights, and the per-axis weights (1 - f, f) along x and along y, (M, K, 2) each."""
    wx = torch.stack([1 - frac[..., 0], frac[..., 0]], -1)
    wy = torch.stack([1 - frac[..., 1], frac[..., 1]], -1)
    return (attention[..., None] * wy)[..., :, None] * wx[..., None, :], wx, wy


class _BilinearBagSum(torch.autograd.Function):
    """out[i] = sum over points k and corners c of attention[i, k] * bilinear_c(frac[i, k]) * table[rows[i, k, c]].

    table (N, D); rows (M, K, 4) corner rows (top-left, top-right, bottom-left, bottom-right); attention (M, K);
    frac (M, K, 2), the position (x, y) inside the cell, in [0, 1) -> (M, D). Forward is one weighted
    ``F.embedding_bag``. Backward: the corner weights' gradient, grad[i] . table[row], is a sampled product of
    (M, D) by (D, N) at the rows' pattern (``torch.sparse.sampled_addmm``), turned into the attention's and
    frac's gradients in closed form; the table's gradient is the transposed weighted sum, another
    ``F.embedding_bag`` over ``grad`` with one bag per table row (the samples sorted by row). Both run as a few
    large parallel operations; PyTorch's own ``embedding_bag`` backward takes several times longer on CPU.
    """

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, attention: Tensor, frac: Tensor) -> Tensor:
        ctx.save_for_backward(table, rows, attention, frac)
        weights = _corner_weights(attention, frac)[0]
        num_bags = rows.shape[0]
        return F.embedding_bag(rows.view(num_bags, -1), table, per_sample_weights=weights.view(num_bags, -1),
                               mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        table, rows, attention, frac = ctx.saved_tensors
        grad = grad.contiguous()
        num_bags, points, _ = rows.shape
        rows = rows.view(num_bags, points * 4)
        weights, wx, wy = _corner_weights(attention, frac)
        grad_table = grad_attention = grad_frac = None
        with torch.autocast(table.device.type, enabled=False):
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                with warnings.catch_warnings():  # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    pattern = torch.sparse_csr_tensor(
                        torch.arange(0, rows.numel() + 1, points * 4, dtype=rows.dtype, device=rows.device),
                        rows.reshape(-1), torch.zeros(rows.numel(), dtype=table.dtype, device=table.device),
                        (num_bags, table.shape[0]), check_invariants=False)
                grad_weights = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values()
                grad_weights = grad_weights.view(num_bags, points, 2, 2)  # (M, K, y, x)
                along_x = (grad_weights * wx[..., None, :]).sum(-1)  # (M, K, 2 (y))
                grad_attention = (along_x * wy).sum(-1)
                grad_fx = ((grad_weights[..., 1] - grad_weights[..., 0]) * wy).sum(-1)
                grad_frac = torch.stack([grad_fx, along_x[..., 1] - along_x[..., 0]], -1) * attention[..., None]
            if ctx.needs_input_grad[0]:
                # The transposed sum: each table row is a bag of the (bag, weight) pairs that read it.
                flat = rows.reshape(-1)
                order = torch.sort(flat, stable=True).indices
                counts = torch.bincount(flat, minlength=table.shape[0])
                grad_table = F.embedding_bag(torch.div(order, points * 4, rounding_mode="floor"), grad,
                                             offsets=counts.cumsum(0) - counts,
                                             per_sample_weights=weights.reshape(-1).index_select(0, order), mode="sum")
        return grad_table, None, grad_attention, grad_frac


def _last_dim(t: Tensor) -> int:
    """``t.shape[-1]`` as a Python int. While tracing, sizes are tensors and a comparison of them would warn that
    the trace fixes its outcome; here that is intended (the reference format is part of the model's code)."""
    if not torch.jit.is_tracing():
        return t.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(t.shape[-1])


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections, as the ``MSDeformAttn`` module of the original
    code (same parameter names, shapes and initialisation, so its checkpoints load).

    Parameters: ``sampling_offsets`` (query -> H*L*P*2 offsets), ``attention_weights`` (query -> H*L*P logits),
    ``value_proj`` and ``output_proj`` (embed_dim -> embed_dim).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 onednn_linear: bool = False):
        """
        Args:
            embed_dim: channels of queries, values and output; divisible by ``num_heads``.
            num_heads: attention heads.
            num_levels: feature levels sampled (the length of ``spatial_shapes`` in ``forward``).
            num_points: sampling points per head and level.
            onednn_linear: compute the four projections through oneDNN on CPU (see :mod:`.linear`).
        """
        super().__init__()
        for name, n in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"MultiScaleDeformableAttention: {name} must be a positive integer, got {n!r}.")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                f"({num_heads}); choose a head count that divides it (e.g. embed_dim 256 with 8 heads)."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = Linear(embed_dim, num_heads * num_levels * num_points * 2, onednn=onednn_linear)
        self.attention_weights = Linear(embed_dim, num_heads * num_levels * num_points, onednn=onednn_linear)
        self.value_proj = Linear(embed_dim, embed_dim, onednn=onednn_linear)
        self.output_proj = Linear(embed_dim, embed_dim, onednn=onednn_linear)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: zero offset weights and a bias that puts head h's points on the ray at
        angle 2*pi*h/H (largest coordinate 1), point p at distance p+1, alike on every level; uniform attention
        (zero weights and bias); Xavier-uniform projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # (H, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2) * scale  # (H, 1, P, 2)
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: List[Tuple[int, int]],
        value_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, embed_dim).
            reference_points: (B, Q, L, 2) normalised (x, y) in [0, 1] per level (offsets are in that level's
                pixels), or (B, Q, L, 4) boxes (cx, cy, w, h) (offsets are in units of half the box size
                divided by ``num_points``).
            value: (B, S, embed_dim), the levels flattened row-major and concatenated, S = sum H_l * W_l.
            spatial_shapes: (H_l, W_l) of the L levels in the order of ``value``, read from the feature maps'
                ``.shape`` (so that tracing follows the input size).
            value_padding_mask: (B, S) bool, True where the value is padding (its projection is zeroed).

        Returns:
            (B, Q, embed_dim).
        """
        if not (torch.jit.is_tracing() or torch.jit.is_scripting()):
            self._check_inputs(query, reference_points, value, spatial_shapes, value_padding_mask)
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        projected = self.value_proj(value)
        if value_padding_mask is not None:
            projected = projected.masked_fill(value_padding_mask[..., None], 0.0)
        projected = projected.view(batch, value.shape[1], heads, self.head_dim)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = F.softmax(weights, -1).view(batch, num_queries, heads, levels, points)
        if _last_dim(reference_points) == 2:
            sizes: List[int] = []
            for h, w in spatial_shapes:
                sizes.append(w)
                sizes.append(h)
            normaliser = shapes_to_tensor(sizes, offsets.device).to(offsets.dtype).view(levels, 1, 2)  # (L, 1, (W, H))
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        out = multi_scale_deformable_attention(projected, spatial_shapes, locations, weights)
        return self.output_proj(out)

    @torch.jit.unused
    def _check_inputs(self, query: Tensor, reference_points: Tensor, value: Tensor,
                      spatial_shapes: List[Tuple[int, int]], value_padding_mask: Optional[Tensor]) -> None:
        """Clear errors for inputs that do not fit (eager mode only: tracing would record the comparisons)."""
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "MultiScaleDeformableAttention: reference_points must have shape (B, Q, L, 2) (x, y) or "
                f"(B, Q, L, 4) (cx, cy, w, h), got {tuple(reference_points.shape)}."
            )
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(
                f"MultiScaleDeformableAttention: built for {self.num_levels} levels but got {len(spatial_shapes)} "
                f"spatial shapes {list(spatial_shapes)}; pass one (H, W) per feature level."
            )
        total = sum(int(h) * int(w) for h, w in spatial_shapes)
        if value.dim() != 3 or value.shape[1] != total or value.shape[2] != self.embed_dim:
            raise ValueError(
                f"MultiScaleDeformableAttention: value has shape {tuple(value.shape)}, expected (B, {total}, "
                f"{self.embed_dim}) for spatial shapes {list(spatial_shapes)} (levels flattened and concatenated)."
            )
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MultiScaleDeformableAttention: query has shape {tuple(query.shape)}, expected "
                f"(B, Q, {self.embed_dim})."
            )
        if tuple(reference_points.shape[:3]) != (query.shape[0], query.shape[1], self.num_levels):
            raise ValueError(
                f"MultiScaleDeformableAttention: reference_points has shape {tuple(reference_points.shape)}, "
                f"expected ({query.shape[0]}, {query.shape[1]}, {self.num_levels}, 2 or 4)."
            )
        if value_padding_mask is not None and tuple(value_padding_mask.shape) != tuple(value.shape[:2]):
            raise ValueError(
                f"MultiScaleDeformableAttention: value_padding_mask has shape {tuple(value_padding_mask.shape)}, "
                f"expected {tuple(value.shape[:2])} (B, S) like value."
            )
