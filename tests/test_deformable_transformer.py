"""DeformableTransformer (d2_detr.modeling.deformable_transformer): queries, proposals, valid ratios, config."""
import math

import pytest
import torch
from torch import nn

from d2_detr.layers.deformable_attention import MultiScaleDeformableAttention
from d2_detr.modeling.deformable_transformer import DeformableTransformer, encoder_proposals, valid_ratios
from d2_detr.modeling.registry import build_transformer

from .conftest import REPO_DIR, load_config

SHAPES = [(6, 8), (3, 4)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _masks(valid_hw_per_image, shapes=SHAPES):
    """Padding masks of each level for images covering the top-left (h, w) cells of level 0 (halved, rounded up,
    at each coarser level)."""
    masks = []
    for level, (height, width) in enumerate(shapes):
        mask = torch.ones(len(valid_hw_per_image), height, width, dtype=torch.bool)
        for i, (h, w) in enumerate(valid_hw_per_image):
            mask[i, : -(-h // 2**level), : -(-w // 2**level)] = False
        masks.append(mask)
    return masks


def _inputs(masks, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(len(masks[0]), d, h, w, generator=g) for h, w in SHAPES]
    pos = [torch.randn(len(masks[0]), d, h, w, generator=g) for h, w in SHAPES]
    return srcs, masks, pos


def _transformer(**kwargs):
    torch.manual_seed(0)
    args = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                num_feature_levels=2, enc_n_points=2, dec_n_points=2)
    return DeformableTransformer(**{**args, **kwargs}).eval()


def test_valid_ratios():
    ratios = valid_ratios(_masks([(6, 8), (3, 2)]))
    assert ratios.shape == (2, 2, 2)
    torch.testing.assert_close(ratios[0], torch.ones(2, 2))
    torch.testing.assert_close(ratios[1], torch.tensor([[2 / 8, 3 / 6], [1 / 4, 2 / 3]]))


def test_encoder_proposals_centres_sizes_and_usability():
    proposals, usable = encoder_proposals(_masks([(6, 8), (3, 2)]))
    assert proposals.shape == (2, 6 * 8 + 3 * 4, 4) and usable.shape == (2, 60, 1)
    boxes = proposals.sigmoid()
    # image 0, level 0, cell (row 1, column 2): centre ((2 + 0.5) / 8, (1 + 0.5) / 6), size 0.05
    torch.testing.assert_close(boxes[0, 1 * 8 + 2], torch.tensor([2.5 / 8, 1.5 / 6, 0.05, 0.05]))
    # image 1 covers 3 x 2 cells of level 0: centres normalised by them; level 1 cell (0, 0): size 0.1
    torch.testing.assert_close(boxes[1, 1 * 8 + 1], torch.tensor([1.5 / 2, 1.5 / 3, 0.05, 0.05]))
    torch.testing.assert_close(boxes[1, 48], torch.tensor([0.5 / 1, 0.5 / 2, 0.1, 0.1]))
    assert usable[0].all()  # no padding, every centre inside (0.01, 0.99)
    assert usable[1, :, 0].sum() == 3 * 2 + 2 * 1
    assert torch.isinf(proposals[1, 5]).all()  # padded cell (row 0, column 5)


@pytest.mark.parametrize("two_stage", [False, True])
def test_outputs_and_references(two_stage):
    transformer = _transformer(two_stage=two_stage, two_stage_num_proposals=5)
    srcs, masks, pos = _inputs(_masks([(6, 8), (4, 5)]))
    heads = (nn.Linear(32, 3), nn.Linear(32, 4)) if two_stage else None
    query_embed = None if two_stage else torch.randn(5, 64)
    out = transformer(srcs, masks, pos, query_embed, proposal_heads=heads)
    assert out["hs"].shape == (2, 2, 5, 32)
    references = out["references"]
    assert len(references) == 2 and references[0].shape == (2, 5, 4 if two_stage else 2)
    assert references[1] is references[0]  # no refinement: every layer attends at the same references
    if two_stage:
        assert out["enc_logits"].shape == (2, 60, 3) and out["enc_boxes"].shape == (2, 60, 4)
    else:
        torch.testing.assert_close(references[0][0], transformer.reference_points(query_embed[:, :32]).sigmoid())


@pytest.mark.parametrize("padding_invariant", [True, False])
def test_two_stage_never_picks_padded_cells(padding_invariant):
    """A proposal head scoring encoder outputs of zeros (what padded cells hold) highest: the padded image's
    queries still come from its own cells; with ``padding_invariant=False``, as the original, they come from padded
    cells, whose boxes are all 1."""

    class ZeroRowsFirst(nn.Module):
        def forward(self, memory):
            return torch.where(memory.abs().sum(-1, keepdim=True) == 0, 100.0, memory[..., :1])

    transformer = _transformer(two_stage=True, two_stage_num_proposals=6, padding_invariant=padding_invariant)
    transformer.enc_output_norm = nn.Identity()  # zeroed cells stay all-zero rows
    nn.init.zeros_(transformer.enc_output.bias)
    srcs, masks, pos = _inputs(_masks([(6, 8), (3, 4)]))
    out = transformer(srcs, masks, pos, proposal_heads=(ZeroRowsFirst(), nn.Linear(32, 4)))
    if padding_invariant:
        assert (out["references"][0][1] < 1).all()
    else:
        assert (out["references"][0][1] == 1).all()


def test_two_stage_needs_its_heads_and_enough_cells():
    transformer = _transformer(two_stage=True, two_stage_num_proposals=61)
    srcs, masks, pos = _inputs(_masks([(6, 8)]))
    with pytest.raises(ValueError, match="proposal heads"):
        transformer(srcs, masks, pos)
    with pytest.raises(ValueError, match="keeps 61 proposals"):
        transformer(srcs, masks, pos, proposal_heads=(nn.Linear(32, 3), nn.Linear(32, 4)))
    with pytest.raises(ValueError, match="learned query embedding"):
        _transformer()(srcs, masks, pos)
    with pytest.raises(ValueError, match="built for 2 feature levels, got 1"):
        _transformer()(srcs[:1], masks[:1], pos[:1], torch.zeros(5, 64))


def test_initialisation_as_the_original():
    transformer = _transformer()
    torch.testing.assert_close(transformer.reference_points.bias, torch.zeros(2))
    for module in transformer.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            assert not module.sampling_offsets.weight.any() and not module.attention_weights.weight.any()
    layer = transformer.decoder.layers[0]
    bound = math.sqrt(6 / (32 + 64))
    assert layer.linear1.weight.abs().max() <= bound  # Xavier-uniform
    assert transformer.level_embed.std() > 0.5  # standard normal


def test_built_from_config():
    cfg = load_config(f"{REPO_DIR}/configs/deformable_detr_r50_two_stage.yaml", "MODEL.DETR.ENC_LAYERS", 1,
                      "MODEL.DETR.DEC_LAYERS", 1)
    transformer = build_transformer(cfg)
    assert isinstance(transformer, DeformableTransformer) and transformer.two_stage
    assert transformer.two_stage_num_proposals == 300 and transformer.num_feature_levels == 4
    layer = transformer.encoder.layers[0]
    assert layer.linear1.out_features == 1024 and layer.self_attn.num_points == 4
    assert transformer.padding_invariant and transformer.decoder.layers[0].self_attn.kernel == "sdpa"
    cfg = load_config(f"{REPO_DIR}/configs/deformable_detr_r50.yaml", "MODEL.DEFORMABLE_DETR.PADDING_INVARIANT", False,
                      "MODEL.DETR.ATTENTION_KERNEL", "matmul")
    transformer = build_transformer(cfg)
    assert not transformer.padding_invariant and transformer.decoder.layers[-1].self_attn.kernel == "matmul"
