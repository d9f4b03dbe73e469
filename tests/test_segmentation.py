"""DETR's mask head, mask losses, segmentation post-processing and two-stage freezing."""
import logging
import math

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from d2_detr.checkpoint import convert_detr_state_dict
from d2_detr.modeling.mask_losses import SetCriterionWithMasks, dice_loss, sigmoid_focal_loss
from d2_detr.modeling.segmentation import MHAttentionMap, gt_masks_to_tensor
from d2_detr.modeling.segmentation_inference import panoptic_inference, paste_mask_logits

from .conftest import TESTS_DIR, load_config

SEGM_CONFIG = f"{TESTS_DIR}/configs/tiny_segm.yaml"


def _image(h, w, seed):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)).float()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def segm_model():
    torch.manual_seed(0)
    return build_model(load_config(SEGM_CONFIG))


def test_mask_head_shapes_on_a_padded_batch(segm_model):
    model = segm_model.eval()
    inputs = [{"image": _image(64, 96, 0), "height": 32, "width": 48}, {"image": _image(90, 70, 1)}]
    images = model.preprocess_image(inputs)
    assert tuple(images.tensor.shape[-2:]) == (90, 96)
    with torch.no_grad():
        outputs = model.predict(images)
        results = model(inputs)
    assert outputs["mask_stride"] == 4
    assert outputs["pred_masks"].shape == (2, 10, 23, 24)  # (B, Q, ceil(90 / 4), ceil(96 / 4))
    assert sum(p.numel() for p in model.mask_head.parameters()) == 23405
    for result, size in zip(results, [(32, 48), (90, 70)]):
        masks = result["instances"].pred_masks
        assert masks.dtype == torch.bool and masks.shape == (10, *size)  # full-image masks, one per query
        assert "panoptic_seg" not in result
    # the original parameter names (checkpoint conversion relies on them)
    names = set(dict(model.mask_head.named_parameters()))
    assert {"bbox_attention.q_linear.weight", "lay1.weight", "gn5.bias", "adapter3.weight", "out_lay.weight"} <= names


def test_attention_map_ignores_padding_and_normalises_over_heads_and_positions():
    attention = MHAttentionMap(8, 8, num_heads=2)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, 2:, :] = True
    mask[:, :, 3:] = True
    weights = attention(torch.randn(1, 5, 8), torch.randn(1, 8, 3, 4), mask)  # (B, Q, M, H, W)
    assert weights.shape == (1, 5, 2, 3, 4)
    assert torch.all(weights[..., 2:, :] == 0) and torch.all(weights[..., 3:] == 0)
    assert torch.allclose(weights.sum((2, 3, 4)), torch.ones(1, 5))


def test_focal_and_dice_against_hand_computation():
    # one mask, two pixels: logits 0 and ln 3 (p = 1/2, 3/4), targets 1 and 0
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    num_boxes = torch.tensor(2.0)
    # focal: alpha_t * (1 - p_t)^2 * CE; pixel 1: 0.25 * 0.5^2 * ln 2, pixel 2: 0.75 * 0.75^2 * ln 4
    pixel1, pixel2 = 0.25 * 0.25 * math.log(2.0), 0.75 * 0.5625 * math.log(4.0)
    assert sigmoid_focal_loss(logits, targets, num_boxes).item() == pytest.approx((pixel1 + pixel2) / 2 / 2)
    # dice: 1 - (2 * 0.5 + 1) / (0.5 + 0.75 + 1 + 1)
    assert dice_loss(logits, targets, num_boxes).item() == pytest.approx((1 - 2.0 / 3.25) / 2)
    # a pixel outside the image (padding) does not count
    valid = torch.tensor([[True, False]])
    assert sigmoid_focal_loss(logits, targets, num_boxes, valid=valid).item() == pytest.approx(pixel1 / 2)
    assert dice_loss(logits, targets, num_boxes, valid=valid).item() == pytest.approx((1 - 2.0 / 2.5) / 2)


