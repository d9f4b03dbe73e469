"""Position encodings of a backbone feature map, as in DETR (Carion et al. 2020), and of boxes.

Both feature-map encodings take the padding mask of the feature map (``True`` on padded cells) and return a
``(B, 2 * num_pos_feats, H, W)`` tensor that is added to the attention queries and keys of the transformer.
:func:`sine_box_embedding` encodes boxes the same way, coordinate by coordinate (Deformable DETR's two-stage
queries).
"""
import math

import torch
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "PositionEmbeddingLearned", "sine_box_embedding", "sine_features"]


def sine_features(positions: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine features of positions: ``(...)`` -> ``(..., num_pos_feats)``, interleaved ``sin`` (even feature ``i``)
    and ``cos`` (odd ``i``) of ``position / temperature ** (2 * floor(i / 2) / num_pos_feats)``, in float32."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    angles = positions[..., None].float() / dim_t  # (..., num_pos_feats)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_box_embedding(
    boxes: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Sine encoding of normalised boxes, coordinate by coordinate: ``(..., 4)`` in [0, 1] ->
    ``(..., 4 * num_pos_feats)``, the :func:`sine_features` of ``scale * coordinate`` for each coordinate in turn
    (Deformable DETR's encoding of its two-stage proposals)."""
    return sine_features(boxes * scale, num_pos_feats, temperature).flatten(-2)


def _half_hidden_dim(cfg) -> int:
    """Features per axis for ``cfg.MODEL.DETR.HIDDEN_DIM``: half of it, so that both halves sum to d."""
    hidden_dim = cfg.MODEL.DETR.HIDDEN_DIM
    if hidden_dim % 2 != 0:
        raise ValueError(f"MODEL.DETR.HIDDEN_DIM must be even for a 2-D position encoding, got {hidden_dim}")
    return hidden_dim // 2


class PositionEmbeddingSine(nn.Module):
    """2-D sine encoding: ``num_pos_feats`` features of the row position, then as many of the column position.

    Positions are counted over valid (unpadded) cells only, so a cell's encoding does not depend on how much
    padding follows it: 1 for the first cell. With ``normalize``, ``offset`` is added to them, they are divided by
    the last valid position (+1e-6) and multiplied by ``scale`` (DETR: offset 0, so the last cell sits at
    ``scale``; Deformable DETR: offset -0.5, cell centres). Feature ``i`` of an axis is ``sin`` (even ``i``) or
    ``cos`` (odd ``i``) of ``position / temperature ** (2 * floor(i / 2) / num_pos_feats)``.
    """

    @configurable
    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        """
        Args:
            num_pos_feats: features per axis (even); the output has ``2 * num_pos_feats`` channels.
            temperature: base of the geometric progression of wavelengths.
            normalize: divide positions by the last valid position of their row/column.
            scale: factor applied to normalised positions (unused without ``normalize``).
            offset: added to the positions before normalising (unused without ``normalize``).
        """
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"num_pos_feats": _half_hidden_dim(cfg), "offset": cfg.MODEL.DETR.POSITION_EMBEDDING_OFFSET,
                "temperature": cfg.MODEL.DETR.POSITION_EMBEDDING_TEMPERATURE}

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask: (B, H, W) bool, True on padded cells.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32 encoding, row (y) features first.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # (B, H, W)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_x = sine_features(x_embed, self.num_pos_feats, self.temperature)  # (B, H, W, num_pos_feats)
        pos_y = sine_features(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2 * num_pos_feats, H, W)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a column embedding (first half) and a row embedding (second half).

    Supports feature maps of at most ``num_positions`` rows and columns.
    """

    @configurable
    def __init__(self, num_pos_feats: int = 128, num_positions: int = 50) -> None:
        """
        Args:
            num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
            num_positions: number of learned rows and of learned columns.
        """
        super().__init__()
        self.num_positions = num_positions
        self.row_embed = nn.Embedding(num_positions, num_pos_feats)
        self.col_embed = nn.Embedding(num_positions, num_pos_feats)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"num_pos_feats": _half_hidden_dim(cfg)}

    def reset_parameters(self) -> None:
        """Uniform [0, 1) initialisation of both embeddings, as in the original DETR."""
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """
        Args:
            mask: (B, H, W) bool padding mask; only its shape and device are used.

        Returns:
            (B, 2 * num_pos_feats, H, W) encoding, column (x) features first.
        """
        batch_size, h, w = mask.shape
        if h > self.num_positions or w > self.num_positions:
            raise ValueError(
                f"Feature map of size {h}x{w} exceeds the {self.num_positions} learned positions per axis; "
                "increase num_positions or use the sine encoding."
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, num_pos_feats)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, num_pos_feats)
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1
        )  # (H, W, 2 * num_pos_feats)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(batch_size, 1, 1, 1)
