"""The Detr meta-architecture: padding masks, outputs, losses, bad input, speed options."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from d2_detr.layers.padding_mask import feature_padding_mask
from d2_detr.modeling.detr import FoldedFrozenBNConv2d, fold_frozen_batchnorm
from d2_detr.modeling.inference import select_batch_predictions, select_predictions

from .conftest import PATCH_BACKBONE_OPTS, REPO_DIR, TINY_CONFIG, load_config
from .model_helpers import assert_same_alone_and_batched, shift_batchnorm_statistics
from .model_helpers import gt_instances as _instances
from .model_helpers import random_image as _image


def patch_model(**overrides):
    opts = [*PATCH_BACKBONE_OPTS, "MODEL.DETR.DROPOUT", 0.0]
    for key, value in overrides.items():
        opts += [key, value]
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG, *opts))


def test_feature_padding_mask_ceil_rule():
    mask = feature_padding_mask([(64, 96), (33, 65)], (2, 3), stride=32, device=torch.device("cpu"))
    assert mask.shape == (2, 2, 3)
    assert not mask[0].any()  # 64x96 fills the 2x3 map
    # 33 rows -> ceil(33/32) = 2 valid rows; 65 columns -> 3 valid columns: nothing padded either
    assert not mask[1].any()
    mask = feature_padding_mask([(64, 96), (32, 40)], (2, 3), stride=32, device=torch.device("cpu"))
    assert mask[1].tolist() == [[False, False, True], [True, True, True]]
    sizes = torch.tensor([(64, 96), (32, 40)])  # the exported graph's (B, 2) input
    assert torch.equal(feature_padding_mask(sizes, (2, 3), stride=32, device=torch.device("cpu")), mask)


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_image_alone_equals_image_in_padded_batch(position_embedding):
    model = patch_model(**{"MODEL.DETR.POSITION_EMBEDDING": position_embedding}).eval()
    assert_same_alone_and_batched(model, _image(64, 96, 1), _image(128, 160, 2), atol=1e-5)


def test_padding_is_masked_not_just_zero():
    """Without the mask, padded cells would be attended to and change the small image's output."""
    model = patch_model().eval()
    small, large = _image(64, 96, 1), _image(128, 160, 2)
    images = model.preprocess_image([{"image": small}, {"image": large}])
    with torch.no_grad():
        masked = model.predict(images)["pred_logits"][0]
        model.feature_stride = 10_000  # every cell counts as valid: the padding mask is gone
        unmasked = model.predict(images)["pred_logits"][0]
    assert (masked - unmasked).abs().max() > 1e-4


def test_inference_output_format_and_rescaling():
    model = patch_model().eval()
    image = _image(64, 96, 3)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 128, "width": 192}])
    inst = out["instances"]
    assert inst.image_size == (128, 192)
    assert len(inst) == 10  # every query, the paper's rule
    assert inst.pred_classes.max() < 5 and inst.scores.max() <= 1
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 192).all() and (boxes[:, 3] <= 128).all()
    with torch.no_grad():
        raw = model.predict(model.preprocess_image([{"image": image}]))
    cx, cy, w, h = raw["pred_boxes"][0, 0]
    expected = torch.tensor([(cx - w / 2) * 192, (cy - h / 2) * 128, (cx + w / 2) * 192, (cy + h / 2) * 128])
    torch.testing.assert_close(boxes[0], expected.clamp(min=0).minimum(torch.tensor([192, 128, 192, 128.0])))


