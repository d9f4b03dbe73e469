"""Tests of the sine and learned position encodings."""
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from d2_detr.config import add_detr_config
from d2_detr.layers.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, sine_box_embedding
from d2_detr.modeling.registry import build_position_encoding


def _sine_reference(valid: np.ndarray, num_pos_feats: int, offset: float = 0.0) -> np.ndarray:
    """The DETR sine formula written out cell by cell for one image; valid: (H, W) bool. Returns (2F, H, W).
    ``offset`` is added to the positions before normalising (Deformable DETR: -0.5)."""
    h, w = valid.shape
    out = np.zeros((2 * num_pos_feats, h, w))
    for r in range(h):
        for c in range(w):
            y = sum(valid[rr, c] for rr in range(r + 1))
            y_last = sum(valid[rr, c] for rr in range(h))
            x = sum(valid[r, cc] for cc in range(c + 1))
            x_last = sum(valid[r, cc] for cc in range(w))
            y = (y + offset) / (y_last + 1e-6) * 2 * math.pi
            x = (x + offset) / (x_last + 1e-6) * 2 * math.pi
            for i in range(num_pos_feats):
                dim = 10000 ** (2 * (i // 2) / num_pos_feats)
                trig = math.sin if i % 2 == 0 else math.cos
                out[i, r, c] = trig(y / dim)
                out[num_pos_feats + i, r, c] = trig(x / dim)
    return out


def test_sine_matches_formula_with_padded_column():
    mask = torch.tensor([[[False, False, True], [False, False, True]]])  # (1, 2, 3), last column padded
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)
    assert pos.shape == (1, 8, 2, 3)
    assert pos.dtype == torch.float32
    expected = _sine_reference(~mask[0].numpy(), 4)
    np.testing.assert_allclose(pos[0].numpy(), expected, atol=1e-5)


def test_sine_y_half_first_and_known_values():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=4)(mask)[0]
    # Channel 0 = sin(y_norm): y varies over rows only, x over columns only.
    assert torch.allclose(pos[0, :, 0], pos[0, :, 2])
    assert not torch.allclose(pos[0, 0, :], pos[0, 1, :])
    assert torch.allclose(pos[4, 0, :], pos[4, 1, :])
    # Row 0 of 2: y = 1/2 * 2pi = pi; column 0 of 3: x = 2pi/3; channel 2 divides by 10000 ** (2/4) = 100.
    assert pos[0, 0, 0].item() == pytest.approx(math.sin(math.pi), abs=1e-5)
    assert pos[1, 0, 0].item() == pytest.approx(math.cos(math.pi), abs=1e-5)
    assert pos[2, 0, 0].item() == pytest.approx(math.sin(math.pi / 100), abs=1e-5)
    assert pos[4, 0, 0].item() == pytest.approx(math.sin(2 * math.pi / 3), abs=1e-5)
    assert pos[5, 0, 0].item() == pytest.approx(math.cos(2 * math.pi / 3), abs=1e-5)


def test_sine_valid_cells_independent_of_padding():
    """Each image's valid corner is encoded exactly like the same-sized unpadded map, whatever the batch."""
    padded = torch.ones(2, 3, 4, dtype=torch.bool)
    padded[0, :2, :3] = False
    padded[1, :3, :2] = False
    enc = PositionEmbeddingSine(num_pos_feats=6)
    out = enc(padded)
    torch.testing.assert_close(out[0, :, :2, :3], enc(torch.zeros(1, 2, 3, dtype=torch.bool))[0])
    torch.testing.assert_close(out[1, :, :3, :2], enc(torch.zeros(1, 3, 2, dtype=torch.bool))[0])
    for b in range(2):
        np.testing.assert_allclose(out[b].numpy(), _sine_reference(~padded[b].numpy(), 6), atol=1e-5)


def test_sine_rejects_odd_features():
    with pytest.raises(ValueError):
        PositionEmbeddingSine(num_pos_feats=5)


def test_learned_shape_and_x_half_first():
    enc = PositionEmbeddingLearned(num_pos_feats=4)
    assert set(dict(enc.named_parameters())) == {"row_embed.weight", "col_embed.weight"}
    assert enc.row_embed.weight.shape == (50, 4) and enc.col_embed.weight.shape == (50, 4)
    w = enc.row_embed.weight
    assert (w >= 0).all() and (w < 1).all()
    pos = enc(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 8, 3, 5)
    for r in range(3):
        for c in range(5):
            torch.testing.assert_close(pos[1, :4, r, c], enc.col_embed.weight[c])
            torch.testing.assert_close(pos[1, 4:, r, c], enc.row_embed.weight[r])
    pos.sum().backward()
    assert enc.col_embed.weight.grad[:5].abs().sum() > 0
    assert enc.col_embed.weight.grad[5:].abs().sum() == 0


def test_learned_rejects_too_large_map():
    enc = PositionEmbeddingLearned(num_pos_feats=4, num_positions=50)
    enc(torch.zeros(1, 50, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds"):
        enc(torch.zeros(1, 51, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds"):
        enc(torch.zeros(1, 3, 51, dtype=torch.bool))


@pytest.mark.parametrize("name,cls", [("sine", PositionEmbeddingSine), ("learned", PositionEmbeddingLearned)])
def test_build_from_config(name, cls):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.HIDDEN_DIM = 64
    cfg.MODEL.DETR.POSITION_EMBEDDING = name
    enc = build_position_encoding(cfg)
    assert type(enc) is cls
    assert enc(torch.zeros(1, 2, 3, dtype=torch.bool)).shape == (1, 64, 2, 3)
    cfg.MODEL.DETR.POSITION_EMBEDDING = cls.__name__
    assert type(build_position_encoding(cfg)) is cls


def test_sine_offset_puts_positions_at_cell_centres():
    mask = torch.tensor([[[False, False, True], [False, False, True]]])
    pos = PositionEmbeddingSine(num_pos_feats=4, offset=-0.5)(mask)
    expected = _sine_reference(~mask[0].numpy(), 4, offset=-0.5)
    # valid cells (padded ones hold huge angles whose float32 sines differ from float64's)
    np.testing.assert_allclose(pos[0, :, :, :2].numpy(), expected[:, :, :2], atol=1e-5)
    assert not torch.allclose(pos, PositionEmbeddingSine(num_pos_feats=4)(mask))


def test_sine_offset_from_config():
    cfg = get_cfg()
    add_detr_config(cfg)
    assert build_position_encoding(cfg).offset == 0.0  # DETR
    cfg.MODEL.DETR.POSITION_EMBEDDING_OFFSET = -0.5
    assert build_position_encoding(cfg).offset == -0.5


def test_sine_box_embedding_coordinate_by_coordinate():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    emb = sine_box_embedding(boxes, num_pos_feats=4)
    assert emb.shape == (1, 16)
    for c, value in enumerate(boxes[0].tolist()):
        for i in range(4):
            angle = value * 2 * math.pi / 10000 ** (2 * (i // 2) / 4)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert emb[0, 4 * c + i].item() == pytest.approx(expected, abs=1e-6)
