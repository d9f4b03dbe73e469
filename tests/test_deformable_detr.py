"""The DeformableDetr meta-architecture: construction, parameter counts, training step, inference, bad input."""
import os

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from d2_detr.layers.padding_mask import interpolated_padding_mask
from d2_detr.layers.position_encoding import PositionEmbeddingSine
from d2_detr.modeling import DeformableDetr
from d2_detr.modeling.deformable_transformer import DeformableTransformer
from d2_detr.modeling.focal import FocalHungarianMatcher, FocalSetCriterion
from d2_detr.modeling.inference import select_batch_predictions

from .conftest import REPO_DIR, load_config
from .model_helpers import assert_same_alone_and_batched, shift_batchnorm_statistics
from .model_helpers import gt_instances as _instances
from .model_helpers import random_image as _image

TINY_DEFORMABLE = os.path.join(REPO_DIR, "tests", "configs", "tiny_deformable.yaml")
VARIANTS = {
    "base": [],
    "refine": ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True],
    "two_stage": ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True, "MODEL.DEFORMABLE_DETR.TWO_STAGE", True],
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny_model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY_DEFORMABLE, "MODEL.DETR.DROPOUT", 0.0, *opts))


def _batch():
    return [{"image": _image(64, 96, 1), "instances": _instances(64, 96, [[4, 4, 40, 30], [50, 20, 90, 60]], [1, 3])},
            {"image": _image(96, 64, 2), "instances": _instances(96, 64, [], [])}]


@pytest.mark.parametrize("config,expected", [("deformable_detr_r50.yaml", 40_069_665),
                                             ("deformable_detr_r50_refine.yaml", 40_849_660),
                                             ("deformable_detr_r50_two_stage.yaml", 41_181_529)])
def test_r50_parameter_counts_equal_the_original(config, expected):
    """With the original 91 COCO class rows, shared heads counted once: the original models' counts."""
    cfg = load_config(os.path.join(REPO_DIR, "configs", config), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                      "MODEL.DETR.NUM_CLASSES", 91)
    assert sum(p.numel() for p in build_model(cfg).parameters()) == expected


def test_built_from_plain_arguments():
    cfg = load_config(TINY_DEFORMABLE)
    transformer = DeformableTransformer(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
                                        dim_feedforward=64, num_feature_levels=4, enc_n_points=2, dec_n_points=2)
    model = DeformableDetr(
        backbone=build_backbone(cfg), in_features=["res3", "res4", "res5"],
        position_encoding=PositionEmbeddingSine(32, offset=-0.5), transformer=transformer,
        criterion=FocalSetCriterion(num_classes=5, matcher=FocalHungarianMatcher()), num_classes=5, num_queries=7,
        pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), test_topk=4).eval()
    assert model.level_strides == [8, 16, 32, 64]
    assert model.query_embed.weight.shape == (7, 128) and model.class_embed[0].out_features == 5
    (out,) = model([{"image": _image(64, 96, 0)}])
    assert len(out["instances"]) == 4 and out["instances"].image_size == (64, 96)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_built_from_config_with_heads_as_the_original(variant):
    model = tiny_model(*VARIANTS[variant])
    refine, two_stage = variant != "base", variant == "two_stage"
    assert model.with_box_refine == refine and model.two_stage == two_stage
    assert len(model.class_embed) == len(model.bbox_embed) == 2 + two_stage
    assert (model.class_embed[0] is model.class_embed[1]) == (not refine)
    assert hasattr(model, "query_embed") != two_stage
    assert hasattr(model.transformer, "reference_points") != two_stage
    prior = model.class_embed[0].bias
    torch.testing.assert_close(prior.sigmoid(), torch.full_like(prior, 0.01))
    size_bias = [head.layers[-1].bias[2:].tolist() for head in model.bbox_embed]
    assert size_bias[0] == ([0.0, 0.0] if two_stage else [-2.0, -2.0])
    assert all(b == [0.0, 0.0] for b in size_bias[1:]) or not refine
    keys = model.state_dict().keys()
    assert {"input_proj.3.0.weight", "input_proj.3.1.weight", "transformer.level_embed",
            "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
            "transformer.decoder.layers.1.cross_attn.attention_weights.bias",
            "transformer.decoder.layers.0.self_attn.in_proj_weight", "class_embed.1.weight",
            "bbox_embed.1.layers.2.bias"} <= set(keys)
    assert ("transformer.enc_output.weight" in keys) == two_stage and ("transformer.pos_trans.weight" in keys) == two_stage


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_losses_and_gradients(variant):
    model = tiny_model(*VARIANTS[variant]).train()
    with EventStorage() as storage:
        losses = model(_batch())
        assert set(storage.latest()) == {"class_error", "cardinality_error"}
    names = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    if variant == "two_stage":
        names |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == names and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    attention = model.transformer.decoder.layers[0].cross_attn
    assert attention.sampling_offsets.weight.grad.abs().sum() > 0
    assert model.input_proj[3][0].weight.grad.abs().sum() > 0  # the extra level is trained
    assert model.backbone.res3[0].conv1.weight.grad is not None
    if variant == "two_stage":
        assert model.transformer.enc_output.weight.grad.abs().sum() > 0


