"""The Detr meta-architecture: padding masks, outputs, losses, bad input."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from d2_detr.layers.padding_mask import feature_padding_mask
from d2_detr.modeling.inference import select_predictions

from .conftest import PATCH_BACKBONE_OPTS, TINY_CONFIG, load_config


def patch_model(**overrides):
    opts = [*PATCH_BACKBONE_OPTS, "MODEL.DETR.DROPOUT", 0.0]
    for key, value in overrides.items():
        opts += [key, value]
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG, *opts))


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).float()


def test_feature_padding_mask_ceil_rule():
    mask = feature_padding_mask([(64, 96), (33, 65)], (2, 3), stride=32, device=torch.device("cpu"))
    assert mask.shape == (2, 2, 3)
    assert not mask[0].any()  # 64x96 fills the 2x3 map
    # 33 rows -> ceil(33/32) = 2 valid rows; 65 columns -> 3 valid columns: nothing padded either
    assert not mask[1].any()
    mask = feature_padding_mask([(64, 96), (32, 40)], (2, 3), stride=32, device=torch.device("cpu"))
    assert mask[1].tolist() == [[False, False, True], [True, True, True]]


@pytest.mark.parametrize("position_embedding", ["sine", "learned"])
def test_image_alone_equals_image_in_padded_batch(position_embedding):
    model = patch_model(**{"MODEL.DETR.POSITION_EMBEDDING": position_embedding}).eval()
    small, large = _image(64, 96, 1), _image(128, 160, 2)
    with torch.no_grad():
        alone = model.predict(model.preprocess_image([{"image": small}]))
        batched = model.predict(model.preprocess_image([{"image": small}, {"image": large}]))
    torch.testing.assert_close(batched["pred_logits"][0], alone["pred_logits"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched["pred_boxes"][0], alone["pred_boxes"][0], atol=1e-5, rtol=0)


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


def _instances(h, w, boxes, classes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


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
