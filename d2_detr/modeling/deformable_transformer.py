"""Deformable DETR's transformer (Zhu et al. 2021): multi-level input, deformable encoder and decoder, queries.

Parameter names match the original checkpoints' ``transformer.*`` keys (``level_embed``, ``encoder.layers.N.*``,
``decoder.layers.N.*``, ``reference_points`` or, two-stage, ``enc_output``, ``enc_output_norm``, ``pos_trans``,
``pos_trans_norm``).

Two-stage departure, so that detections do not depend on batch neighbours: padded cells are never among the
top-scoring proposals (the original could pick them in a padded batch); an image alone is unaffected.
``padding_invariant=False`` (``MODEL.DEFORMABLE_DETR.PADDING_INVARIANT``) restores the original.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..layers.deformable_transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
)
from ..layers.position_encoding import sine_box_embedding
from .registry import DETR_TRANSFORMER_REGISTRY, transformer_size_args

__all__ = ["DeformableTransformer", "deformable_layers", "deformable_size_args", "encode_levels", "encoder_predictions", "encoder_proposals", "top_cells",
           "reset_deformable_parameters", "valid_ratios"]

# Proposals whose normalised coordinates all lie strictly inside (low, high) are valid (the original's bounds).
_PROPOSAL_BOUNDS = (0.01, 0.99)
# Width and height of a level-0 proposal, normalised; each coarser level doubles them.
_PROPOSAL_BASE_SIZE = 0.05


def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
    """(B, L, 2) (width, height) fraction of each level not padded, from the levels' (B, H_l, W_l) padding masks
    (True on padded cells; the unpadded area is the top-left rectangle)."""
    ratios = []
    for mask in masks:
        valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]  # (B,)
        valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]  # (B,)
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_proposals(masks: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """One box proposal per encoder cell: the cell's centre normalised to the unpadded area, of width and height
    0.05 * 2**level, in inverse-sigmoid space.

    Args:
        masks: the L levels' (B, H_l, W_l) padding masks, True on padded cells.

    Returns:
        proposals: (B, S, 4) inverse sigmoid of the (cx, cy, w, h) proposals, +inf where unusable.
        usable: (B, S, 1) bool, False on padded cells and on proposals not inside (0.01, 0.99).
    """
    proposals = []
    for level, mask in enumerate(masks):
        height, width = mask.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32, device=mask.device) + 0.5  # (H,)
        xs = torch.arange(width, dtype=torch.float32, device=mask.device) + 0.5  # (W,)
        ys = ys[None] / (~mask[:, :, 0]).sum(1, keepdim=True)  # (B, H), over the image's valid rows
        xs = xs[None] / (~mask[:, 0, :]).sum(1, keepdim=True)  # (B, W)
        centres = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (B, H, W, 2)
        sizes = torch.full_like(centres, _PROPOSAL_BASE_SIZE * 2.0**level)
        proposals.append(torch.cat([centres, sizes], -1).flatten(1, 2))  # (B, H*W, 4)
    proposals = torch.cat(proposals, 1)  # (B, S, 4)
    padding = torch.cat([mask.flatten(1) for mask in masks], 1)  # (B, S)
    low, high = _PROPOSAL_BOUNDS
    usable = ((proposals > low) & (proposals < high)).all(-1, keepdim=True) & ~padding[..., None]  # (B, S, 1)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~usable, float("inf"))
    return proposals, usable


def deformable_size_args(cfg, name: str) -> dict:
    """The constructor arguments of a deformable transformer (named ``name`` in errors) read from the config:
    :func:`~d2_detr.modeling.registry.transformer_size_args`, the feature levels, the sampling points and
    ``padding_invariant``."""
    deformable = cfg.MODEL.DEFORMABLE_DETR
    if cfg.MODEL.DETR.PRE_NORM:
        raise ValueError(f"MODEL.DETR.PRE_NORM=True: {name} has post-norm layers only; set it False")
    return {
        **transformer_size_args(cfg),
        "num_feature_levels": deformable.NUM_FEATURE_LEVELS,
        "enc_n_points": deformable.ENC_N_POINTS,
        "dec_n_points": deformable.DEC_N_POINTS,
        "padding_invariant": deformable.PADDING_INVARIANT,
    }


def deformable_layers(d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int, dropout: float,
                      num_feature_levels: int, enc_n_points: int, dec_n_points: int,
                      onednn_linear: bool,
                      attention_kernel: str = "sdpa") -> Tuple[DeformableEncoder, DeformableDecoderLayer]:
    """The deformable encoder and one decoder layer (for the decoder to copy), of the given sizes (see
    :class:`DeformableTransformer`)."""
    if d_model % nhead != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead}) (MODEL.DETR.HIDDEN_DIM, NHEADS)")
    encoder_layer = DeformableEncoderLayer(d_model, nhead, dim_feedforward, dropout, num_feature_levels, enc_n_points,
                                           onednn_linear)
    decoder_layer = DeformableDecoderLayer(d_model, nhead, dim_feedforward, dropout, num_feature_levels, dec_n_points,
                                           onednn_linear, attention_kernel)
    return DeformableEncoder(encoder_layer, num_encoder_layers), decoder_layer


def reset_deformable_parameters(transformer: nn.Module) -> None:
    """The original initialisation of a deformable transformer: Xavier-uniform matrices, the deformable attentions'
    own initialisation, a standard-normal ``level_embed``."""
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for module in transformer.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.reset_parameters()
    nn.init.normal_(transformer.level_embed)


def encode_levels(encoder: nn.Module, level_embed: Tensor, srcs: List[Tensor], masks: List[Tensor],
                  pos_embeds: List[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]], Tensor, Tensor]:
    """Flatten the L levels (adding ``level_embed[l]`` (L, d) to level l's position encoding) and encode them.

    Args:
        encoder: a :class:`~d2_detr.layers.deformable_transformer.DeformableEncoder`.
        srcs: L levels (B, d, H_l, W_l); masks: their padding masks (B, H_l, W_l); pos_embeds: their position
            encodings (B, d, H_l, W_l).

    Returns:
        memory (B, S, d), spatial_shapes [(H_l, W_l)], valid ratios (B, L, 2), flat padding mask (B, S).
    """
    spatial_shapes = [(src.shape[-2], src.shape[-1]) for src in srcs]
    src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)  # (B, S, d)
    mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)  # (B, S)
    pos_flat = torch.cat([pos.flatten(2).transpose(1, 2) + level_embed[level]
                          for level, pos in enumerate(pos_embeds)], 1)  # (B, S, d)
    ratios = valid_ratios(masks)  # (B, L, 2)
    return encoder(src_flat, pos_flat, spatial_shapes, ratios, mask_flat), spatial_shapes, ratios, mask_flat


def encoder_predictions(memory: Tensor, masks: Sequence[Tensor], project: Callable[[Tensor], Tensor],
                        class_head: nn.Module, box_head: nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    """Predictions at every encoder cell from the encoder output ``memory`` (B, S, d): the projected features
    ``project(memory)`` (zero at unusable cells, see :func:`encoder_proposals`) (B, S, d), their class logits
    (B, S, K) and their boxes (B, S, 4) refining the cells' proposals, in inverse-sigmoid space (+inf where
    unusable)."""
    proposals, usable = encoder_proposals(masks)  # (B, S, 4), (B, S, 1)
    enc_memory = project(memory.masked_fill(~usable, 0.0))  # (B, S, d)
    return enc_memory, class_head(enc_memory), box_head(enc_memory) + proposals


def top_cells(scores: Tensor, masks: Sequence[Tensor], k: int, padded_last: bool = True) -> Tensor:
    """(B, k) indices of the ``k`` best-scoring cells, ``scores`` (B, S). With ``padded_last`` padded cells
    (``masks``: the levels' (B, H_l, W_l) padding masks) rank last, so that an image's choice does not depend on the
    batch's padding; without, they compete on their scores, as in the original."""
    if not torch.jit.is_tracing() and scores.shape[1] < k:
        raise ValueError(f"The transformer keeps {k} proposals of the encoder's cells as queries "
                         f"(MODEL.DETR.NUM_OBJECT_QUERIES) but the feature levels have only {scores.shape[1]} cells: "
                         "use larger images or fewer queries")
    if padded_last:
        scores = scores.masked_fill(torch.cat([m.flatten(1) for m in masks], 1), -math.inf)  # (B, S)
    return scores.topk(k, dim=1).indices


@DETR_TRANSFORMER_REGISTRY.register()
class DeformableTransformer(nn.Module):
    """Flattens the levels (adding a learned level embedding to their position encodings), encodes them with
    deformable self-attention and decodes a set of queries with deformable cross-attention.

    Queries: a learned (Q, 2d) embedding split into query position and content, with reference points
    ``sigmoid(reference_points(query_pos))``; or, two-stage, the top-Q encoder proposals (scored by the proposal
    heads the caller passes), whose boxes are the reference boxes and whose sine embedding gives the queries.
    """

    @configurable
    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, two_stage: bool = False, two_stage_num_proposals: int = 300,
                 onednn_linear: bool = False, attention_kernel: str = "sdpa", padding_invariant: bool = True) -> None:
        """
        Args:
            d_model, nhead: feature width d, and attention heads (dividing d) in every attention.
            num_encoder_layers, num_decoder_layers: depths of the encoder and of the decoder.
            dim_feedforward: hidden width of the feed-forward blocks.
            dropout: dropout after each sub-layer, in the feed-forward blocks and the decoder's self-attention.
            num_feature_levels: feature levels L.
            enc_n_points: sampling points per head and level in the encoder.
            dec_n_points: sampling points per head and level in the decoder.
            two_stage: queries from the encoder's proposals instead of a learned embedding.
            two_stage_num_proposals: proposals kept as queries (two-stage; the number of queries).
            onednn_linear: matrix products through oneDNN on CPU (:func:`d2_detr.layers.linear.linear`).
            attention_kernel: how the decoder's self-attention is computed
                (:data:`~d2_detr.layers.attention.ATTENTION_KERNELS`).
            padding_invariant: padded cells are never selected as proposals, and the model gives the levels
                ceil-rule padding masks; False: the original's behaviour (module docstring).
        """
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.padding_invariant = padding_invariant
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder, decoder_layer = deformable_layers(d_model, nhead, num_encoder_layers, dim_feedforward, dropout,
                                                        num_feature_levels, enc_n_points, dec_n_points, onednn_linear,
                                                        attention_kernel)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers)
        self.num_decoder_layers = num_decoder_layers
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            **deformable_size_args(cfg, cls.__name__),
            "two_stage": cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE,
            "two_stage_num_proposals": cfg.MODEL.DETR.NUM_OBJECT_QUERIES,
        }

    def _reset_parameters(self) -> None:
        """The original initialisation: Xavier-uniform matrices, the deformable attentions' own initialisation,
        zero ``reference_points`` bias, standard-normal level embedding."""
        reset_deformable_parameters(self)
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_embed: Optional[Tensor] = None, box_heads: Optional[Sequence[nn.Module]] = None,
                proposal_heads: Optional[Tuple[nn.Module, nn.Module]] = None) -> Dict[str, object]:
        """
        Args:
            srcs: L projected levels (B, d, H_l, W_l).
            masks: L padding masks (B, H_l, W_l), True on padded cells.
            pos_embeds: L position encodings (B, d, H_l, W_l).
            query_embed: (Q, 2d) learned queries (query position, then content); None when two-stage.
            box_heads: one box head per decoder layer for iterative refinement (see
                :class:`~d2_detr.layers.deformable_transformer.DeformableDecoder`), or None.
            proposal_heads: two-stage only: the (class head, box head) scoring and refining the encoder's proposals.

        Returns:
            dict with "hs" (num_decoder_layers, B, Q, d) decoder outputs; "references": each decoder layer's
            reference, (B, Q, 2) points or (B, Q, 4) boxes; two-stage also "enc_logits" (B, S, K) and "enc_boxes"
            (B, S, 4) normalised cxcywh, the proposal heads' outputs at every cell.
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"DeformableTransformer built for {self.num_feature_levels} feature levels, "
                             f"got {len(srcs)}")
        memory, spatial_shapes, ratios, mask_flat = encode_levels(self.encoder, self.level_embed, srcs, masks,
                                                                  pos_embeds)

        outputs: Dict[str, object] = {}
        if self.two_stage:
            if proposal_heads is None:
                raise ValueError("a two-stage DeformableTransformer needs the proposal heads (class head, box head)")
            query_pos, tgt, reference, enc_logits, enc_boxes = self._proposal_queries(
                memory, masks, proposal_heads)
            outputs.update(enc_logits=enc_logits, enc_boxes=enc_boxes)
        else:
            if query_embed is None:
                raise ValueError("DeformableTransformer needs the learned query embedding (Q, 2d) unless two-stage")
            query_pos, tgt = query_embed.expand(memory.shape[0], -1, -1).split(self.d_model, dim=-1)  # (B, Q, d)
            reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        hs, references = self.decoder(tgt, reference, memory, spatial_shapes, ratios, query_pos, mask_flat, box_heads)
        outputs.update(hs=hs, references=references)
        return outputs

    def _proposal_queries(
        self, memory: Tensor, masks: List[Tensor], proposal_heads: Tuple[nn.Module, nn.Module]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Two-stage queries from the encoder output ``memory`` (B, S, d) and the levels' padding ``masks``:
        (query_pos, tgt) (B, Q, d) each, reference boxes (B, Q, 4), and the proposal heads' logits (B, S, K) and
        boxes (B, S, 4) at every cell."""
        _, enc_logits, enc_coords = encoder_predictions(
            memory, masks, lambda x: self.enc_output_norm(self.enc_output(x)), *proposal_heads)
        top = top_cells(enc_logits[..., 0], masks, self.two_stage_num_proposals, self.padding_invariant)  # (B, Q)
        top_coords = enc_coords.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        embedding = sine_box_embedding(top_coords.sigmoid(), self.d_model // 2)  # (B, Q, 2d)
        query_pos, tgt = self.pos_trans_norm(self.pos_trans(embedding)).split(self.d_model, dim=-1)
        return query_pos, tgt, top_coords.sigmoid(), enc_logits, enc_coords.sigmoid()
