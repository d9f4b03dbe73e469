"""Frozen BatchNorms folded into the preceding convolutions' weights (a speed option of the DETR-family models)."""
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn

__all__ = ["FoldedFrozenBNConv2d", "fold_frozen_batchnorm"]


class FoldedFrozenBNConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` followed by a ``FrozenBatchNorm2d`` that applies the norm through its weights.

    A frozen BatchNorm is a fixed per-channel affine map ``y * scale + shift``, so
    ``norm(conv(x, w, b)) == conv(x, w * scale, b * scale + shift)``. The folded weights are recomputed at
    every call (one pass over the weights, negligible next to the convolution), so training, checkpoint
    loading and gradients (which flow to ``weight`` and ``bias`` through the fold) behave as before, while the
    normalisation pass over the activations (and, in training, its backward) disappears. Parameters, buffers
    and state-dict keys are those of the unfolded module.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'), equal to ``activation(norm(conv(x)))`` up to rounding."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias - norm.running_mean * scale  # (C_out,)
        weight = self.weight * scale.view(-1, 1, 1, 1)  # (C_out, C_in / groups, kh, kw)
        bias = shift if self.bias is None else self.bias * scale + shift  # (C_out,)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every Detectron2 ``Conv2d`` in ``module`` whose norm is a ``FrozenBatchNorm2d`` fold that norm into
    its weights (:class:`FoldedFrozenBNConv2d`), in place; outputs are unchanged up to float rounding.

    Only the modules' class changes: their identity, parameters, buffers and state-dict keys stay, so
    optimizers, freezing and checkpoints are unaffected. Returns the number of convolutions converted.
    """
    converted = 0
    for submodule in module.modules():
        if type(submodule) is Conv2d and type(submodule.norm) is FrozenBatchNorm2d:
            submodule.__class__ = FoldedFrozenBNConv2d
            converted += 1
    return converted
