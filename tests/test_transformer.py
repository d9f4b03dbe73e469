"""Tests of DETR's encoder-decoder transformer."""
import math

import pytest
import torch
from detectron2.config import get_cfg

from d2_detr.config import add_detr_config
from d2_detr.layers.attention import ATTENTION_KERNELS
from d2_detr.modeling.registry import build_transformer
from d2_detr.modeling.transformer import DetrTransformer, FusedMultiheadAttention

D, NHEAD, FF = 16, 2, 32
B, H, W, Q = 2, 3, 4, 5


def _small(**kwargs) -> DetrTransformer:
    torch.manual_seed(0)
    args = dict(d_model=D, nhead=NHEAD, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=FF, dropout=0.0)
    args.update(kwargs)
    return DetrTransformer(**args).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(B, D, H, W, generator=g)
    pos = torch.randn(B, D, H, W, generator=g)
    query = torch.randn(Q, D, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[0, :, 3:] = True  # image 0: last column and last row padded
    mask[0, 2:, :] = True
    return src, mask, query, pos


def _expected_keys(enc: int, dec: int, pre_norm: bool) -> set:
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    ffn = [f"{m}.{p}" for m in ("linear1", "linear2") for p in ("weight", "bias")]
    keys = set()
    for n in range(enc):
        keys |= {f"encoder.layers.{n}.self_attn.{a}" for a in attn}
        keys |= {f"encoder.layers.{n}.{f}" for f in ffn}
        keys |= {f"encoder.layers.{n}.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for n in range(dec):
        keys |= {f"decoder.layers.{n}.{m}.{a}" for m in ("self_attn", "multihead_attn") for a in attn}
        keys |= {f"decoder.layers.{n}.{f}" for f in ffn}
        keys |= {f"decoder.layers.{n}.norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    keys |= {"decoder.norm.weight", "decoder.norm.bias"}
    if pre_norm:
        keys |= {"encoder.norm.weight", "encoder.norm.bias"}
    return keys


@pytest.mark.parametrize("intermediate,layers", [(True, 3), (False, 1)])
def test_output_shapes(intermediate, layers):
    model = _small(return_intermediate_dec=intermediate)
    hs, memory = model(*_inputs())
    assert hs.shape == (layers, B, Q, D)
    assert memory.shape == (B, D, H, W)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_parameter_names_match_original_checkpoint(pre_norm):
    model = _small(normalize_before=pre_norm)
    state = model.state_dict()
    assert set(state) == _expected_keys(2, 3, pre_norm)
    assert state["encoder.layers.0.self_attn.in_proj_weight"].shape == (3 * D, D)
    assert state["encoder.layers.1.self_attn.in_proj_bias"].shape == (3 * D,)
    assert state["decoder.layers.2.multihead_attn.out_proj.weight"].shape == (D, D)
    assert state["decoder.layers.0.linear1.weight"].shape == (FF, D)
    assert state["decoder.layers.0.linear2.weight"].shape == (D, FF)


def test_parameter_count_of_detr_r50_transformer():
    d, ff = 256, 2048
    attn = 4 * d * d + 4 * d
    ffn = 2 * d * ff + ff + d
    enc_layer = attn + ffn + 2 * 2 * d
    dec_layer = 2 * attn + ffn + 3 * 2 * d
    expected = 6 * enc_layer + 6 * dec_layer + 2 * d
    # Cross-check with the paper model's 41,524,768 parameters: minus ResNet-50 convs (23,454,912; frozen BN
    # statistics are buffers), input_proj (524,544), class head (23,644), box MLP (132,612), queries (25,600).
    assert expected == 41_524_768 - 23_454_912 - 524_544 - 23_644 - 132_612 - 25_600 == 17_363_456
    model = DetrTransformer()
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in DetrTransformer(normalize_before=True).parameters()) == expected + 2 * d


def test_xavier_init():
    model = DetrTransformer(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128)
    w = model.encoder.layers[0].linear1.weight  # (128, 64): xavier bound sqrt(6 / (64 + 128)) ~ 0.177
    bound = (6 / (64 + 128)) ** 0.5
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.9 * bound  # not the default kaiming bound 1/sqrt(64) = 0.125
    in_proj = model.decoder.layers[0].multihead_attn.in_proj_weight  # (192, 64) as one matrix
    assert in_proj.abs().max() <= (6 / (64 + 192)) ** 0.5


def test_padded_cells_do_not_affect_valid_outputs():
    model = _small(return_intermediate_dec=True)
    src, mask, query, pos = _inputs()
    hs, memory = model(src, mask, query, pos)

    src2, pos2 = src.clone(), pos.clone()
    pad = mask[0]
    src2[0][:, pad] = 100 * torch.randn(D, int(pad.sum()))
    pos2[0][:, pad] = -50.0
    hs2, memory2 = model(src2, mask, query, pos2)
    torch.testing.assert_close(hs2, hs)
    valid = ~pad
    torch.testing.assert_close(memory2[0][:, valid], memory[0][:, valid])
    torch.testing.assert_close(memory2[1], memory[1])

    # Control: changing a valid cell does change the outputs.
    src2[0, :, 0, 0] += 1.0
    hs3, _ = model(src2, mask, query, pos2)
    assert not torch.allclose(hs3[:, 0], hs[:, 0])
    torch.testing.assert_close(hs3[:, 1], hs[:, 1])


def test_result_independent_of_batch_padding():
    """An image alone, unpadded, gives the same result as when padded inside a larger batch."""
    model = _small(return_intermediate_dec=True)
    src, mask, query, pos = _inputs()
    hs, memory = model(src, mask, query, pos)
    hs_alone, memory_alone = model(
        src[:1, :, :2, :3].contiguous(), mask[:1, :2, :3].contiguous(), query, pos[:1, :, :2, :3].contiguous()
    )
    torch.testing.assert_close(hs_alone[:, 0], hs[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory_alone[0], memory[0, :, :2, :3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_norm_applied_to_every_intermediate_output(pre_norm):
    model = _small(return_intermediate_dec=True, normalize_before=pre_norm)
    raw = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: raw.append(out))
    hs, _ = model(*_inputs())
    assert len(raw) == 3
    for l in range(3):
        if pre_norm:  # pre-norm layers return an unnormalised residual stream; hs must still be normalised
            assert (raw[l].var(-1, unbiased=False) - 1).abs().max() > 0.1
        torch.testing.assert_close(hs[l], model.decoder.norm(raw[l]).transpose(0, 1))
        assert hs[l].mean(-1).abs().max() < 1e-5
        assert (hs[l].var(-1, unbiased=False) - 1).abs().max() < 1e-3

    with torch.no_grad():  # a non-identity final norm must show up in every returned layer
        model.decoder.norm.weight.fill_(2.0)
        model.decoder.norm.bias.fill_(0.5)
    hs, _ = model(*_inputs())
    for l in range(3):
        assert hs[l].mean(-1).sub(0.5).abs().max() < 1e-4
        assert (hs[l].var(-1, unbiased=False) - 4).abs().max() < 1e-2

    last_only = _small(return_intermediate_dec=False, normalize_before=pre_norm)
    last_only.load_state_dict(model.state_dict())
    hs_last, _ = last_only(*_inputs())
    assert hs_last.shape[0] == 1
    torch.testing.assert_close(hs_last[0], hs[-1])


def _capture_attention_inputs(module: torch.nn.MultiheadAttention, store: list) -> None:
    module.register_forward_pre_hook(lambda mod, args, kwargs: store.append((args, kwargs)), with_kwargs=True)


def test_positions_added_to_queries_and_keys_only():
    model = _small()
    src, mask, query, pos = _inputs()
    enc_calls, self_calls, cross_calls = [], [], []
    _capture_attention_inputs(model.encoder.layers[0].self_attn, enc_calls)
    _capture_attention_inputs(model.decoder.layers[0].self_attn, self_calls)
    _capture_attention_inputs(model.decoder.layers[1].multihead_attn, cross_calls)
    tgt_after_self_attn = []
    model.decoder.layers[1].norm1.register_forward_hook(lambda mod, args, out: tgt_after_self_attn.append(out))
    model(src, mask, query, pos)

    seq_src = src.flatten(2).permute(2, 0, 1)
    seq_pos = pos.flatten(2).permute(2, 0, 1)
    (q, k, v), kwargs = enc_calls[0]
    torch.testing.assert_close(q, seq_src + seq_pos)
    torch.testing.assert_close(k, seq_src + seq_pos)
    torch.testing.assert_close(v, seq_src)
    assert torch.equal(kwargs["key_padding_mask"], mask.flatten(1))

    (q, k, v), _ = self_calls[0]  # decoder starts from zeros: q = k = query_pos, v = 0
    query_pos = query.unsqueeze(1).expand(Q, B, D)
    torch.testing.assert_close(q, query_pos)
    torch.testing.assert_close(k, query_pos)
    assert torch.count_nonzero(v) == 0

    (q, k, v), kwargs = cross_calls[0]
    memory = model.encoder(seq_src, src_key_padding_mask=mask.flatten(1), pos=seq_pos)
    torch.testing.assert_close(k, memory + seq_pos)
    torch.testing.assert_close(v, memory)
    assert torch.equal(kwargs["key_padding_mask"], mask.flatten(1))
    torch.testing.assert_close(q, tgt_after_self_attn[0] + query_pos)


def test_pre_norm_normalises_attention_inputs():
    model = _small(normalize_before=True)
    src, mask, query, pos = _inputs()
    calls = []
    _capture_attention_inputs(model.encoder.layers[0].self_attn, calls)
    model(src, mask, query, pos)
    seq_src = src.flatten(2).permute(2, 0, 1)
    normed = model.encoder.layers[0].norm1(seq_src)
    (q, _, v), _ = calls[0]
    torch.testing.assert_close(q, normed + pos.flatten(2).permute(2, 0, 1))
    torch.testing.assert_close(v, normed)


def test_deterministic_in_eval_and_dropout_in_train():
    model = _small(dropout=0.5)
    inputs = _inputs()
    hs1, mem1 = model(*inputs)
    hs2, mem2 = model(*inputs)
    assert torch.equal(hs1, hs2) and torch.equal(mem1, mem2)
    model.train()
    hs3, _ = model(*inputs)
    assert not torch.allclose(hs3, hs1)


def test_build_from_config():
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.HIDDEN_DIM = 32
    cfg.MODEL.DETR.NHEADS = 4
    cfg.MODEL.DETR.ENC_LAYERS = 1
    cfg.MODEL.DETR.DEC_LAYERS = 2
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 64
    cfg.MODEL.DETR.PRE_NORM = True
    cfg.MODEL.DETR.DEEP_SUPERVISION = True
    model = build_transformer(cfg)
    assert isinstance(model, DetrTransformer)
    assert model.encoder.norm is not None and len(model.encoder.layers) == 1
    assert model.decoder.return_intermediate and len(model.decoder.layers) == 2
    assert model.decoder.layers[0].linear1.out_features == 64
    assert model.decoder.layers[0].self_attn.num_heads == 4
    assert not model.decoder.layers[0].linear1.onednn and not model.encoder.layers[0].self_attn.onednn_linear
    cfg.MODEL.DETR.ONEDNN_LINEAR = True  # opt-in
    opted_in = build_transformer(cfg)
    assert opted_in.encoder.layers[0].linear2.onednn and opted_in.decoder.layers[1].multihead_attn.onednn_linear
    assert {m.kernel for m in model.modules() if isinstance(m, FusedMultiheadAttention)} == {"sdpa"}
    cfg.MODEL.DETR.ATTENTION_KERNEL = "matmul"  # opt-in
    kernels = [m.kernel for m in build_transformer(cfg).modules() if isinstance(m, FusedMultiheadAttention)]
    assert kernels == ["matmul"] * 5  # 1 encoder layer, 2 decoder layers with 2 attentions each
    cfg.MODEL.DETR.NHEADS = 5
    with pytest.raises(ValueError, match="divisible"):
        build_transformer(cfg)


# ---------------------------------------------------------------- fused attention


def _explicit_attention(attn: FusedMultiheadAttention, query, key, value, key_padding_mask=None):
    """softmax(q k^T / sqrt(head_dim), padded keys excluded) v, written out with the attention weights."""
    d, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = query @ w[:d].T + b[:d], key @ w[d : 2 * d].T + b[d : 2 * d], value @ w[2 * d :].T + b[2 * d :]

    def heads(x):  # (N, B, d) -> (B, h, N, d / h)
        return x.reshape(x.shape[0], x.shape[1], h, d // h).permute(1, 2, 0, 3)

    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // h)  # (B, h, L, S)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = logits.softmax(-1) @ heads(v)  # (B, h, L, d / h)
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], d))


def _attention_inputs(self_attention: bool):
    g = torch.Generator().manual_seed(2)
    query = torch.randn(7, B, D, generator=g, requires_grad=True)
    key = query if self_attention else torch.randn(11, B, D, generator=g, requires_grad=True)
    value = torch.randn(key.shape[0], B, D, generator=g, requires_grad=True)
    mask = torch.zeros(B, key.shape[0], dtype=torch.bool)
    mask[0, -3:] = True  # image 0: its last 3 keys are padding
    return query, key, value, mask


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("self_attention", [True, False])
def test_fused_attention_equals_explicit_softmax_attention(self_attention, kernel):
    torch.manual_seed(0)
    attn = FusedMultiheadAttention(D, NHEAD, dropout=0.3, kernel=kernel).eval()
    inputs = _attention_inputs(self_attention)
    fused = attn(*inputs[:3], key_padding_mask=inputs[3])
    explicit = _explicit_attention(attn, *inputs)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)

    # Gradients too (training mode without dropout), with respect to the inputs and every parameter.
    attn = FusedMultiheadAttention(D, NHEAD, dropout=0.0, kernel=kernel).train()
    leaves = list(dict.fromkeys(inputs[:3])) + list(attn.parameters())  # query is key: once
    grads_fused = torch.autograd.grad(attn(*inputs[:3], key_padding_mask=inputs[3]).square().sum(), leaves)
    grads_explicit = torch.autograd.grad(_explicit_attention(attn, *inputs).square().sum(), leaves)
    for got, expected in zip(grads_fused, grads_explicit):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_kernels_agree_under_bfloat16_autocast_with_a_mask():
    """Both kernels under CPU bfloat16 autocast, with a padding mask and a (L, S) attention mask, stay within
    bfloat16 rounding of float32 attention; the matmul kernel's softmax runs in float32."""
    query, key, value, padding = _attention_inputs(self_attention=False)
    attn_mask = torch.zeros(query.shape[0], key.shape[0], dtype=torch.bool)
    attn_mask[:3, :4] = True  # the first 3 queries do not see the first 4 keys
    torch.manual_seed(0)
    attn = FusedMultiheadAttention(D, NHEAD).eval()
    expected = attn(query, key, value, key_padding_mask=padding, attn_mask=attn_mask)
    for kernel in ATTENTION_KERNELS:
        attn.kernel = kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(query, key, value, key_padding_mask=padding, attn_mask=attn_mask)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
    attn.kernel = "matmul"
    masked = attn(query, key, value, attn_mask=attn_mask)
    key = key.clone()
    key[:4] += 10.0  # keys the first 3 queries do not see: their outputs do not change
    changed = attn(query, key, value, attn_mask=attn_mask)
    torch.testing.assert_close(changed[:3], masked[:3])
    assert not torch.allclose(changed[3:], masked[3:])


def test_unknown_attention_kernel_is_refused_with_the_config_key():
    with pytest.raises(ValueError, match="MODEL.DETR.ATTENTION_KERNEL"):
        FusedMultiheadAttention(D, NHEAD, kernel="flash")


@pytest.mark.parametrize("self_attention", [True, False])
def test_fused_attention_is_nn_multihead_attention(self_attention):
    """Same parameters, initialisation (same seed, same values) and outputs as nn.MultiheadAttention."""
    torch.manual_seed(3)
    reference = torch.nn.MultiheadAttention(D, NHEAD, dropout=0.1).eval()
    torch.manual_seed(3)
    attn = FusedMultiheadAttention(D, NHEAD, dropout=0.1).eval()
    assert list(attn.state_dict()) == list(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(attn.state_dict()[name], value), name
    query, key, value, mask = _attention_inputs(self_attention)
    expected, weights = reference(query, key, value, key_padding_mask=mask)
    torch.testing.assert_close(attn(query, key, value, key_padding_mask=mask), expected, rtol=1e-5, atol=1e-6)
    assert weights[0, :, -3:].abs().max() == 0  # the reference masks image 0's padded keys too


def test_transformer_never_computes_attention_weights_at_inference():
    """At inference every attention goes through a fused kernel: no softmax, no batched matrix product."""
    model = _small(return_intermediate_dec=True)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        model(*_inputs())
    ops = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert not ops & {"aten::softmax", "aten::_softmax", "aten::_safe_softmax", "aten::bmm", "aten::baddbmm"}, ops


def test_onednn_linear_gives_the_same_outputs_and_gradients():
    """ONEDNN_LINEAR=True (products through oneDNN once there are enough rows) against F.linear, in training."""
    from d2_detr.layers.linear import MIN_ROWS

    g = torch.Generator().manual_seed(3)
    h, w = 16, MIN_ROWS // 16  # B * h * w = 2 * MIN_ROWS encoder rows: the oneDNN path applies
    src, pos = torch.randn(B, D, h, w, generator=g), torch.randn(B, D, h, w, generator=g)
    query = torch.randn(Q, D, generator=g)
    mask = torch.zeros(B, h, w, dtype=torch.bool)
    mask[1, :, w // 2 :] = True
    results = []
    for onednn in (True, False):
        model = _small(onednn_linear=onednn).train()
        hs, memory = model(src, mask, query, pos)
        (hs.square().sum() + memory.square().sum()).backward()
        results.append((hs, memory, [p.grad for p in model.parameters()]))
    (hs1, mem1, grads1), (hs2, mem2, grads2) = results
    torch.testing.assert_close(hs1, hs2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mem1, mem2, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
