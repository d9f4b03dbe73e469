"""oneDNN linear (d2_detr.layers.linear): opt-in, checked before use, same products as F.linear."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_detr.layers import linear as linear_module
from d2_detr.layers.linear import MIN_ROWS, Linear, linear, onednn_linear_applies, onednn_linear_available

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _operands(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows // 2, 2, 64, generator=g, requires_grad=True)  # (S, B, K), sequence-first as in DETR
    weight = torch.randn(96, 64, generator=g, requires_grad=True)
    bias = torch.randn(96, generator=g, requires_grad=True)
    return x, weight, bias


def test_onednn_path_matches_f_linear_forward_and_backward():
    x, weight, bias = _operands(2 * MIN_ROWS)
    assert onednn_linear_applies(x, weight)
    grad_out = torch.randn(MIN_ROWS, 2, 96, generator=torch.Generator().manual_seed(1))
    out = linear(x, weight, bias, onednn=True)
    out.backward(grad_out)
    grads = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    ref = F.linear(x, weight, bias)
    ref.backward(grad_out)
    assert out.shape == ref.shape == (MIN_ROWS, 2, 96)
    assert "OneDnnLinear" in type(out.grad_fn.next_functions[0][0]).__name__  # the oneDNN path really ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for got, t in zip(grads, (x, weight, bias)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-4)


def test_gradient_only_for_inputs_that_need_it():
    x, weight, bias = _operands(2 * MIN_ROWS)
    weight.requires_grad_(False)
    linear(x, weight, None, onednn=True).sum().backward()
    assert x.grad is not None and weight.grad is None and bias.grad is None


@pytest.mark.parametrize("case", ["few_rows", "disabled", "autocast", "tracing", "float64"])
def test_falls_back_to_f_linear(case):
    x, weight, bias = _operands(2 * MIN_ROWS)
    if case == "few_rows":
        x = x[: MIN_ROWS // 4]
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    ref = F.linear(x, weight, bias)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_linear_applies(x, weight)
            assert torch.equal(linear(x, weight, bias, onednn=True), F.linear(x, weight, bias))
        return
    if case == "tracing":
        weight, bias = weight.detach(), bias.detach()
        traced = torch.jit.trace(lambda a: linear(a, weight, bias, onednn=True), x.detach())
        assert "mkldnn" not in str(traced.graph)
        assert torch.equal(traced(x.detach()), ref.detach())
        return
    assert torch.equal(linear(x, weight, bias, onednn=case != "disabled"), ref)


def test_linear_module_is_state_dict_compatible_with_nn_linear():
    torch.manual_seed(0)
    ours = Linear(64, 96)
    torch.manual_seed(0)
    reference = nn.Linear(64, 96)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    x = torch.randn(2 * MIN_ROWS, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-4)
    ours.onednn = True
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-4)


def _ran_onednn(out: torch.Tensor) -> bool:
    return "OneDnnLinear" in type(out.grad_fn.next_functions[0][0]).__name__


def test_off_by_default():
    x, weight, bias = _operands(2 * MIN_ROWS)
    assert not Linear(64, 96).onednn
    out = linear(x, weight, bias)
    assert not _ran_onednn(out)
    assert torch.equal(out, F.linear(x, weight, bias))


@pytest.fixture
def fresh_check():
    """Forget the cached capability check before and after the test (it may patch torch)."""
    onednn_linear_available.cache_clear()
    yield
    onednn_linear_available.cache_clear()


def test_capability_check_passes_on_this_torch_in_any_autograd_mode(fresh_check):
    with torch.inference_mode():
        assert onednn_linear_available()  # the probe's backward runs even under inference mode
    x, weight, bias = _operands(2 * MIN_ROWS)
    assert _ran_onednn(linear(x, weight, bias, onednn=True))


def _raise(*args):
    raise RuntimeError("mkldnn_linear: unsupported")


@pytest.mark.parametrize("breakage, reason", [
    ("missing", "has no torch._C._nn.mkldnn_linear"),
    ("raises", "failed (RuntimeError: mkldnn_linear: unsupported)"),
    ("wrong", "gives a different output than F.linear"),
    ("no_onednn", "has no oneDNN"),
])
def test_falls_back_to_f_linear_when_the_private_op_is_missing_or_wrong(
    fresh_check, monkeypatch, caplog, breakage, reason
):
    if breakage == "missing":
        monkeypatch.delattr(torch._C._nn, "mkldnn_linear")
    elif breakage == "raises":
        monkeypatch.setattr(torch._C._nn, "mkldnn_linear", _raise)
    elif breakage == "wrong":
        real = torch._C._nn.mkldnn_linear
        monkeypatch.setattr(torch._C._nn, "mkldnn_linear", lambda x, w, b=None: (real(x, w, b).to_dense() * 2).to_mkldnn())
    else:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    x, weight, bias = _operands(2 * MIN_ROWS)
    with caplog.at_level(logging.WARNING, logger=linear_module.__name__):
        out = linear(x, weight, bias, onednn=True)
        assert torch.equal(out, F.linear(x, weight, bias))
        assert not onednn_linear_applies(x, weight)
        linear(x, weight, bias, onednn=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0] and "F.linear" in warnings[0]  # checked once, said once
