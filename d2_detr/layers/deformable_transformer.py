"""The encoder and decoder of Deformable DETR (Zhu et al. 2021): layers built on multi-scale deformable attention.

Layout: batch-first, ``(B, S, d)`` for the flattened feature levels and ``(B, Q, d)`` for the queries. The levels
are flattened row-major and concatenated along S; ``spatial_shapes`` lists their (H_l, W_l) and ``valid_ratios``
(B, L, 2) the (width, height) fraction of each level that an image's unpadded area covers.

Reference points are normalised to the image's unpadded area: (x, y) points or (cx, cy, w, h) boxes in [0, 1].
Before attending they are scaled by each level's valid ratios, which makes them coordinates of the padded map; as
the values of padded cells are zeroed, an image samples the same values alone or in a padded batch.

Parameter names are those of the original code (``self_attn``, ``cross_attn``, ``linear1``, ``norm1``, ...), so
its checkpoints load unchanged.
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .attention import FusedMultiheadAttention, with_pos_embed
from .box_ops import refine_boxes
from .deformable_attention import MultiScaleDeformableAttention
from .linear import Linear
from .tracing import static_size

__all__ = [
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "level_reference_points",
    "scale_to_levels",
]


def level_reference_points(spatial_shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Reference points of the encoder: the centre of every cell of every level, as (x, y) normalised to each
    image's unpadded area of that level, then scaled to every level with :func:`scale_to_levels`.

    Args:
        spatial_shapes: (H_l, W_l) of the L levels.
        valid_ratios: (B, L, 2) (width, height) fraction of each level covered by each image.

    Returns:
        (B, S, L, 2), S = sum of H_l * W_l, cells row-major within each level.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        ys = torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5  # (H,)
        xs = torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5  # (W,)
        ys = ys[None] / (valid_ratios[:, None, level, 1] * height)  # (B, H)
        xs = xs[None] / (valid_ratios[:, None, level, 0] * width)  # (B, W)
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (B, H, W, 2)
        points.append(grid.flatten(1, 2))  # (B, H*W, 2)
    return scale_to_levels(torch.cat(points, 1), valid_ratios)


def scale_to_levels(reference: Tensor, valid_ratios: Tensor) -> Tensor:
    """(B, N, 2) points or (B, N, 4) boxes normalised to the unpadded area -> (B, N, L, 2 or 4) normalised to each
    level's padded map (every coordinate times the valid ratio of its axis)."""
    ratios = valid_ratios if static_size(reference, -1) == 2 else torch.cat([valid_ratios, valid_ratios], -1)  # (B, L, 2|4)
    return reference[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (queries at every cell, q = src + pos, values src), then a ReLU
    feed-forward block; each with a residual, dropout and a LayerNorm after it (post-norm)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_levels: int = 4, num_points: int = 4, onednn_linear: bool = False) -> None:
        """
        Args:
            d_model: feature width d.
            nhead: attention heads (must divide d_model).
            dim_feedforward: hidden width of the feed-forward block.
            dropout: dropout after each sub-layer and inside the feed-forward block.
            num_levels: feature levels L.
            num_points: sampling points per head and level.
            onednn_linear: matrix products through oneDNN on CPU (:func:`d2_detr.layers.linear.linear`).
        """
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, nhead, num_levels, num_points, onednn_linear)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, dim_feedforward, onednn=onednn_linear)
        self.activation = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, onednn=onednn_linear)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: List[Tuple[int, int]],
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            src: (B, S, d) flattened levels.
            pos: (B, S, d) positional (and level) encoding.
            reference_points: (B, S, L, 2), see :func:`level_reference_points`.
            spatial_shapes: (H_l, W_l) of the levels.
            padding_mask: (B, S) bool, True on padded cells.

        Returns:
            (B, S, d).
        """
        attended = self.self_attn(with_pos_embed(src, pos), reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.dropout2(self.activation(self.linear1(src)))
        return self.norm2(src + self.dropout3(self.linear2(hidden)))


class DeformableEncoder(nn.Module):
    """``num_layers`` copies of an encoder layer; the reference points are the cell centres of every level."""

    def __init__(self, encoder_layer: DeformableEncoderLayer, num_layers: int) -> None:
        """
        Args:
            encoder_layer: layer to copy ``num_layers`` times (copies do not share parameters).
            num_layers: number of layers.
        """
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: List[Tuple[int, int]], valid_ratios: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, S, d) -> (B, S, d) encoded levels; ``valid_ratios`` (B, L, 2), other arguments as in
        :meth:`DeformableEncoderLayer.forward`."""
        reference_points = level_reference_points(spatial_shapes, valid_ratios)  # (B, S, L, 2)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Multi-head self-attention over the queries (q = k = tgt + query_pos, v = tgt), deformable cross-attention
    to the encoded levels at the queries' reference points (q = tgt + query_pos), then a ReLU feed-forward block;
    each with a residual, dropout and a LayerNorm after it (post-norm)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_levels: int = 4, num_points: int = 4, onednn_linear: bool = False,
                 attention_kernel: str = "sdpa") -> None:
        """Arguments as in :class:`DeformableEncoderLayer`; ``dropout`` also applies to the attention weights of
        the self-attention, computed by ``attention_kernel`` (:data:`~d2_detr.layers.attention.ATTENTION_KERNELS`)."""
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(d_model, nhead, num_levels, num_points, onednn_linear)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = FusedMultiheadAttention(d_model, nhead, dropout, onednn_linear, attention_kernel)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, dim_feedforward, onednn=onednn_linear)
        self.activation = nn.ReLU()
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, onednn=onednn_linear)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: List[Tuple[int, int]], memory_padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            tgt: (B, Q, d) query features.
            query_pos: (B, Q, d) query positional encoding.
            reference_points: (B, Q, L, 2) points or (B, Q, L, 4) boxes, scaled to each level
                (:func:`scale_to_levels`).
            memory: (B, S, d) encoder output.
            spatial_shapes: (H_l, W_l) of the levels.
            memory_padding_mask: (B, S) bool, True on padded cells.
            self_attn_mask: (Q, Q) bool, True where a query must not see another in the self-attention (DINO's
                denoising groups), or None.

        Returns:
            (B, Q, d) updated query features.
        """
        q = k = with_pos_embed(tgt, query_pos).transpose(0, 1)  # (Q, B, d): FusedMultiheadAttention is sequence-first
        attended = self.self_attn(q, k, tgt.transpose(0, 1), attn_mask=self_attn_mask).transpose(0, 1)  # (B, Q, d)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(with_pos_embed(tgt, query_pos), reference_points, memory, spatial_shapes,
                                   memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        hidden = self.dropout3(self.activation(self.linear1(tgt)))
        return self.norm3(tgt + self.dropout4(self.linear2(hidden)))


class DeformableDecoder(nn.Module):
    """``num_layers`` copies of a decoder layer, with optional iterative reference refinement.

    Without box heads every layer attends at the same reference points (or boxes). With ``box_heads`` (one per
    layer: iterative bounding box refinement), layer l's output refines its reference into a box,
    ``refine_boxes(box_heads[l](output), reference)``, which (detached) becomes the next layer's reference.
    """

    def __init__(self, decoder_layer: DeformableDecoderLayer, num_layers: int) -> None:
        """
        Args:
            decoder_layer: layer to copy ``num_layers`` times (copies do not share parameters).
            num_layers: number of layers.
        """
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: List[Tuple[int, int]],
                valid_ratios: Tensor, query_pos: Tensor, memory_padding_mask: Optional[Tensor] = None,
                box_heads: Optional[Sequence[nn.Module]] = None) -> Tuple[Tensor, List[Tensor]]:
        """
        Args:
            tgt: (B, Q, d) initial query features.
            reference: (B, Q, 2) points or (B, Q, 4) boxes, normalised to the unpadded area.
            memory: (B, S, d) encoder output.
            spatial_shapes: (H_l, W_l) of the levels.
            valid_ratios: (B, L, 2) (width, height) fraction of each level covered by each image.
            query_pos: (B, Q, d) query positional encoding.
            memory_padding_mask: (B, S) bool, True on padded cells.
            box_heads: None, or one module per layer mapping (B, Q, d) to (B, Q, 4) box deltas (refinement).

        Returns:
            hs: (num_layers, B, Q, d) every layer's output.
            references: the reference each layer attended at, (B, Q, 2) or (B, Q, 4), one per layer.
        """
        outputs: List[Tensor] = []
        references: List[Tensor] = []
        for layer_id, layer in enumerate(self.layers):
            references.append(reference)
            tgt = layer(tgt, query_pos, scale_to_levels(reference, valid_ratios), memory, spatial_shapes,
                        memory_padding_mask)
            outputs.append(tgt)
            if box_heads is not None:
                reference = refine_boxes(box_heads[layer_id](tgt), reference).detach()
        return torch.stack(outputs), references
