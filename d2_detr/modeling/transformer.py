"""DETR's encoder-decoder transformer (Carion et al. 2020), parameter-compatible with the original checkpoint.

Layout: internally sequence-first, ``(S, B, d)``, as in the original implementation and the default of
``torch.nn.MultiheadAttention``. :class:`DetrTransformer` takes and returns batch-first image-shaped tensors.

Positional encodings are added to queries and keys (never to values) at every attention layer; padded
feature cells are excluded as keys through ``key_padding_mask``.

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention` (:class:`FusedMultiheadAttention`):
the attention weights are never returned, so PyTorch's fused kernels (flash / memory-efficient) compute the
output without materialising them wherever the device supports the call (on CPU: whenever attention dropout
is inactive, i.e. at inference or with ``dropout=0``).
"""
import copy
from typing import List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from d2_detr.layers.attention import FusedMultiheadAttention, with_pos_embed
from d2_detr.layers.linear import Linear
from d2_detr.modeling.registry import DETR_TRANSFORMER_REGISTRY, transformer_size_args

__all__ = [
    "DetrTransformer",
    "FusedMultiheadAttention",
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "with_pos_embed",
]


class TransformerEncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src) then a ReLU feed-forward block, each with a residual."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        onednn_linear: bool = False,
        attention_kernel: str = "sdpa",
    ) -> None:
        """
        Args:
            d_model: feature width d.
            nhead: attention heads (must divide d_model).
            dim_feedforward: hidden width of the feed-forward block.
            dropout: dropout in attention and after each sub-layer.
            normalize_before: pre-norm (LayerNorm before each sub-layer) instead of post-norm.
            onednn_linear: matrix products through oneDNN on CPU (:func:`d2_detr.layers.linear.linear`).
            attention_kernel: how attention is computed (:data:`d2_detr.layers.attention.ATTENTION_KERNELS`).
        """
        super().__init__()
        self.self_attn = FusedMultiheadAttention(d_model, nhead, dropout, onednn_linear, attention_kernel)
        self.linear1 = Linear(d_model, dim_feedforward, onednn=onednn_linear)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, onednn=onednn_linear)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU()
        self.normalize_before = normalize_before

    def _self_attention(self, x: Tensor, key_padding_mask: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
        q = k = with_pos_embed(x, pos)
        return self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask))

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None
    ) -> Tensor:
        """
        Args:
            src: (S, B, d) input sequence.
            src_key_padding_mask: (B, S) bool, True on padded positions.
            pos: (S, B, d) positional encoding.

        Returns:
            (S, B, d) output sequence.
        """
        if self.normalize_before:
            src = src + self._self_attention(self.norm1(src), src_key_padding_mask, pos)
            return src + self._feed_forward(self.norm2(src))
        src = self.norm1(src + self._self_attention(src, src_key_padding_mask, pos))
        return self.norm2(src + self._feed_forward(src))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the memory, then a ReLU feed-forward block.

    Self-attention: q = k = tgt + query_pos, v = tgt. Cross-attention: q = tgt + query_pos, k = memory + pos,
    v = memory.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        onednn_linear: bool = False,
        attention_kernel: str = "sdpa",
    ) -> None:
        """Arguments as in :class:`TransformerEncoderLayer`."""
        super().__init__()
        self.self_attn = FusedMultiheadAttention(d_model, nhead, dropout, onednn_linear, attention_kernel)
        self.multihead_attn = FusedMultiheadAttention(d_model, nhead, dropout, onednn_linear, attention_kernel)
        self.linear1 = Linear(d_model, dim_feedforward, onednn=onednn_linear)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, onednn=onednn_linear)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = nn.ReLU()
        self.normalize_before = normalize_before

    def _self_attention(self, x: Tensor, query_pos: Optional[Tensor]) -> Tensor:
        q = k = with_pos_embed(x, query_pos)
        return self.dropout1(self.self_attn(q, k, x))

    def _cross_attention(
        self,
        x: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Optional[Tensor],
        pos: Optional[Tensor],
        query_pos: Optional[Tensor],
    ) -> Tensor:
        out = self.multihead_attn(
            with_pos_embed(x, query_pos),
            with_pos_embed(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
        )
        return self.dropout2(out)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt: (Q, B, d) query features.
            memory: (S, B, d) encoder output.
            memory_key_padding_mask: (B, S) bool, True on padded memory positions.
            pos: (S, B, d) positional encoding of the memory.
            query_pos: (Q, B, d) positional encoding of the queries (the object queries).

        Returns:
            (Q, B, d) updated query features.
        """
        if self.normalize_before:
            tgt = tgt + self._self_attention(self.norm1(tgt), query_pos)
            tgt = tgt + self._cross_attention(self.norm2(tgt), memory, memory_key_padding_mask, pos, query_pos)
            return tgt + self._feed_forward(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attention(tgt, query_pos))
        tgt = self.norm2(tgt + self._cross_attention(tgt, memory, memory_key_padding_mask, pos, query_pos))
        return self.norm3(tgt + self._feed_forward(tgt))


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of an encoder layer, optionally followed by a LayerNorm."""

    def __init__(
        self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: Optional[nn.Module] = None
    ) -> None:
        """
        Args:
            encoder_layer: layer to copy ``num_layers`` times (copies do not share parameters).
            num_layers: number of layers.
            norm: final normalisation (the pre-norm variant uses one), or None.
        """
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(
        self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None
    ) -> Tensor:
        """(S, B, d) -> (S, B, d); arguments as in :meth:`TransformerEncoderLayer.forward`."""
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with a shared final LayerNorm applied to every returned output."""

    def __init__(
        self,
        decoder_layer: TransformerDecoderLayer,
        num_layers: int,
        norm: nn.Module,
        return_intermediate: bool = False,
    ) -> None:
        """
        Args:
            decoder_layer: layer to copy ``num_layers`` times (copies do not share parameters).
            num_layers: number of layers.
            norm: final normalisation, applied to the output of every returned layer.
            return_intermediate: return every layer's (normalised) output, not just the last one.
        """
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Arguments as in :meth:`TransformerDecoderLayer.forward`.

        Returns:
            (L, Q, B, d) normalised outputs, L = num_layers with ``return_intermediate``, else 1 (last layer).
        """
        outputs: List[Tensor] = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                outputs.append(self.norm(tgt))
        if not self.return_intermediate:
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


@DETR_TRANSFORMER_REGISTRY.register()
class DetrTransformer(nn.Module):
    """DETR's encoder-decoder: encodes a flattened feature map, decodes a set of object queries from zeros.

    Parameter names match the original DETR checkpoint's ``transformer.*`` keys.
    """

    @configurable
    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
        onednn_linear: bool = False,
        attention_kernel: str = "sdpa",
    ) -> None:
        """
        Args:
            d_model: feature width d.
            nhead: attention heads (must divide d_model).
            num_encoder_layers: encoder depth.
            num_decoder_layers: decoder depth.
            dim_feedforward: hidden width of the feed-forward blocks.
            dropout: dropout in attention and after each sub-layer.
            normalize_before: pre-norm layers (and a final encoder LayerNorm) instead of post-norm.
            return_intermediate_dec: return every decoder layer's output (for deep supervision).
            onednn_linear: matrix products through oneDNN on CPU (:func:`d2_detr.layers.linear.linear`);
                the same results up to float rounding.
            attention_kernel: how attention is computed (:data:`d2_detr.layers.attention.ATTENTION_KERNELS`); the
                same results up to float rounding.
        """
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        encoder_layer = TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before, onednn_linear, attention_kernel
        )
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before, onednn_linear, attention_kernel
        )
        self.decoder = TransformerDecoder(
            decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), return_intermediate=return_intermediate_dec
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg) -> dict:
        detr = cfg.MODEL.DETR
        return {
            **transformer_size_args(cfg),
            "normalize_before": detr.PRE_NORM,
            "return_intermediate_dec": detr.DEEP_SUPERVISION,
        }

    def _reset_parameters(self) -> None:
        """Xavier-uniform initialisation of every parameter with more than one dimension."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, mask: Optional[Tensor], query_embed: Tensor, pos_embed: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            src: (B, d, H, W) projected backbone features.
            mask: (B, H, W) bool, True on padded cells (excluded as attention keys); None when no cell is
                padded (the attention kernels then skip masking altogether).
            query_embed: (Q, d) object query embeddings (the decoder's query positional encoding).
            pos_embed: (B, d, H, W) positional encoding of the feature map.

        Returns:
            hs: (L, B, Q, d) normalised decoder outputs, L = number of decoder layers if
                ``return_intermediate_dec`` else 1.
            memory: (B, d, H, W) encoder output.
        """
        batch_size, channels, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (HW, B, d)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # (HW, B, d)
        query_embed = query_embed.unsqueeze(1).repeat(1, batch_size, 1)  # (Q, B, d)
        mask = None if mask is None else mask.flatten(1)  # (B, HW)

        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)  # (HW, B, d)
        tgt = torch.zeros_like(query_embed)  # (Q, B, d)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(batch_size, channels, h, w)
