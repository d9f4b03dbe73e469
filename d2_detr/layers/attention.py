"""Multi-head attention through ``F.scaled_dot_product_attention``, parameter-compatible with ``nn.MultiheadAttention``.

Shared by the transformers of the DETR family (DETR's encoder and decoder, the deformable decoder's
self-attention). Inputs are sequence-first, ``(L, B, d)``, as ``nn.MultiheadAttention``'s default.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear, linear

__all__ = ["ATTENTION_KERNELS", "FusedMultiheadAttention", "matmul_attention", "with_pos_embed"]

#: How :class:`FusedMultiheadAttention` computes attention: "sdpa" (``F.scaled_dot_product_attention``) or
#: "matmul" (:func:`matmul_attention`).
ATTENTION_KERNELS = ("sdpa", "matmul")


def with_pos_embed(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    """``x + pos``, or ``x`` when there is no positional encoding."""
    return x if pos is None else x + pos


def matmul_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` (same arguments, boolean ``attn_mask`` True where allowed) as explicit
    matrix products, with the softmax in float32.

    query (..., L, E), key (..., S, E), value (..., S, Ev), attn_mask broadcastable to (..., L, S) -> (..., L, Ev).
    For short sequences and narrow heads under CPU autocast, where the fused kernel is slow (measured in
    benchmarks/README.md); every query must be allowed at least one key.
    """
    scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5  # (..., L, S)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = F.dropout(scores.float().softmax(-1), dropout_p).to(value.dtype)
    return weights @ value


class FusedMultiheadAttention(nn.Module):
    """Multi-head attention computed by ``F.scaled_dot_product_attention`` (or, with ``kernel="matmul"``, by
    :func:`matmul_attention`); returns no attention weights.

    Parameters, their names, shapes and initialisation (and so the random-number consumption) are those of
    ``nn.MultiheadAttention(embed_dim, num_heads, dropout)``: ``in_proj_weight`` (3d, d) and ``in_proj_bias``
    (3d,) stack the query, key and value projections, ``out_proj`` is the output projection. State dicts of
    either module load into the other, so the original DETR checkpoint's attention keys load unchanged.
    Inputs are sequence-first, as ``nn.MultiheadAttention``'s default.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, onednn_linear: bool = False,
                 kernel: str = "sdpa") -> None:
        """
        Args:
            embed_dim: feature width d of queries, keys and values.
            num_heads: attention heads (must divide ``embed_dim``).
            dropout: dropout probability on the attention weights, in training mode only.
            onednn_linear: projections through oneDNN on CPU (:func:`d2_detr.layers.linear.linear`).
            kernel: one of :data:`ATTENTION_KERNELS`; both give the same outputs up to float rounding.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"Attention kernel {kernel!r} is not one of {ATTENTION_KERNELS} "
                             "(MODEL.DETR.ATTENTION_KERNEL)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.onednn_linear = onednn_linear
        self.kernel = kernel
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim, onednn=onednn_linear)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kernel={self.kernel}")

    def _split_heads(self, x: Tensor) -> Tensor:
        """(N, B, d) -> (B, num_heads, N, head_dim), a view."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).permute(1, 2, 0, 3)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (L, B, d). When ``query is key`` (self-attention with q = k), both are projected by one
                matrix product.
            key: (S, B, d).
            value: (S, B, d).
            key_padding_mask: (B, S) bool, True on keys to ignore; every query must keep at least one key.
            attn_mask: (L, S) bool, True where a query must not see a key (same for every image and head).

        Returns:
            (L, B, d) attention output.
        """
        d, w, b, onednn = self.embed_dim, self.in_proj_weight, self.in_proj_bias, self.onednn_linear
        if query is key:
            q, k = linear(query, w[: 2 * d], b[: 2 * d], onednn).chunk(2, dim=-1)  # (L, B, d) each
        else:
            q = linear(query, w[:d], b[:d], onednn)  # (L, B, d)
            k = linear(key, w[d : 2 * d], b[d : 2 * d], onednn)  # (S, B, d)
        v = linear(value, w[2 * d :], b[2 * d :], onednn)  # (S, B, d)
        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if attn_mask is not None:
            allowed = ~attn_mask if allowed is None else allowed & ~attn_mask  # (L, S) or (B, 1, L, S)
        attend = matmul_attention if self.kernel == "matmul" else F.scaled_dot_product_attention
        out = attend(
            self._split_heads(q),
            self._split_heads(k),
            self._split_heads(v),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, num_heads, L, head_dim)
        return self.out_proj(out.permute(2, 0, 1, 3).flatten(2))  # (L, B, d)