def test_loss_decreases_on_fixed_batch():
    model = tiny_model("MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    with EventStorage():
        for _ in range(25):
            loss = sum(model(_batch()).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(loss.item())
    assert totals[-1] < 0.7 * totals[0], totals


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detections_do_not_depend_on_batch_neighbours(variant):
    """With the real (tiny) ResNet with BatchNorm shifts (padding does not stay zero through it) and the input
    projections' GroupNorm: an image's outputs are the same alone and in a padded batch with a larger image."""
    model = tiny_model(*VARIANTS[variant], "MODEL.RESNETS.NORM", "BN").eval()
    shift_batchnorm_statistics(model.backbone)
    assert_same_alone_and_batched(model, _image(72, 100, 8), _image(130, 90, 9), atol=1e-4, image_first=False)


def test_padding_invariant_false_gives_the_original_interpolated_masks():
    """MODEL.DEFORMABLE_DETR.PADDING_INVARIANT False: every level's mask is the padded batch's pixel mask
    interpolated (the original), which for a batch of one image marks nothing, as the ceil rule."""
    model = tiny_model(*VARIANTS["two_stage"], "MODEL.DEFORMABLE_DETR.PADDING_INVARIANT", False).eval()
    assert not model.transformer.padding_invariant
    images = model.preprocess_image([{"image": _image(70, 100, 1)}, {"image": _image(130, 90, 2)}])
    with torch.no_grad():
        levels, masks = model.levels_and_masks(images)
    for level, mask in zip(levels, masks):
        expected = interpolated_padding_mask(images.image_sizes, images.tensor.shape[-2:], level.shape[-2:], "cpu")
        assert torch.equal(mask, expected) and mask[0].any()
    with torch.no_grad():
        _, masks = model.levels_and_masks(model.preprocess_image([{"image": _image(70, 100, 1)}]))
    assert not any(mask.any() for mask in masks)


def test_inference_output_is_top_k_pairs_by_sigmoid_score():
    model = tiny_model().eval()
    image = _image(64, 96, 3)
    (out,) = model([{"image": image, "height": 128, "width": 192}])
    inst = out["instances"]
    assert inst.image_size == (128, 192) and len(inst) == 20  # TEST_TOPK of the tiny config
    assert inst.scores.is_inference()
    with torch.no_grad():
        raw = model.predict(model.preprocess_image([{"image": image}]))
    prob = raw["pred_logits"][0].sigmoid()  # (Q, K)
    top = prob.flatten().topk(20)
    torch.testing.assert_close(inst.scores, top.values)
    assert inst.pred_classes.tolist() == (top.indices % 5).tolist()
    cx, cy, w, h = raw["pred_boxes"][0, top.indices[0] // 5]
    expected = torch.tensor([(cx - w / 2) * 192, (cy - h / 2) * 128, (cx + w / 2) * 192, (cy + h / 2) * 128])
    torch.testing.assert_close(inst.pred_boxes.tensor[0], expected.clamp(min=0).minimum(torch.tensor([192, 128.0] * 2)))


def test_select_sigmoid_pairs():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]]])
    boxes = torch.arange(8.0).reshape(1, 2, 4)
    scores, labels, picked, queries = select_batch_predictions(logits, boxes, topk=3, sigmoid=True)
    torch.testing.assert_close(scores[0], torch.tensor([3.0, 2.0, 0.5]).sigmoid())
    assert labels[0].tolist() == [1, 0, 0] and queries[0].tolist() == [1, 0, 1]
    assert torch.equal(picked[0], boxes[0][[1, 0, 1]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_under_cpu_autocast(dtype):
    model = tiny_model("MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True).train()
    with EventStorage(), torch.autocast("cpu", dtype=dtype):
        losses = model(_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_class_id_outside_configured_classes_is_a_clear_error():
    model = tiny_model().train()
    batch = [{"image": _image(64, 64, 0), "instances": _instances(64, 64, [[1, 1, 20, 20]], [7])}]
    with EventStorage(), pytest.raises(ValueError, match="set MODEL.DETR.NUM_CLASSES"):
        model(batch)


@pytest.mark.parametrize("opts,message", [
    (["MODEL.DEFORMABLE_DETR.IN_FEATURES", ["res3", "res6"]], r"IN_FEATURES=\['res3', 'res6'\]: \['res6'\] not among"),
    (["MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"]], r"\['res3'\] not among the backbone's outputs"),
    (["MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", 2], "set MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS to at least 3"),
    (["MODEL.DETR.HIDDEN_DIM", 48], r"GroupNorm\(32\) needs a width divisible by 32, got 48"),
    (["MODEL.DETR.TRANSFORMER_NAME", "DetrTransformer"], "set MODEL.DETR.TRANSFORMER_NAME DeformableTransformer"),
    (["MODEL.DETR.PRE_NORM", True], "post-norm layers only"),
])
def test_bad_config_is_a_clear_error(opts, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(*opts)


def test_two_stage_on_too_small_images_is_a_clear_error():
    model = tiny_model(*VARIANTS["two_stage"], "MODEL.DETR.NUM_OBJECT_QUERIES", 50).eval()
    with pytest.raises(ValueError, match="keeps 50 proposals"):
        model([{"image": _image(32, 32, 0)}])