def test_select_predictions_rules():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]])  # 1 image, 2 queries, 2 classes + no-object
    boxes = torch.arange(8.0).reshape(1, 2, 4)
    ((scores, labels, picked),) = select_predictions(logits, boxes, topk=0)
    prob = logits.softmax(-1)[0, :, :2]
    torch.testing.assert_close(scores, prob.max(-1).values)
    assert labels.tolist() == [0, 1] and torch.equal(picked, boxes[0])
    ((scores, labels, picked),) = select_predictions(logits, boxes, topk=3)
    order = prob.flatten().argsort(descending=True)[:3]
    torch.testing.assert_close(scores, prob.flatten()[order])
    assert labels.tolist() == (order % 2).tolist()
    assert torch.equal(picked, boxes[0][order // 2])


@pytest.mark.parametrize("topk", [0, 3])
def test_select_batch_predictions_names_each_prediction_query(topk):
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 4, 6, generator=g), torch.rand(2, 4, 4, generator=g)
    scores, labels, picked, queries = select_batch_predictions(logits, boxes, topk)
    assert scores.shape == labels.shape == queries.shape == (2, 4 if topk == 0 else 3)
    prob = logits.softmax(-1)[..., :-1]
    torch.testing.assert_close(scores, torch.gather(prob, 1, queries[..., None].expand(-1, -1, 5)).gather(
        2, labels[..., None])[..., 0])
    torch.testing.assert_close(picked, torch.gather(boxes, 1, queries[..., None].expand(-1, -1, 4)))
    for image, (s, l, b) in enumerate(select_predictions(logits, boxes, topk)):
        assert torch.equal(s, scores[image]) and torch.equal(l, labels[image]) and torch.equal(b, picked[image])


def test_training_returns_only_optimised_losses_and_logs_metrics():
    model = patch_model().train()
    batch = [{"image": _image(64, 96, 4), "instances": _instances(64, 96, [[4, 4, 40, 30]], [2])},
             {"image": _image(96, 64, 5), "instances": _instances(96, 64, [], [])}]
    with EventStorage() as storage:
        losses = model(batch)
        assert set(storage.latest()) == {"class_error", "cardinality_error"}
    assert all(k.startswith("loss_") for k in losses)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"} == set(losses)
    sum(losses.values()).backward()
    assert model.class_embed.weight.grad is not None


def test_every_image_empty_trains():
    model = patch_model().train()
    batch = [{"image": _image(64, 64, i), "instances": _instances(64, 64, [], [])} for i in range(2)]
    with EventStorage():
        losses = model(batch)
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()


def test_class_id_outside_configured_classes_is_a_clear_error():
    model = patch_model().train()
    batch = [{"image": _image(64, 64, 0), "instances": _instances(64, 64, [[1, 1, 20, 20]], [7])}]
    with EventStorage(), pytest.raises(ValueError, match="NUM_CLASSES"):
        model(batch)


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG, "MODEL.DETR.DROPOUT", 0.0)).train()
    batch = [{"image": _image(64, 96, 6), "instances": _instances(64, 96, [[4, 4, 40, 30], [50, 20, 90, 60]], [1, 3])},
             {"image": _image(96, 64, 7), "instances": _instances(96, 64, [[10, 10, 50, 80]], [0])}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    with EventStorage():
        for _ in range(40):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(loss.item())
    assert totals[-1] < 0.6 * totals[0], totals


# ---------------------------------------------------------------- speed options: same numbers out


def _randomize_frozen_bn_(model, seed=0, weight_scale=1.0):
    """Non-trivial frozen statistics (a fresh FrozenBatchNorm2d is the identity, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.copy_((torch.rand(n, generator=g) + 0.5) * weight_scale)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@pytest.mark.parametrize("bias", [False, True])
def test_folded_frozen_bn_conv_equals_conv_then_norm(bias):
    torch.manual_seed(0)
    conv = Conv2d(6, 8, kernel_size=3, stride=2, padding=1, bias=bias, norm=FrozenBatchNorm2d(8), activation=F.relu)
    _randomize_frozen_bn_(conv)
    folded = copy.deepcopy(conv)
    assert fold_frozen_batchnorm(folded) == 1 and type(folded) is FoldedFrozenBNConv2d
    assert folded.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 6, 9, 11, requires_grad=True)
    expected, got = conv(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(expected.square().sum(), [x, *conv.parameters()])
    folded_grads = torch.autograd.grad(got.square().sum(), [x, *folded.parameters()])
    for g_folded, g_ref in zip(folded_grads, grads):
        torch.testing.assert_close(g_folded, g_ref, rtol=1e-4, atol=1e-5)


def _training_batch():
    return [{"image": _image(64, 96, 6), "instances": _instances(64, 96, [[4, 4, 40, 30], [50, 20, 90, 60]], [1, 3])},
            {"image": _image(96, 64, 7), "instances": _instances(96, 64, [], [])}]


def _tiny_pair(*fast_opts):
    """The tiny DETR (ResNet with frozen BN) without the speed options, and with ``fast_opts``, same weights."""
    plain_opts = ["MODEL.DETR.FOLD_FROZEN_BN", False, "MODEL.DETR.CHANNELS_LAST", False, "MODEL.DETR.DROPOUT", 0.0]
    torch.manual_seed(0)
    plain = build_model(load_config(TINY_CONFIG, *plain_opts))
    _randomize_frozen_bn_(plain, weight_scale=0.3)  # features of moderate size: attention not saturated
    fast = build_model(load_config(TINY_CONFIG, *plain_opts, *fast_opts))
    fast.load_state_dict(plain.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    return plain, fast


def test_speed_options_keep_outputs_losses_and_gradients():
    plain, fast = _tiny_pair("MODEL.DETR.FOLD_FROZEN_BN", True, "MODEL.DETR.CHANNELS_LAST", True)
    assert not any(isinstance(m, FoldedFrozenBNConv2d) for m in plain.modules())
    assert sum(isinstance(m, FoldedFrozenBNConv2d) for m in fast.modules()) == 53  # every conv of the R-50 layout
    images = [{"image": _image(64, 96, 1)}, {"image": _image(96, 128, 2)}]
    with torch.no_grad():
        expected, got = (m.eval().predict(m.preprocess_image(images)) for m in (plain, fast))
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-4)

    with EventStorage():
        losses = [m.train()(_training_batch()) for m in (plain, fast)]
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=1e-5, atol=1e-5)
    sum(losses[0].values()).backward()
    sum(losses[1].values()).backward()
    for (name, p_plain), p_fast in zip(plain.named_parameters(), fast.parameters()):
        if p_plain.grad is not None:
            scale = max(1.0, p_plain.grad.abs().max().item())
            torch.testing.assert_close(p_fast.grad / scale, p_plain.grad / scale, rtol=0, atol=1e-4, msg=name)


def test_compiled_transformer_gives_same_outputs():
    """MODEL.DETR.COMPILE_TRANSFORMER (here with the quick "aot_eager" backend: graph capture and AOTAutograd,
    no code generation): same outputs, losses and parameter names as the eager model."""
    plain, compiled = _tiny_pair("MODEL.DETR.COMPILE_TRANSFORMER", True, "MODEL.DETR.COMPILE_BACKEND", "aot_eager")
    assert compiled.transformer._compiled_call_impl is not None
    images = [{"image": _image(64, 96, 1)}]
    with torch.no_grad():
        expected, got = (m.eval().predict(m.preprocess_image(images)) for m in (plain, compiled))
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-5)
    with EventStorage():
        losses = [m.train()(_training_batch()) for m in (plain, compiled)]
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], rtol=1e-5, atol=1e-5)


def test_inference_under_inference_mode():
    model = patch_model().eval()
    (out,) = model([{"image": _image(64, 96, 3)}])
    assert out["instances"].scores.is_inference() and out["instances"].pred_boxes.tensor.is_inference()
    with torch.no_grad():
        raw = model.predict(model.preprocess_image([{"image": _image(64, 96, 3)}]))
    assert not raw["pred_logits"].is_inference()  # predict() stays usable with autograd


@pytest.mark.parametrize("config,stages,feature", [("detr_r50.yaml", ["res2", "res3", "res4", "res5"], "res5"),
                                                    ("quickstart_cpu.yaml", ["res2", "res3", "res4"], "res4")])
def test_backbone_computes_only_the_stages_detr_reads(config, stages, feature):
    """No work for unused feature levels: the ResNet is built up to the stage DETR reads, and returns only it."""
    cfg = load_config(os.path.join(REPO_DIR, "configs", config), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES, cfg.MODEL.DETR.ENC_LAYERS, cfg.MODEL.DETR.DEC_LAYERS = 2, 1, 1
    backbone = build_model(cfg).backbone
    assert backbone.stage_names == tuple(stages) or list(backbone.stage_names) == stages
    assert list(backbone.output_shape()) == [feature]
    with torch.no_grad():
        assert list(backbone(torch.zeros(1, 3, 64, 64))) == [feature]


def test_attention_mask_only_when_a_cell_is_padded():
    """Unpadded batches skip attention masking (mask None); the result equals masking with an all-False mask."""
    model = patch_model().eval()
    seen = []
    model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    same_size = model.preprocess_image([{"image": _image(64, 96, 1)}, {"image": _image(64, 96, 2)}])
    padded = model.preprocess_image([{"image": _image(64, 96, 1)}, {"image": _image(96, 128, 2)}])
    with torch.no_grad():
        unmasked = model.predict(same_size)
        model.predict(padded)
        features = model.input_proj(model.backbone(same_size.tensor)["patches"])
        mask = torch.zeros(2, *features.shape[-2:], dtype=torch.bool)
        hs, _ = model.transformer(features, mask, model.query_embed.weight, model.position_encoding(mask))
    assert seen[0] is None
    assert torch.equal(seen[1], feature_padding_mask(padded.image_sizes, (3, 4), 32, torch.device("cpu")))
    assert seen[1].any()
    torch.testing.assert_close(model.class_embed(hs[-1]), unmasked["pred_logits"], rtol=0, atol=1e-6)


def test_resnet_detections_do_not_depend_on_batch_neighbours():
    """With the real (tiny) ResNet, trained-like BatchNorm shifts included: at inference an image's outputs
    are the same alone and in a padded batch with a larger image."""
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG, "MODEL.RESNETS.NORM", "BN")).eval()
    shift_batchnorm_statistics(model.backbone)
    assert_same_alone_and_batched(model, _image(72, 100, 8), _image(130, 90, 9), atol=1e-4)
