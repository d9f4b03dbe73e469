"""The Dino meta-architecture: construction, parameter count, training step, each ingredient off, denoising kept
apart from the matching queries, inference, batch independence, bad input."""
import os

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from d2_detr.layers.position_encoding import PositionEmbeddingSine
from d2_detr.modeling import Dino
from d2_detr.modeling.dino_criterion import DinoCriterion
from d2_detr.modeling.dino_transformer import DinoTransformer
from d2_detr.modeling.focal import FocalHungarianMatcher

from .conftest import REPO_DIR, load_config
from .model_helpers import assert_same_alone_and_batched, gt_instances, random_image, shift_batchnorm_statistics

TINY_DINO = os.path.join(REPO_DIR, "tests", "configs", "tiny_dino.yaml")
INGREDIENT_OFF = {
    "no_denoising": ["MODEL.DINO.DN_NUMBER", 0],
    "pure_query_selection": ["MODEL.DINO.QUERY_SELECTION", "pure"],
    "static_queries": ["MODEL.DINO.QUERY_SELECTION", "static"],
    "no_look_forward_twice": ["MODEL.DINO.LOOK_FORWARD_TWICE", False],
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny_model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY_DINO, *opts))


def _batch():
    return [{"image": random_image(64, 96, 1),
             "instances": gt_instances(64, 96, [[4, 4, 40, 30], [50, 20, 90, 60]], [1, 3])},
            {"image": random_image(96, 64, 2), "instances": gt_instances(96, 64, [[10, 30, 50, 80]], [4])}]


def test_r50_4scale_parameter_count_equals_the_original():
    """With the original 91 COCO class rows, shared heads counted once: the original model's count."""
    cfg = load_config(os.path.join(REPO_DIR, "configs", "dino_r50_4scale_12ep.yaml"), "MODEL.DEVICE", "cpu",
                      "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", 91)
    assert sum(p.numel() for p in build_model(cfg).parameters()) == 46_893_182


def test_built_from_plain_arguments():
    cfg = load_config(TINY_DINO)
    transformer = DinoTransformer(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                                  num_feature_levels=4, enc_n_points=2, dec_n_points=2, num_queries=7)
    model = Dino(
        backbone=build_backbone(cfg), in_features=["res3", "res4", "res5"],
        position_encoding=PositionEmbeddingSine(32, temperature=20), transformer=transformer,
        criterion=DinoCriterion(num_classes=5, matcher=FocalHungarianMatcher()), num_classes=5, num_queries=7,
        pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), test_topk=4, dn_labelbook_size=5).eval()
    assert model.label_enc.weight.shape == (6, 64) and transformer.tgt_embed.weight.shape == (7, 64)
    (out,) = model([{"image": random_image(64, 96, 0)}])
    assert len(out["instances"]) == 4 and out["instances"].image_size == (64, 96)


def test_built_from_config_with_shared_heads_and_the_original_names():
    model = tiny_model()
    assert isinstance(model.transformer, DinoTransformer) and model.transformer.query_selection == "mixed"
    assert len(model.class_embed) == len(model.bbox_embed) == 2
    assert model.class_embed[0] is model.class_embed[1] and model.bbox_embed[0] is model.bbox_embed[1]
    assert model.enc_class_embed is not model.class_embed[0] and model.enc_bbox_embed is not model.bbox_embed[0]
    assert model.position_encoding.temperature == 20 and model.position_encoding.offset == 0
    assert model.transformer.decoder.layers[0].dropout1.p == 0.0
    prior = model.class_embed[0].bias
    torch.testing.assert_close(prior.sigmoid(), torch.full_like(prior, 0.01))
    keys = set(model.state_dict())
    assert {"label_enc.weight", "transformer.tgt_embed.weight", "transformer.enc_output.weight",
            "transformer.enc_output_norm.weight", "transformer.decoder.norm.weight",
            "transformer.decoder.ref_point_head.layers.1.weight", "transformer.level_embed",
            "transformer.decoder.layers.1.self_attn.in_proj_weight", "class_embed.1.weight",
            "bbox_embed.1.layers.2.bias",
            "enc_class_embed.weight", "enc_bbox_embed.layers.2.weight", "input_proj.3.1.weight"} <= keys
    assert not any(k.startswith("query_embed") for k in keys)
    assert model.transformer.padding_invariant and model.transformer.decoder.padding_invariant
    original = tiny_model("MODEL.DEFORMABLE_DETR.PADDING_INVARIANT", False).transformer
    assert not original.padding_invariant and not original.decoder.padding_invariant


