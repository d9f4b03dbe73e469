"""DINO's decoder (Zhang et al. 2023): deformable decoder layers whose positional queries come from their reference
boxes, refined at every layer by a shared box head, with "look forward twice".

Layout as in :mod:`d2_detr.layers.deformable_transformer`: batch-first ``(B, Q, d)`` queries, ``(B, S, d)``
flattened levels, reference boxes (cx, cy, w, h) normalised to the image's unpadded area.

Parameter names are those of the original code (``layers.N.*``, ``norm``, ``ref_point_head.layers.{0,1}``).
"""
import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .box_ops import refine_boxes
from .deformable_transformer import DeformableDecoderLayer, scale_to_levels
from .mlp import MLP
from .position_encoding import sine_box_embedding

__all__ = ["DinoDecoder", "box_query_pos_embedding"]

# inverse_sigmoid's clamp when the decoder refines its reference boxes (the original code's).
REFERENCE_EPS = 1e-3


def box_query_pos_embedding(boxes: Tensor, d_model: int) -> Tensor:
    """Sine embedding (B, Q, 2d) of boxes (B, Q, 4) (cx, cy, w, h): the ``d_model / 2`` sine features of each of
    cy, cx, w, h (in that order, as the original code) scaled by 2*pi, in the boxes' dtype."""
    return sine_box_embedding(boxes[..., [1, 0, 2, 3]], d_model // 2).to(boxes.dtype)


class DinoDecoder(nn.Module):
    """``num_layers`` copies of a :class:`~d2_detr.layers.deformable_transformer.DeformableDecoderLayer`.

    Before each layer the positional query is ``ref_point_head(sine embedding of the reference box)``. Departure, so
    that detections do not depend on batch neighbours: the box embedded is normalised to the image's unpadded area
    (the original embeds it as scaled to the batch's padded first level, as with ``padding_invariant=False``); for
    an image alone both are the same.
    After it, the shared ``box_head`` refines the reference box from the layer's output:
    ``refined = refine_boxes(box_head(output), reference)``; ``refined.detach()`` is the next layer's reference.
    Every layer's output goes through one shared LayerNorm (``norm``) before the prediction heads.

    Look forward twice: the reference returned for layer i + 1, on which its box prediction builds, is ``refined``
    itself (not detached), so that layer i + 1's box loss also trains layer i; without it the detached reference.
    """

    def __init__(self, decoder_layer: DeformableDecoderLayer, num_layers: int, d_model: int,
                 look_forward_twice: bool = True, padding_invariant: bool = True) -> None:
        """
        Args:
            decoder_layer: layer to copy ``num_layers`` times (copies do not share parameters).
            num_layers: number of layers.
            d_model: feature width d.
            look_forward_twice: return the refined references undetached (see the class docstring).
            padding_invariant: embed the reference box relative to the image's unpadded area; False: as scaled to the
                padded first level (the original).
        """
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.look_forward_twice = look_forward_twice
        self.padding_invariant = padding_invariant

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: List[Tuple[int, int]],
                valid_ratios: Tensor, box_head: nn.Module, memory_padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """
        Args:
            tgt: (B, Q, d) initial content queries.
            reference: (B, Q, 4) initial reference boxes, normalised to the unpadded area.
            memory: (B, S, d) encoder output.
            spatial_shapes: (H_l, W_l) of the levels.
            valid_ratios: (B, L, 2) (width, height) fraction of each level covered by each image.
            box_head: module mapping (B, Q, d) to (B, Q, 4) box deltas (shared by the layers).
            memory_padding_mask: (B, S) bool, True on padded cells.
            self_attn_mask: (Q, Q) bool, True where a query must not see another (denoising groups), or None.

        Returns:
            hs: (num_layers, B, Q, d) every layer's normalised output.
            references: num_layers + 1 boxes (B, Q, 4): the initial reference, then each layer's refined box
                (attached to the graph with look forward twice). Layer i's prediction refines ``references[i]``.
        """
        outputs: List[Tensor] = []
        references: List[Tensor] = [reference]
        for layer in self.layers:
            level_reference = scale_to_levels(reference, valid_ratios)  # (B, Q, L, 4)
            embedded = reference if self.padding_invariant else level_reference[:, :, 0]  # (B, Q, 4)
            query_pos = self.ref_point_head(box_query_pos_embedding(embedded, self.d_model))
            tgt = layer(tgt, query_pos, level_reference, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            refined = refine_boxes(box_head(tgt), reference, REFERENCE_EPS)
            reference = refined.detach()
            references.append(refined if self.look_forward_twice else reference)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs), references
