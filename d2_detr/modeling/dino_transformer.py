"""DINO's transformer (Zhang et al. 2023): Deformable DETR's encoder, queries chosen from the encoder's cells, and
:class:`~d2_detr.layers.dino_decoder.DinoDecoder`.

Query selection (``query_selection``):

- ``"mixed"`` (the paper's): the top-Q encoder cells (by their best class logit) give the reference boxes (the
  positional part, detached); the content queries are learned (``tgt_embed``).
- ``"pure"``: as mixed, but the content queries are the selected cells' features (detached), as Deformable DETR's
  two-stage.
- ``"static"``: no selection: learned reference boxes (``refpoint_embed``, inverse sigmoid) and content queries.

Parameter names match the original checkpoints' ``transformer.*`` keys (``level_embed``, ``encoder.layers.N.*``,
``decoder.*``, ``tgt_embed``, ``enc_output``, ``enc_output_norm``, or ``refpoint_embed`` for "static"). As in
Deformable DETR's two-stage here, padded cells are never selected, so that detections do not depend on batch
neighbours (an image alone is unaffected).
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..layers.dino_decoder import DinoDecoder
from .deformable_transformer import (
    deformable_layers,
    deformable_size_args,
    encode_levels,
    encoder_predictions,
    reset_deformable_parameters,
    top_cells,
)
from .denoising import DenoisingQueries
from .registry import DETR_TRANSFORMER_REGISTRY

__all__ = ["DinoTransformer", "QUERY_SELECTIONS"]

QUERY_SELECTIONS = ("mixed", "pure", "static")


@DETR_TRANSFORMER_REGISTRY.register()
class DinoTransformer(nn.Module):
    """Encodes the flattened levels with deformable self-attention, selects Q queries (see the module docstring),
    prepends the denoising queries in training, and decodes them with :class:`DinoDecoder`."""

    @configurable
    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, num_feature_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, num_queries: int = 900, query_selection: str = "mixed",
                 look_forward_twice: bool = True, onednn_linear: bool = False, attention_kernel: str = "sdpa",
                 padding_invariant: bool = True) -> None:
        """
        Args:
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, num_feature_levels,
                enc_n_points, dec_n_points, onednn_linear, attention_kernel, padding_invariant: as in
                :class:`~d2_detr.modeling.deformable_transformer.DeformableTransformer` (DINO: FFN 2048, dropout 0).
            num_queries: Q, the matching queries.
            query_selection: "mixed", "pure" or "static" (module docstring).
            look_forward_twice: see :class:`~d2_detr.layers.dino_decoder.DinoDecoder`.
                (``padding_invariant`` also picks the decoder's positional-query boxes: see there.)
        """
        super().__init__()
        if query_selection not in QUERY_SELECTIONS:
            raise ValueError(f"MODEL.DINO.QUERY_SELECTION={query_selection!r}: choose one of {QUERY_SELECTIONS}")
        self.encoder, decoder_layer = deformable_layers(d_model, nhead, num_encoder_layers, dim_feedforward, dropout,
                                                        num_feature_levels, enc_n_points, dec_n_points, onednn_linear,
                                                        attention_kernel)
        self.decoder = DinoDecoder(decoder_layer, num_decoder_layers, d_model, look_forward_twice, padding_invariant)
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        self.num_queries = num_queries
        self.query_selection = query_selection
        self.padding_invariant = padding_invariant
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if query_selection != "pure":
            self.tgt_embed = nn.Embedding(num_queries, d_model)
        if query_selection == "static":
            self.refpoint_embed = nn.Embedding(num_queries, 4)
        else:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        reset_deformable_parameters(self)  # the query embeddings too are Xavier-uniform, as in the original

    @property
    def two_stage(self) -> bool:
        """Whether the queries are selected from the encoder's cells (and need the proposal heads)."""
        return self.query_selection != "static"

    @property
    def two_stage_num_proposals(self) -> int:
        """Cells selected as queries (when :attr:`two_stage`)."""
        return self.num_queries

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            **deformable_size_args(cfg, cls.__name__),
            "num_queries": cfg.MODEL.DETR.NUM_OBJECT_QUERIES,
            "query_selection": cfg.MODEL.DINO.QUERY_SELECTION,
            "look_forward_twice": cfg.MODEL.DINO.LOOK_FORWARD_TWICE,
        }

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor], box_head: nn.Module,
                proposal_heads: Optional[Tuple[nn.Module, nn.Module]] = None,
                denoising: Optional[DenoisingQueries] = None) -> Dict[str, object]:
        """
        Args:
            srcs: L projected levels (B, d, H_l, W_l).
            masks: L padding masks (B, H_l, W_l), True on padded cells.
            pos_embeds: L position encodings (B, d, H_l, W_l).
            box_head: the decoder's shared box head (refines the reference boxes at every layer).
            proposal_heads: (class head, box head) of the encoder's cells; needed unless "static".
            denoising: the denoising queries (training), placed before the Q matching queries, or None.

        Returns:
            dict with "hs" (num_decoder_layers, B, N + Q, d) decoder outputs (N denoising queries first, 0 without);
            "references": num_decoder_layers + 1 boxes (B, N + Q, 4) (see
            :class:`~d2_detr.layers.dino_decoder.DinoDecoder`); unless "static", "enc_logits" (B, Q, K) and
            "enc_boxes" (B, Q, 4), the proposal heads' predictions at the selected cells (undetached).
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"DinoTransformer built for {self.num_feature_levels} feature levels, got {len(srcs)}")
        memory, spatial_shapes, ratios, mask_flat = encode_levels(self.encoder, self.level_embed, srcs, masks,
                                                                  pos_embeds)
        batch = memory.shape[0]
        outputs: Dict[str, object] = {}
        if self.query_selection == "static":
            reference_logits = self.refpoint_embed.weight.expand(batch, -1, -1)  # (B, Q, 4)
            tgt = self.tgt_embed.weight.expand(batch, -1, -1)  # (B, Q, d)
        else:
            if proposal_heads is None:
                raise ValueError("DinoTransformer selecting queries from the encoder needs the proposal heads")
            enc_memory, enc_logits, enc_coords = encoder_predictions(
                memory, masks, lambda x: self.enc_output_norm(self.enc_output(x)), *proposal_heads)
            top = top_cells(enc_logits.max(-1).values, masks, self.num_queries,
                            self.padding_invariant)[..., None]  # (B, Q, 1)
            top_coords = enc_coords.gather(1, top.expand(-1, -1, 4))  # (B, Q, 4) inverse sigmoid
            reference_logits = top_coords.detach()
            if self.query_selection == "mixed":
                tgt = self.tgt_embed.weight.expand(batch, -1, -1)
            else:
                tgt = enc_memory.gather(1, top.expand(-1, -1, self.d_model)).detach()
            outputs.update(enc_logits=enc_logits.gather(1, top.expand(-1, -1, enc_logits.shape[-1])),
                           enc_boxes=top_coords.sigmoid())
        attn_mask = None
        if denoising is not None:
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)
            reference_logits = torch.cat([denoising.reference_logits, reference_logits], 1)
            attn_mask = denoising.attn_mask
        hs, references = self.decoder(tgt, reference_logits.sigmoid(), memory, spatial_shapes, ratios, box_head,
                                      mask_flat, attn_mask)
        outputs.update(hs=hs, references=references)
        return outputs
