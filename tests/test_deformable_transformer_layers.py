"""The deformable encoder and decoder layers (d2_detr.layers.deformable_transformer)."""
import pytest
import torch
from torch import nn

from d2_detr.layers.box_ops import refine_boxes
from d2_detr.layers.deformable_transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    level_reference_points,
    scale_to_levels,
)

SHAPES = [(4, 6), (2, 3)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_reference_points_are_cell_centres_of_the_unpadded_area():
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [2 / 3, 1.0]]])  # (B=2, L=2, (w, h))
    points = level_reference_points(SHAPES, ratios)
    assert points.shape == (2, 24 + 6, 2, 2)
    # image 0, level 0, cell (row 1, column 4): ((4 + 0.5) / 6, (1 + 0.5) / 4) on every level
    torch.testing.assert_close(points[0, 1 * 6 + 4], torch.tensor([[4.5 / 6, 1.5 / 4]] * 2))
    # image 1 covers 3 x 3 cells of level 0: normalised to them, then scaled to each level's padded map
    centre = torch.tensor([1.5 / 3, 0.5 / 3])  # cell (row 0, column 1) of its 3 x 3 cells
    torch.testing.assert_close(points[1, 1], centre * ratios[1])
    # in level-0 coordinates of the padded map this is the cell's own centre
    torch.testing.assert_close(points[1, 1, 0] * torch.tensor([6.0, 4.0]), torch.tensor([1.5, 0.5]))


def test_scale_to_levels_boxes():
    ratios = torch.tensor([[[0.5, 1.0]]])
    boxes = torch.tensor([[[0.4, 0.4, 0.2, 0.6]]])
    torch.testing.assert_close(scale_to_levels(boxes, ratios), torch.tensor([[[[0.2, 0.4, 0.1, 0.6]]]]))


def _levels(batch=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in SHAPES)
    return torch.randn(batch, total, d, generator=g), torch.randn(batch, total, d, generator=g)


def test_encoder_layer_names_and_residual_structure():
    layer = DeformableEncoderLayer(16, 2, 32, dropout=0.0, num_levels=2, num_points=2).eval()
    assert {n.split(".")[0] for n, _ in layer.named_parameters()} == {"self_attn", "norm1", "linear1", "linear2", "norm2"}
    src, pos = _levels()
    reference = level_reference_points(SHAPES, torch.ones(2, 2, 2))
    out = layer(src, pos, reference, SHAPES)
    attended = layer.self_attn(src + pos, reference, src, SHAPES)
    hidden = layer.norm1(src + attended)
    expected = layer.norm2(hidden + layer.linear2(layer.linear1(hidden).relu()))
    torch.testing.assert_close(out, expected)


def test_encoder_ignores_padded_cells():
    """Values at padded cells do not reach the valid cells' outputs."""
    encoder = DeformableEncoder(DeformableEncoderLayer(16, 2, 32, dropout=0.0, num_levels=2, num_points=2), 2).eval()
    src, pos = _levels(batch=1)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 5] = mask[0, 11] = True  # level 0, last column of rows 0 and 1 (arbitrary cells, for the test)
    changed = src.clone()
    changed[0, mask[0]] += 10
    ratios = torch.ones(1, 2, 2)
    with torch.no_grad():
        a, b = (encoder(x, pos, SHAPES, ratios, mask) for x in (src, changed))
    torch.testing.assert_close(a[0, ~mask[0]], b[0, ~mask[0]])


def test_decoder_layer_order_self_then_cross_then_ffn():
    layer = DeformableDecoderLayer(16, 2, 32, dropout=0.0, num_levels=2, num_points=2).eval()
    names = {n.rsplit(".", 1)[0] for n, _ in layer.named_parameters()}
    assert {"cross_attn.sampling_offsets", "self_attn", "self_attn.out_proj", "norm1", "norm2", "norm3"} <= names
    memory, _ = _levels()
    g = torch.Generator().manual_seed(1)
    tgt, query_pos = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    reference = scale_to_levels(torch.rand(2, 5, 2, generator=g), torch.ones(2, 2, 2))
    mha = nn.MultiheadAttention(16, 2)
    mha.load_state_dict(layer.self_attn.state_dict())  # same parameters as torch's module
    q = (tgt + query_pos).transpose(0, 1)
    x = layer.norm2(tgt + mha(q, q, tgt.transpose(0, 1))[0].transpose(0, 1))
    x = layer.norm1(x + layer.cross_attn(x + query_pos, reference, memory, SHAPES))
    expected = layer.norm3(x + layer.linear2(layer.linear1(x).relu()))
    torch.testing.assert_close(layer(tgt, query_pos, reference, memory, SHAPES), expected, atol=1e-5, rtol=1e-5)


def test_decoder_refinement_feeds_each_layer_the_previous_box_detached():
    decoder = DeformableDecoder(DeformableDecoderLayer(16, 2, 32, dropout=0.0, num_levels=2, num_points=2), 3)
    heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(3))
    memory, _ = _levels()
    g = torch.Generator().manual_seed(2)
    tgt, query_pos, start = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.rand(2, 5, 2)
    ratios = torch.ones(2, 2, 2)
    hs, references = decoder(tgt, start, memory, SHAPES, ratios, query_pos, box_heads=heads)
    assert hs.shape == (3, 2, 5, 16) and references[0] is start
    for layer in range(2):
        torch.testing.assert_close(references[layer + 1], refine_boxes(heads[layer](hs[layer]), references[layer]))
        assert not references[layer + 1].requires_grad
    plain_hs, plain_refs = decoder(tgt, start, memory, SHAPES, ratios, query_pos)
    assert all(r is start for r in plain_refs)
    torch.testing.assert_close(plain_hs[0], hs[0])  # the first layer attends at the same points either way
    assert not torch.allclose(plain_hs[1], hs[1])
