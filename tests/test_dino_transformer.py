"""DinoTransformer: query selection (mixed, pure, static), denoising queries placed first, padded cells never
selected."""
import pytest
import torch

from d2_detr.modeling.deformable_detr import prediction_heads
from d2_detr.modeling.denoising import DenoisingQueries, denoising_attention_mask
from d2_detr.modeling.dino_transformer import DinoTransformer

from .conftest import load_config
from .test_dino import TINY_DINO


def _inputs(batch=1, padded=False):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    srcs = [torch.randn(batch, 32, h, w, generator=g) for h, w in shapes]
    masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in shapes]
    if padded:
        for mask in masks:
            mask[0, :, mask.shape[2] // 2 + mask.shape[2] % 2:] = True
    pos = [torch.randn(batch, 32, h, w, generator=g) for h, w in shapes]
    return srcs, masks, pos


def _transformer(query_selection="mixed", num_queries=6):
    torch.manual_seed(0)
    return DinoTransformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32,
                           enc_n_points=2, dec_n_points=2, num_queries=num_queries,
                           query_selection=query_selection).eval()


@pytest.mark.parametrize("query_selection", ["mixed", "pure"])
def test_queries_selected_by_best_class_logit(query_selection):
    transformer = _transformer(query_selection)
    heads = prediction_heads(32, 3)
    torch.nn.init.normal_(heads[0].weight)
    captured = {}
    transformer.decoder.register_forward_pre_hook(lambda m, args: captured.update(tgt=args[0], reference=args[1]))
    with torch.no_grad():
        out = transformer(*_inputs(), box_head=heads[1], proposal_heads=heads)
    enc_logits, enc_boxes = out["enc_logits"], out["enc_boxes"]  # (1, 6, 3), (1, 6, 4): the selected cells
    assert enc_logits.shape == (1, 6, 3) and enc_boxes.shape == (1, 6, 4)
    scores = enc_logits.max(-1).values[0]
    assert torch.all(scores[:-1] >= scores[1:])  # best first
    torch.testing.assert_close(captured["reference"], enc_boxes)  # reference boxes = the selected boxes
    if query_selection == "mixed":
        torch.testing.assert_close(captured["tgt"][0], transformer.tgt_embed.weight)
    else:
        assert not hasattr(transformer, "tgt_embed")


def test_static_queries_are_learned_anchor_boxes():
    transformer = _transformer("static")
    captured = {}
    transformer.decoder.register_forward_pre_hook(lambda m, args: captured.update(reference=args[1]))
    with torch.no_grad():
        out = transformer(*_inputs(batch=2), box_head=prediction_heads(32, 3)[1])
    assert "enc_logits" not in out and not hasattr(transformer, "enc_output")
    torch.testing.assert_close(captured["reference"][1], transformer.refpoint_embed.weight.sigmoid())


def test_denoising_queries_come_first_with_their_mask():
    transformer = _transformer()
    heads = prediction_heads(32, 3)
    dn = DenoisingQueries(torch.randn(1, 4, 32), torch.randn(1, 4, 4), denoising_attention_mask(2, 2, 6), 2, 2)
    captured = {}
    transformer.decoder.register_forward_pre_hook(
        lambda m, args: captured.update(tgt=args[0], reference=args[1], mask=args[7]))
    with torch.no_grad():
        out = transformer(*_inputs(), box_head=heads[1], proposal_heads=heads, denoising=dn)
    assert out["hs"].shape == (2, 1, 10, 32) and len(out["references"]) == 3
    torch.testing.assert_close(captured["tgt"][:, :4], dn.content)
    torch.testing.assert_close(captured["reference"][:, :4], dn.reference_logits.sigmoid())
    assert captured["mask"] is dn.attn_mask


def test_padded_cells_are_never_selected():
    transformer = _transformer(num_queries=30)  # of the 32 + 8 + 2 + 1 unpadded cells of the padded image
    heads = prediction_heads(32, 3)
    srcs, masks, pos = _inputs(batch=2, padded=True)
    captured = {}
    transformer.decoder.register_forward_pre_hook(lambda m, args: captured.update(reference=args[1]))
    with torch.no_grad():
        transformer(srcs, masks, pos, box_head=heads[1], proposal_heads=heads)
    # an unpadded proposal's centre lies inside the image (x < 1 of its unpadded width), a padded one's beyond it
    assert (captured["reference"][0, :, 0] < 1).all()


def test_from_config():
    transformer = DinoTransformer(load_config(TINY_DINO, "MODEL.DINO.LOOK_FORWARD_TWICE", False,
                                              "MODEL.DETR.ATTENTION_KERNEL", "matmul"))
    assert transformer.num_queries == 10 and transformer.query_selection == "mixed"
    assert {layer.self_attn.kernel for layer in transformer.decoder.layers} == {"matmul"}
    assert not transformer.decoder.look_forward_twice and transformer.two_stage
    assert transformer.decoder.layers[0].cross_attn.num_points == 2 and transformer.num_feature_levels == 4