class _CountingMatcher(torch.nn.Module):
    """Matches query 1 of image 0 to its only target, and counts the calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return [(torch.tensor([1]), torch.tensor([0]))]


def test_mask_losses_use_the_box_matching_on_the_last_layer_only():
    matcher = _CountingMatcher()
    criterion = SetCriterionWithMasks(num_classes=2, matcher=matcher, deep_supervision=True)
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :4, :6] = True
    pred_masks = torch.full((1, 3, 2, 2), -20.0)  # stride 4: cell (0, 0) covers the target's top-left 4x4
    pred_masks[0, 1, 0, :] = 20.0  # query 1 predicts rows 0..3, columns 0..7
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": torch.full((1, 3, 4), 0.5), "mask_stride": 4,
               "pred_masks": pred_masks,
               "aux_outputs": [{"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": torch.full((1, 3, 4), 0.5)}]}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.25, 0.75, 0.5]]), "masks": target}]
    losses, _ = criterion(outputs, targets)
    assert matcher.calls == 2  # one matching per layer, none for the masks
    assert "loss_mask" in losses and "loss_dice" in losses and "loss_mask_0" not in losses
    # query 1 upsampled x4 (bilinear): rows 0..7 of logits 20, 20, 15, 5, -5, -15, -20, -20 on all 8 columns;
    # the target is rows 0..3 x columns 0..5
    p = [1 / (1 + math.exp(-v)) for v in (20, 20, 15, 5, -5, -15, -20, -20)]
    dice = 1 - (2 * 6 * sum(p[:4]) + 1) / (8 * sum(p) + 24 + 1)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-5)


def test_panoptic_post_processing_hand_made_case():
    # classes: 0 and 1 things, 2 stuff; queries: 0 thing (class 0), 1 thing (class 1) overlapping it,
    # 2 and 3 stuff of class 2 (merged), 4 confident mask but score below 0.85 (dropped),
    # 5 thing whose mask wins only 2 pixels (dropped as too small, its pixels re-assigned)
    is_thing = [True, True, False]
    strong = 5.0

    def logits_for(label, prob):
        row = torch.full((4,), -10.0)
        row[label] = math.log(prob)
        row[3] = math.log(1 - prob)
        return row

    logits = torch.stack([logits_for(0, 0.95), logits_for(1, 0.9), logits_for(2, 0.99), logits_for(2, 0.9),
                          logits_for(0, 0.6), logits_for(1, 0.97)])
    masks = torch.full((6, 6, 8), -strong)
    masks[0, :3, :6] = 1.0  # top-left, partly overlapped by query 1
    masks[1, 1:3, 2:6] = 2.0  # wins the overlap (higher logit)
    masks[2, 3:, :] = 0.5  # bottom half stuff
    masks[3, :3, 6:] = 0.5  # top-right stuff, same class
    masks[4, :, :] = 10.0  # would take everything, but its score is 0.6
    masks[5, 0, 6:] = 3.0  # wins 2 pixels only
    panoptic, segments = panoptic_inference(logits, masks, is_thing, object_threshold=0.85, min_area=5)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(1, 0, True), (2, 1, True), (3, 2, False)]
    expected = torch.tensor([[1, 1, 1, 1, 1, 1, 3, 3],
                             [1, 1, 2, 2, 2, 2, 3, 3],
                             [1, 1, 2, 2, 2, 2, 3, 3],
                             [3, 3, 3, 3, 3, 3, 3, 3],
                             [3, 3, 3, 3, 3, 3, 3, 3],
                             [3, 3, 3, 3, 3, 3, 3, 3]], dtype=torch.int32)
    assert torch.equal(panoptic, expected)  # query 5's 2 pixels went to the merged stuff segment
    assert [s["area"] for s in segments] == [10, 8, 30]
    assert segments[2]["score"] == pytest.approx(0.99, abs=1e-3)  # the best of the merged queries

    nothing, no_segments = panoptic_inference(logits[[4]], masks[[4]], is_thing)
    assert no_segments == [] and torch.all(nothing == 0)


def test_paste_mask_logits_crops_the_padding_and_resizes():
    logits = torch.zeros(2, 5, 6)
    logits[:, :3, :3] = 1.0  # the image's own cells
    pasted = paste_mask_logits(logits, 4, (10, 11), (20, 22))
    assert pasted.shape == (2, 20, 22)
    assert torch.all(pasted[:, :16, :16] > 0.99)


def test_polygon_and_bitmask_ground_truth_give_the_same_masks():
    square = [[1.0, 1.0, 5.0, 1.0, 5.0, 4.0, 1.0, 4.0]]
    polygons = Instances((6, 8), gt_masks=PolygonMasks([square]), gt_classes=torch.tensor([0]))
    bitmap = BitMasks.from_polygon_masks(polygons.gt_masks, 6, 8)
    bits = Instances((6, 8), gt_masks=bitmap, gt_classes=torch.tensor([0]))
    assert torch.equal(gt_masks_to_tensor(polygons, (6, 8), "cpu"), gt_masks_to_tensor(bits, (6, 8), "cpu"))
    empty = Instances((6, 8), gt_classes=torch.zeros(0, dtype=torch.int64), gt_boxes=Boxes(torch.zeros(0, 4)))
    assert gt_masks_to_tensor(empty, (6, 8), "cpu").shape == (0, 6, 8)
    with pytest.raises(ValueError, match="no masks"):
        gt_masks_to_tensor(Instances((6, 8), gt_classes=torch.tensor([1])), (6, 8), "cpu")


def test_frozen_weights_load_the_detector_and_train_only_the_mask_head(tmp_path, caplog):
    torch.manual_seed(1)
    detector = build_model(load_config())
    path = tmp_path / "box.pth"
    torch.save({"model": detector.state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="fvcore"):
        model = build_model(load_config(SEGM_CONFIG, "MODEL.DETR.FROZEN_WEIGHTS", str(path)))
    assert "not found in the checkpoint" in caplog.text and "mask_head.lay1.{bias, weight}" in caplog.text
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_head.") for n in trainable)
    for name, value in detector.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    model.train()
    inputs = [{"image": _image(64, 64, 2), "instances": Instances(
        (64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 30.0]])), gt_classes=torch.tensor([2]),
        gt_masks=BitMasks(torch.zeros(1, 64, 64, dtype=torch.bool).index_fill_(1, torch.arange(8, 30), True)))}]
    with EventStorage():
        sum(model(inputs).values()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())

    lacking = {k: v for k, v in detector.state_dict().items() if not k.startswith("class_embed.")}
    torch.save({"model": lacking}, tmp_path / "lacking.pth")
    with pytest.raises(ValueError, match=r"lacks .*class_embed\.bias"):
        build_model(load_config(SEGM_CONFIG, "MODEL.DETR.FROZEN_WEIGHTS", str(tmp_path / "lacking.pth")))


def test_freeze_detector_turns_batchnorm_into_frozen_batchnorm():
    cfg = load_config(SEGM_CONFIG, "MODEL.RESNETS.NORM", "BN", "MODEL.DETR.FREEZE_DETECTOR", True)
    model = build_model(cfg)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())


def test_mask_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="CRITERION_NAME SetCriterionWithMasks"):
        build_model(load_config(SEGM_CONFIG, "MODEL.DETR.CRITERION_NAME", "SetCriterion"))
    with pytest.raises(ValueError, match="MODEL.MASK_ON True"):
        build_model(load_config(SEGM_CONFIG, "MODEL.MASK_ON", False, "MODEL.DETR.FREEZE_DETECTOR", True))
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_model(load_config(SEGM_CONFIG, "MODEL.RESNETS.OUT_FEATURES", ["res5"]))


def test_segm_checkpoint_conversion_maps_mask_head_and_panoptic_class_head(segm_model):
    mask_head = {k: v for k, v in segm_model.state_dict().items() if k.startswith("mask_head.")}
    original = {  # an original DETRsegm (panoptic, 250 classes) state dict: detector under "detr."
        "detr.backbone.0.body.conv1.weight": torch.zeros(2, 3, 1, 1),
        "detr.input_proj.weight": torch.zeros(4, 2, 1, 1),
        "detr.query_embed.weight": torch.zeros(3, 4),
        "detr.class_embed.weight": torch.zeros(251, 4),
        "detr.class_embed.bias": torch.arange(251, dtype=torch.float32),
    }
    original.update({k[len("mask_head."):] if "bbox_attention" in k else k: v for k, v in mask_head.items()})
    assert "bbox_attention.q_linear.weight" in original
    converted = convert_detr_state_dict(original)
    assert {k for k in converted if k.startswith("mask_head.")} == set(mask_head)
    assert converted["class_embed.weight"].shape[0] == 134  # 133 COCO panoptic classes + "no object"
    assert converted["class_embed.bias"][-1] == 250  # "no object"
    assert converted["class_embed.bias"][79] == 90 and converted["class_embed.bias"][80] == 92  # last thing, 1st stuff
    assert not any(k.startswith("detr.") for k in converted)


@pytest.mark.parametrize("name, num_classes, panoptic", [
    ("detr_r50_segm.yaml", 80, False), ("detr_r50_panoptic.yaml", 133, True)])
def test_r50_segmentation_configs_build_the_original_mask_head(name, num_classes, panoptic):
    from detectron2.layers import ShapeSpec

    from d2_detr.modeling import build_mask_head

    from .conftest import REPO_DIR

    cfg = load_config(f"{REPO_DIR}/configs/{name}")
    assert cfg.MODEL.MASK_ON and cfg.MODEL.DETR.FREEZE_DETECTOR and cfg.MODEL.DETR.PANOPTIC_ON == panoptic
    assert cfg.MODEL.DETR.NUM_CLASSES == num_classes
    shapes = {f"res{i}": ShapeSpec(channels=2 ** (i + 6), stride=2 ** i) for i in range(2, 6)}
    shapes_of = {k: tuple(v.shape) for k, v in build_mask_head(cfg, shapes).state_dict().items()}
    # MaskHeadSmallConv(256 + 8, [1024, 512, 256], 256) and MHAttentionMap(256, 256, 8) of the original
    assert shapes_of["lay1.weight"] == (264, 264, 3, 3) and shapes_of["lay2.weight"] == (128, 264, 3, 3)
    assert shapes_of["adapter1.weight"] == (128, 1024, 1, 1) and shapes_of["adapter3.weight"] == (32, 256, 1, 1)
    assert shapes_of["lay5.weight"] == (16, 32, 3, 3) and shapes_of["out_lay.weight"] == (1, 16, 3, 3)
    assert shapes_of["bbox_attention.k_linear.weight"] == (256, 256) and shapes_of["gn5.weight"] == (16,)
