"""A linear layer's product through oneDNN on CPU.

PyTorch sends fp32 ``F.linear`` on CPU to the BLAS library (MKL in the official builds), which on some CPUs (AMD
EPYC, measured) reaches half of oneDNN's speed for the transformer's products: (850 x 256) by (256 x 2048)
takes 16 ms through MKL and 6 ms through oneDNN on 2 cores. ``linear`` computes the same product, forward and
backward, through oneDNN's inner-product primitive (the kernel behind ``torch.utils.mkldnn``); outputs agree
with ``F.linear`` up to float rounding (summation order).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "onednn_linear_applies"]

# Below this many rows (tokens x batch) the conversions to and from oneDNN's layout cost more than they save.
MIN_ROWS = 256


def _inner_product(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN. x: (N, K), weight: (M, K), bias: (M,) -> (N, M), all dense fp32."""
    return torch._C._nn.mkldnn_linear(x.to_mkldnn(), weight.to_mkldnn(), bias).to_dense()


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` for 2-D inputs, forward and backward by oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _inner_product(grad, weight.t().contiguous())  # (N, M) @ (M, K) -> (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _inner_product(grad.t().contiguous(), x.t().contiguous())  # (M, N) @ (N, K) -> (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear`` takes the oneDNN path for these operands: fp32 on CPU with oneDNN available, at least
    ``MIN_ROWS`` rows, and not inside tracing, scripting, ONNX export or ``torch.compile`` (which need the
    standard operator) or autocast (which casts ``F.linear`` itself)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False  # checked first: the size test below would be recorded into a traced graph
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and torch.backends.mkldnn.is_available()
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, onednn: bool = True) -> Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN when ``onednn`` and ``onednn_linear_applies``.

    x: (..., K), weight: (M, K), bias: (M,) -> (..., M).
    """
    if not (onednn and onednn_linear_applies(x, weight)):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    return _OneDnnLinear.apply(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and initialisation) whose product goes through :func:`linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, onednn: bool = True) -> None:
        """
        Args:
            in_features, out_features, bias: as in ``nn.Linear``.
            onednn: compute the product through oneDNN where :func:`onednn_linear_applies`.
        """
        super().__init__(in_features, out_features, bias=bias)
        self.onednn = onednn

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return linear(x, self.weight, self.bias, onednn=self.onednn)
