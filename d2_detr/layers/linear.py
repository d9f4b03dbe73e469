"""A linear layer's product through oneDNN on CPU, opt-in, where this torch provides it.

PyTorch sends fp32 ``F.linear`` on CPU to its BLAS library (MKL in the official builds). ``linear(...,
onednn=True)`` computes the same product, forward and backward, through oneDNN's inner-product primitive instead
(the kernel behind ``torch.utils.mkldnn``); outputs agree with ``F.linear`` up to float rounding (summation
order). Whether that is faster depends on the CPU, the thread count and the load (benchmarks/README.md has
measurements), so it is off unless asked for.

The oneDNN product is reached through a private torch entry point (``torch._C._nn.mkldnn_linear``), which a torch
release may change or drop: :func:`onednn_linear_available` checks once per process that it exists and gives
``F.linear``'s results, forward and backward; where it does not, ``linear`` logs a warning once and uses
``F.linear``.
"""
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "onednn_linear_applies", "onednn_linear_available"]

logger = logging.getLogger(__name__)

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


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether this torch has the oneDNN product :func:`linear` uses, and it matches ``F.linear``.

    Checked once per process (cached): oneDNN is built in, the private ``torch._C._nn.mkldnn_linear`` exists, and
    a small product through it gives ``F.linear``'s output and gradients. Logs a warning when it is not.
    """
    reason = ""
    if not torch.backends.mkldnn.is_available():
        reason = "this torch build has no oneDNN"
    elif not hasattr(torch._C._nn, "mkldnn_linear"):
        reason = "this torch release has no torch._C._nn.mkldnn_linear"
    else:
        try:
            reason = _probe()
        except Exception as e:  # a private entry point may fail in any way on another release
            reason = f"torch._C._nn.mkldnn_linear failed ({type(e).__name__}: {e})"
    if reason:
        logger.warning(f"oneDNN linear requested, but {reason}: the products go through F.linear")
    return not reason


def _probe() -> str:
    """A small product and its gradients through :class:`_OneDnnLinear` against ``F.linear``: "" when they
    agree, else what differed. Runs with autograd on, whatever the caller's mode (inference, no_grad, autocast)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        g = torch.Generator().manual_seed(0)
        operands = [torch.randn(shape, generator=g, requires_grad=True) for shape in ((8, 16), (4, 16), (4,))]
        out = _OneDnnLinear.apply(*operands)
        grads = torch.autograd.grad(out.square().sum(), operands)
        ref = F.linear(*operands)
        ref_grads = torch.autograd.grad(ref.square().sum(), operands)
    for name, got, want in zip(("output", "input grad", "weight grad", "bias grad"), (out, *grads), (ref, *ref_grads)):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return f"torch._C._nn.mkldnn_linear gives a different {name} than F.linear"
    return ""


def onednn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear(..., onednn=True)`` takes the oneDNN path for these operands: fp32 on CPU, at least
    ``MIN_ROWS`` rows, not inside tracing, scripting, ONNX export or ``torch.compile`` (which need the standard
    operator) or autocast (which casts ``F.linear`` itself), and :func:`onednn_linear_available`."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False  # checked first: the size test below would be recorded into a traced graph
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_available()
    )


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, onednn: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``; through oneDNN when ``onednn`` and ``onednn_linear_applies``.

    x: (..., K), weight: (M, K), bias: (M,) -> (..., M).
    """
    if not (onednn and onednn_linear_applies(x, weight)):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    return _OneDnnLinear.apply(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and initialisation) whose product goes through :func:`linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, onednn: bool = False) -> None:
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
