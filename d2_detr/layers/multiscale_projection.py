"""Projection of backbone feature maps to the transformer width, with extra coarser levels (Deformable DETR)."""
from typing import List, Sequence

from torch import Tensor, nn

__all__ = ["MultiScaleProjection"]


class MultiScaleProjection(nn.ModuleList):
    """One ``Sequential(Conv2d, GroupNorm)`` per output level, as the original ``input_proj`` (same names).

    The first ``len(in_channels)`` levels project the backbone maps with a 1x1 convolution; each extra level is a
    3x3 stride-2 convolution (padding 1) of the previous level's input: the last backbone map for the first extra
    level, the previous extra level after it. Every convolution is followed by ``GroupNorm(num_groups, out)``.
    An h x w input gives an extra level of ceil(h / 2) x ceil(w / 2) cells. Convolution weights are
    Xavier-uniform, biases zero.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_levels: int, num_groups: int = 32):
        """
        Args:
            in_channels: channels of the backbone maps, in the order they are passed to ``forward``.
            out_channels: transformer width d (divisible by ``num_groups``).
            num_levels: output levels, at least ``len(in_channels)``.
            num_groups: GroupNorm groups.
        """
        if num_levels < len(in_channels):
            raise ValueError(f"{num_levels} feature levels cannot hold the {len(in_channels)} backbone maps: set "
                             f"MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS to at least {len(in_channels)}, or list fewer "
                             "MODEL.DEFORMABLE_DETR.IN_FEATURES")
        if out_channels % num_groups != 0:
            raise ValueError(f"GroupNorm({num_groups}) needs a width divisible by {num_groups}, got {out_channels} "
                             "(MODEL.DETR.HIDDEN_DIM)")
        levels = [nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=1), nn.GroupNorm(num_groups, out_channels))
                  for c in in_channels]
        channels = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            levels.append(nn.Sequential(nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1),
                                        nn.GroupNorm(num_groups, out_channels)))
            channels = out_channels
        super().__init__(levels)
        self.num_inputs = len(in_channels)
        for level in self:
            nn.init.xavier_uniform_(level[0].weight, gain=1)
            nn.init.zeros_(level[0].bias)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """``len(in_channels)`` maps (B, C_i, H_i, W_i) -> ``num_levels`` maps (B, out_channels, H_l, W_l)."""
        if len(features) != self.num_inputs:
            raise ValueError(f"MultiScaleProjection built for {self.num_inputs} backbone maps, got {len(features)}")
        levels = [proj(x) for proj, x in zip(self, features)]
        previous = features[-1]
        for proj in list(self)[self.num_inputs:]:
            levels.append(proj(previous))
            previous = levels[-1]
        return levels