def test_training_step_losses_and_gradients():
    model = tiny_model().train()
    with EventStorage() as storage:
        losses = model(_batch())
        assert set(storage.latest()) == {"class_error", "cardinality_error"}
    names = {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_enc", "_dn", "_dn_0")}
    assert set(losses) == names and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.label_enc.weight.grad.abs().sum() > 0  # denoising content queries
    assert model.transformer.tgt_embed.weight.grad.abs().sum() > 0  # learned content queries
    assert model.transformer.enc_output.weight.grad.abs().sum() > 0  # encoder loss
    assert model.transformer.decoder.ref_point_head.layers[0].weight.grad.abs().sum() > 0
    assert model.backbone.res3[0].conv1.weight.grad is not None


@pytest.mark.parametrize("ingredient", list(INGREDIENT_OFF))
def test_each_ingredient_off_still_trains(ingredient):
    model = tiny_model(*INGREDIENT_OFF[ingredient]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with EventStorage():
        for _ in range(2):
            losses = model(_batch())
            assert all(torch.isfinite(v) for v in losses.values())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert any(k.endswith("_dn") for k in losses) == (ingredient != "no_denoising")
    assert any(k.endswith("_enc") for k in losses) == (ingredient != "static_queries")
    assert hasattr(model.transformer, "refpoint_embed") == (ingredient == "static_queries")
    assert hasattr(model.transformer, "tgt_embed") == (ingredient != "pure_query_selection")


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_keeps_the_refined_boxes_in_the_graph(look_forward_twice):
    model = tiny_model("MODEL.DINO.LOOK_FORWARD_TWICE", look_forward_twice).train()
    images = model.preprocess_image(_batch())
    levels, masks = model.levels_and_masks(images)
    pos = [model.position_encoding(m) for m in masks]
    out = model.transformer(levels, masks, pos, model.bbox_embed[0], (model.enc_class_embed, model.enc_bbox_embed))
    references = out["references"]
    assert len(references) == 3 and not references[0].requires_grad
    assert references[1].requires_grad == references[2].requires_grad == look_forward_twice


def test_matching_queries_do_not_see_the_denoising_queries():
    """The attention mask: the matching queries' outputs in training are those of a model without denoising."""
    model = tiny_model().train()
    batch = _batch()
    images = model.preprocess_image(batch)
    targets = model.prepare_targets(batch, images.image_sizes)
    with torch.no_grad():
        with_dn = model.training_outputs(images, targets)
        model.dn_number = 0
        without = model.training_outputs(images, targets)
    assert with_dn["dn_outputs"]["pred_logits"].shape[1] > 0 and "dn_outputs" not in without
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(with_dn[key], without[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(with_dn["aux_outputs"][0][key], without["aux_outputs"][0][key], atol=1e-5, rtol=0)


def test_denoising_outputs_layout():
    model = tiny_model().train()
    batch = _batch()
    images = model.preprocess_image(batch)
    out = model.training_outputs(images, model.prepare_targets(batch, images.image_sizes))
    groups, group_size = out["dn_groups"]
    assert (groups, group_size) == (2, 4)  # DN_NUMBER 4 // 2 boxes at most, 2 x 2 queries a group
    assert out["dn_outputs"]["pred_logits"].shape == (2, 8, 5) and out["pred_logits"].shape == (2, 10, 5)
    assert len(out["dn_outputs"]["aux_outputs"]) == 1


def test_batch_without_boxes_trains_without_denoising():
    model = tiny_model().train()
    batch = [{"image": random_image(64, 64, 0), "instances": gt_instances(64, 64, [], [])}]
    with EventStorage():
        losses = model(batch)
    assert not any("_dn" in k for k in losses)
    sum(losses.values()).backward()
    assert model.label_enc.weight.grad is not None  # still in the graph (distributed training needs it)


@pytest.mark.parametrize("ingredient", ["mixed", "static_queries"])
def test_detections_do_not_depend_on_batch_neighbours(ingredient):
    opts = [] if ingredient == "mixed" else INGREDIENT_OFF[ingredient]
    model = tiny_model(*opts, "MODEL.RESNETS.NORM", "BN").eval()
    shift_batchnorm_statistics(model.backbone)
    assert_same_alone_and_batched(model, random_image(72, 100, 8), random_image(130, 90, 9), atol=1e-4,
                                  image_first=False)


def test_inference_returns_top_k_pairs_and_no_denoising():
    model = tiny_model().eval()
    image = random_image(64, 96, 3)
    (out,) = model([{"image": image, "height": 128, "width": 192}])
    inst = out["instances"]
    assert inst.image_size == (128, 192) and len(inst) == 20  # TEST_TOPK of the tiny config
    with torch.no_grad():
        raw = model.predict(model.preprocess_image([{"image": image}]))
    assert raw["pred_logits"].shape == (1, 10, 5) and "dn_outputs" not in raw and "enc_outputs" not in raw
    top = raw["pred_logits"][0].sigmoid().flatten().topk(20)
    torch.testing.assert_close(inst.scores, top.values)
    assert inst.pred_classes.tolist() == (top.indices % 5).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_under_cpu_autocast(dtype):
    model = tiny_model().train()
    with EventStorage(), torch.autocast("cpu", dtype=dtype):
        losses = model(_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("opts,message", [
    (["MODEL.DINO.DN_LABELBOOK_SIZE", 4], r"DN_LABELBOOK_SIZE=4 is smaller than MODEL.DETR.NUM_CLASSES=5"),
    (["MODEL.DINO.QUERY_SELECTION", "top"], r"QUERY_SELECTION='top': choose one of"),
    (["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True], "Dino always refines its boxes"),
    (["MODEL.DETR.TRANSFORMER_NAME", "DetrTransformer"], "DinoTransformer for Dino"),
])
def test_bad_config_is_a_clear_error(opts, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(*opts)


def test_class_id_outside_configured_classes_is_a_clear_error():
    model = tiny_model().train()
    batch = [{"image": random_image(64, 64, 0), "instances": gt_instances(64, 64, [[1, 1, 20, 20]], [7])}]
    with EventStorage(), pytest.raises(ValueError, match="set MODEL.DETR.NUM_CLASSES"):
        model(batch)


def test_quickstart_config_builds_and_trains_a_step():
    """configs/quickstart_dino_cpu.yaml: its model (84 cells an image at 128 px, 30 queries) takes a training step."""
    cfg = load_config(os.path.join(REPO_DIR, "configs", "quickstart_dino_cpu.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [{"image": random_image(128, 128, 0), "instances": gt_instances(128, 128, [[10, 10, 60, 50]], [2])}]
    with EventStorage():
        losses = model(batch)
    assert "loss_ce_dn" in losses and "loss_ce_enc" in losses and all(torch.isfinite(v) for v in losses.values())
