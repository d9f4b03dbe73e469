"""Segmentation data: the synthetic panoptic dataset, panoptic and mask ground truth in the DETR mapper."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.structures import BitMasks, PolygonMasks
from PIL import Image

from d2_detr.data import DetrDatasetMapper, register_synthetic_panoptic
from d2_detr.data.masks import check_polygon_cropping
from d2_detr.data.panoptic import panoptic_annotations_to_instances, rgb_to_id
from d2_detr.data.synthetic import ensure_generated
from d2_detr.data.synthetic_panoptic import PANOPTIC_CLASSES

from .conftest import TESTS_DIR, load_config

PANOPTIC_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny_panoptic.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def panoptic_name(tmp_path_factory):
    name = "test_synthetic_panoptic"
    register_synthetic_panoptic(name, num_images=6, seed=21, image_size=(48, 80), empty_fraction=0.2,
                                root=str(tmp_path_factory.mktemp("panoptic")))
    return name


def test_synthetic_panoptic_is_registered_the_detectron2_way(panoptic_name):
    meta = MetadataCatalog.get(panoptic_name)
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.label_divisor == 1000
    assert meta.thing_classes == meta.stuff_classes == list(PANOPTIC_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert meta.stuff_dataset_id_to_contiguous_id == {6: 5, 7: 6, 8: 7}
    dicts = DatasetCatalog.get(panoptic_name)  # generates the files on first use
    assert len(dicts) == 6 and all(d["file_name"].endswith(".jpg") for d in dicts)
    with open(meta.panoptic_json) as f:
        panoptic = json.load(f)
    assert {c["id"]: c["isthing"] for c in panoptic["categories"]} == {k: int(k <= 5) for k in range(1, 9)}
    stuff_seen = set()
    for d, ann in zip(dicts, panoptic["annotations"]):
        ids = rgb_to_id(np.asarray(Image.open(d["pan_seg_file_name"])))
        image = np.asarray(Image.open(d["file_name"]))
        assert ids.shape == image.shape[:2]
        for seg, raw in zip(d["segments_info"], ann["segments_info"]):
            mask = ids == seg["id"]
            assert mask.sum() == raw["area"] > 0
            ys, xs = np.nonzero(mask)
            assert raw["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["isthing"] == (raw["category_id"] <= 5)
            if not seg["isthing"]:
                stuff_seen.add(seg["category_id"])
        stuff_ids = [s["category_id"] for s in d["segments_info"] if not s["isthing"]]
        assert len(stuff_ids) == len(set(stuff_ids))  # one segment per stuff class
        assert set(np.unique(ids)) <= {0} | {s["id"] for s in d["segments_info"]}
    assert stuff_seen and stuff_seen <= {5, 6, 7}
    assert ensure_generated(panoptic_name) == meta.json_file and os.path.isfile(meta.json_file)


def test_ground_truth_scores_pq_100_with_detectron2s_panoptic_evaluator(panoptic_name, tmp_path):
    """The panoptic files are in the format panopticapi reads: ground truth as predictions gives PQ 100."""
    evaluator = COCOPanopticEvaluator(panoptic_name, str(tmp_path))
    evaluator.reset()
    for d in DatasetCatalog.get(panoptic_name):
        ids = torch.from_numpy(rgb_to_id(np.asarray(Image.open(d["pan_seg_file_name"]))).astype(np.int32))
        segments = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                    for s in d["segments_info"]]
        evaluator.process([d], [{"panoptic_seg": (ids, segments)}])
    result = evaluator.evaluate()["panoptic_seg"]
    assert result["PQ"] == pytest.approx(100.0) and result["PQ_st"] == pytest.approx(100.0)


def test_mapper_turns_panoptic_segments_into_objects(panoptic_name):
    cfg = load_config(PANOPTIC_CONFIG, "DATASETS.TRAIN", (panoptic_name,))
    dataset_dict = next(d for d in DatasetCatalog.get(panoptic_name) if len(d["segments_info"]) > 2)
    mapped = DetrDatasetMapper(cfg, is_train=True)(dataset_dict)
    instances = mapped["instances"]
    assert isinstance(instances.gt_masks, BitMasks)
    assert 0 < len(instances) <= len(dataset_dict["segments_info"])  # the random crop may cut segments away
    assert instances.image_size == tuple(mapped["image"].shape[-2:])
    assert torch.equal(instances.gt_boxes.tensor, instances.gt_masks.get_bounding_boxes().tensor)

    # a horizontal flip moves the panoptic PNG with the image; crowd segments are dropped
    crowd = dict(dataset_dict, segments_info=[dict(s, iscrowd=int(i == 0))
                                              for i, s in enumerate(dataset_dict["segments_info"])])
    width = Image.open(dataset_dict["file_name"]).size[0]
    flipped = panoptic_annotations_to_instances(dict(crowd), T.TransformList([T.HFlipTransform(width)]),
                                                Image.open(dataset_dict["file_name"]).size[::-1])
    ids = rgb_to_id(np.asarray(Image.open(dataset_dict["pan_seg_file_name"])))
    expected = [ids[:, ::-1] == s["id"] for s in dataset_dict["segments_info"][1:]]
    assert flipped.gt_classes.tolist() == [s["category_id"] for s in dataset_dict["segments_info"][1:]]
    assert np.array_equal(flipped.gt_masks.tensor.numpy(), np.stack(expected))


@pytest.mark.parametrize("source", ["arguments", "config"])
def test_crowd_panoptic_segments_dropped_by_default_or_kept_as_the_original(panoptic_name, source):
    dataset_dict = next(d for d in DatasetCatalog.get(panoptic_name) if len(d["segments_info"]) > 2)
    crowd = dict(dataset_dict, segments_info=[dict(s, iscrowd=int(i == 0))
                                              for i, s in enumerate(dataset_dict["segments_info"])])
    ids = rgb_to_id(np.asarray(Image.open(dataset_dict["pan_seg_file_name"])))
    image_shape = ids.shape
    classes = {}
    for drop in (True, False):
        if source == "arguments":
            instances = panoptic_annotations_to_instances(dict(crowd), T.TransformList([]), image_shape, drop)
        else:
            cfg = load_config(PANOPTIC_CONFIG, "DATASETS.TRAIN", (panoptic_name,), "INPUT.PANOPTIC_DROP_CROWD", drop)
            mapper = DetrDatasetMapper(cfg, is_train=True)
            assert mapper.panoptic_drop_crowd is drop
            mapper.augmentations, mapper.crop_augmentations = T.AugmentationList([]), None  # image as is
            instances = mapper(crowd)["instances"]
        kept = crowd["segments_info"][1:] if drop else crowd["segments_info"]
        classes[drop] = instances.gt_classes.tolist()
        assert classes[drop] == [s["category_id"] for s in kept]
        assert np.array_equal(instances.gt_masks.tensor.numpy(), np.stack([ids == s["id"] for s in kept]))
    assert len(classes[False]) == len(classes[True]) + 1
    assert load_config(PANOPTIC_CONFIG).INPUT.PANOPTIC_DROP_CROWD  # the default drops them


def _polygon_dict(tmp_path):
    path = str(tmp_path / "image.png")
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(path)
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]
    return {"file_name": path, "height": 40, "width": 60, "image_id": 1, "annotations": [
        {"bbox": [10, 10, 20, 15], "bbox_mode": 1, "category_id": 1, "iscrowd": 0, "segmentation": [square]}]}


@pytest.mark.parametrize("mask_format, mask_type", [("bitmask", BitMasks), ("polygon", PolygonMasks)])
def test_mapper_accepts_polygons_as_either_mask_format(tmp_path, mask_format, mask_type):
    cfg = load_config(os.path.join(TESTS_DIR, "configs", "tiny_segm.yaml"), "INPUT.MASK_FORMAT", mask_format,
                      "INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", (40,), "INPUT.MAX_SIZE_TRAIN", 1000)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList([])  # no flip: compare pixels
    instances = mapper(_polygon_dict(tmp_path))["instances"]
    assert isinstance(instances.gt_masks, mask_type) and instances.gt_classes.tolist() == [1]
    bits = instances.gt_masks if mask_type is BitMasks else BitMasks.from_polygon_masks(instances.gt_masks, 40, 60)
    assert 280 <= int(bits.tensor.sum()) <= 340  # the 20 x 15 square, rasterised


def test_polygon_masks_with_cropping_need_shapely_or_bitmask():
    check_polygon_cropping(True, "bitmask", True)
    check_polygon_cropping(False, "polygon", True)
    check_polygon_cropping(True, "polygon", False)
    try:
        import shapely  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="MASK_FORMAT bitmask"):
            check_polygon_cropping(True, "polygon", True)


def test_panoptic_drawing_of_ground_truth_and_predictions(panoptic_name, tmp_path):
    from detectron2.modeling import build_model

    from d2_detr.utils.visualize_panoptic import draw_panoptic_grid

    cfg = load_config(PANOPTIC_CONFIG, "DATASETS.TEST", (panoptic_name,), "MODEL.DETR.PANOPTIC_OBJECT_THRESHOLD", 0.0)
    torch.manual_seed(0)
    path = draw_panoptic_grid(cfg, build_model(cfg), panoptic_name, str(tmp_path / "grid.png"), num_images=2)
    grid = np.asarray(Image.open(path))
    sizes = [Image.open(d["file_name"]).size for d in DatasetCatalog.get(panoptic_name)[:2]]  # (w, h)
    assert grid.shape[0] >= 2 * 2 * max(h for _, h in sizes) and grid.shape[1] >= 2 * sum(w for w, _ in sizes)
