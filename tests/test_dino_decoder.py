"""DinoDecoder: positional queries from the reference boxes, shared-head refinement, look forward twice."""
import math

import pytest
import torch

from d2_detr.layers.box_ops import inverse_sigmoid
from d2_detr.layers.deformable_transformer import DeformableDecoderLayer
from d2_detr.layers.dino_decoder import DinoDecoder, box_query_pos_embedding
from d2_detr.layers.mlp import MLP


def test_box_embedding_is_the_sine_of_cy_cx_w_h_in_turn():
    boxes = torch.tensor([[[0.2, 0.7, 0.1, 0.4]]])
    embedding = box_query_pos_embedding(boxes, d_model=8)  # 4 features per coordinate
    i = torch.arange(4)
    expected = []
    for coord in (0.7, 0.2, 0.1, 0.4):
        angles = coord * 2 * math.pi / 10000 ** (2 * (i // 2) / 4)
        expected.append(torch.where(i % 2 == 0, angles.sin(), angles.cos()))
    torch.testing.assert_close(embedding[0, 0], torch.cat(expected))


def _decoder(look_forward_twice):
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(16, 2, 32, 0.0, num_levels=2, num_points=2)
    return DinoDecoder(layer, 2, 16, look_forward_twice), MLP(16, 16, 4, 3)


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_references_refined_by_the_shared_head(look_forward_twice):
    decoder, box_head = _decoder(look_forward_twice)
    tgt, reference = torch.randn(1, 3, 16), torch.rand(1, 3, 4) * 0.5 + 0.2
    memory, shapes, ratios = torch.randn(1, 4 * 4 + 2 * 2, 16), [(4, 4), (2, 2)], torch.ones(1, 2, 2)
    outputs = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, i, o: outputs.append(o))
    hs, references = decoder(tgt, reference, memory, shapes, ratios, box_head)
    assert hs.shape == (2, 1, 3, 16) and len(references) == 3 and references[0] is reference
    for i, output in enumerate(outputs):
        torch.testing.assert_close(hs[i], decoder.norm(output))  # shared LayerNorm on every layer's output
        expected = (box_head(output) + inverse_sigmoid(references[i], 1e-3)).sigmoid()  # from the un-normed output
        torch.testing.assert_close(references[i + 1], expected)
        assert references[i + 1].requires_grad == look_forward_twice


def test_look_forward_twice_lets_a_layer_box_loss_train_the_previous_layer_through_its_box():
    """The gradient of layer 2's box (refining layer 1's box) reaches layer 1's output only through that box."""
    for look_forward_twice, reaches in ((True, True), (False, False)):
        decoder, box_head = _decoder(look_forward_twice)
        reference = torch.rand(1, 3, 4) * 0.5 + 0.2
        memory, shapes, ratios = torch.randn(1, 20, 16), [(4, 4), (2, 2)], torch.ones(1, 2, 2)
        _, references = decoder(torch.randn(1, 3, 16), reference, memory, shapes, ratios, box_head)
        deltas = torch.zeros(1, 3, 4, requires_grad=True)  # layer 2's head output, held fixed
        box = (deltas + inverse_sigmoid(references[1], 1e-3)).sigmoid()
        box.sum().backward()
        grad = box_head.layers[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches


@pytest.mark.parametrize("padding_invariant", [True, False])
def test_positional_query_embeds_the_box_of_the_unpadded_area_or_as_the_original_of_the_padded_level(
        padding_invariant, monkeypatch):
    """An image covering (0.5, 0.75) of the padded first level: the embedded box is the reference itself, or, as the
    original, the reference scaled to the padded level (cx and w by 0.5, cy and h by 0.75)."""
    import d2_detr.layers.dino_decoder as dino_decoder

    embedded = []
    embed = dino_decoder.box_query_pos_embedding
    monkeypatch.setattr(dino_decoder, "box_query_pos_embedding",
                        lambda boxes, d: embedded.append(boxes) or embed(boxes, d))
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(16, 2, 32, 0.0, num_levels=2, num_points=2)
    decoder = DinoDecoder(layer, 1, 16, padding_invariant=padding_invariant)
    reference = torch.rand(1, 3, 4) * 0.5 + 0.2
    ratios = torch.tensor([[[0.5, 0.75], [0.5, 0.75]]])
    decoder(torch.randn(1, 3, 16), reference, torch.randn(1, 20, 16), [(4, 4), (2, 2)], ratios, MLP(16, 16, 4, 3))
    scale = torch.tensor([0.5, 0.75, 0.5, 0.75])
    torch.testing.assert_close(embedded[0], reference if padding_invariant else reference * scale)
