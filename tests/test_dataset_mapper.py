"""DetrDatasetMapper: DETR's augmentation ranges, crowd removal, odd images and boxes."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from d2_detr.data.dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from d2_detr.data.images import ImageReadError

from .coco_files import truncate
from .conftest import REPO_DIR, load_config


def _record(path, h, w, annotations):
    return {"file_name": str(path), "height": h, "width": w, "image_id": 1, "annotations": annotations}


def _ann(box, category_id=0, iscrowd=0):
    return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id, "iscrowd": iscrowd}


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


def recipe_cfg():
    return load_config(os.path.join(REPO_DIR, "configs", "detr_r50.yaml"))


def test_recipe_augmentation_structure():
    resize_branch, crop_branch = build_detr_augmentation(recipe_cfg(), is_train=True)
    assert isinstance(resize_branch[0], T.RandomFlip) and isinstance(crop_branch[0], T.RandomFlip)
    assert tuple(resize_branch[1].short_edge_length) == tuple(range(480, 801, 32))
    assert resize_branch[1].max_size == 1333
    assert tuple(crop_branch[1].short_edge_length) == (400, 500, 600)
    assert crop_branch[2].crop_type == "absolute_range" and tuple(crop_branch[2].crop_size) == (384, 600)
    assert tuple(crop_branch[3].short_edge_length) == tuple(range(480, 801, 32))
    (test_resize,), none = build_detr_augmentation(recipe_cfg(), is_train=False)
    assert none is None and set(test_resize.short_edge_length) == {800} and test_resize.max_size == 1333


def test_augmented_sizes_stay_in_recipe_ranges(image_file):
    np.random.seed(0)
    mapper = DetrDatasetMapper(recipe_cfg(), is_train=True)
    short_edges, long_edges = set(), set()
    for _ in range(40):
        out = mapper(_record(image_file, 300, 400, [_ann([10, 10, 50, 40])]))
        h, w = out["image"].shape[1:]
        short_edges.add(min(h, w))
        long_edges.add(max(h, w))
    assert short_edges <= set(range(480, 801, 32))
    assert len(short_edges) > 3  # sizes really vary
    assert max(long_edges) <= 1333


def test_crop_branch_crops_within_range(image_file):
    np.random.seed(1)
    cfg = recipe_cfg()
    cfg.INPUT.CROP.PROB = 1.0
    cfg.INPUT.MIN_SIZE_TRAIN = (480,)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    aspects = set()
    for _ in range(20):
        h, w = mapper(_record(image_file, 300, 400, []))["image"].shape[1:]
        assert min(h, w) == 480
        aspects.add(round(max(h, w) / min(h, w), 2))
    # crops of 384..600 px per side: the aspect of the cropped image varies and never exceeds 600/384
    assert len(aspects) > 3 and max(aspects) <= 600 / 384 + 0.01


def test_crowd_dropped_and_degenerate_boxes_removed(image_file, tiny_cfg):
    tiny_cfg.INPUT.CROP.ENABLED = False
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (300,)
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 1000
    mapper = DetrDatasetMapper(tiny_cfg, is_train=True)
    anns = [_ann([10, 10, 50, 40], 1), _ann([100, 100, 60, 60], 2, iscrowd=1), _ann([200, 50, 0, 30], 3),
            _ann([380, 250, 100, 100], 4)]  # partly outside the 400x300 image
    inst = mapper(_record(image_file, 300, 400, anns))["instances"]
    assert sorted(inst.gt_classes.tolist()) == [1, 4]
    boxes = inst.gt_boxes.tensor
    assert boxes[:, [0, 2]].max() <= 400 and boxes[:, [1, 3]].max() <= 300  # clipped to the image


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_become_rgb(tmp_path, tiny_cfg, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (80, 60)).save(path)
    out = DetrDatasetMapper(tiny_cfg, is_train=False)(_record(path, 60, 80, []))
    assert out["image"].shape[0] == 3 and out["image"].dtype == torch.uint8
    assert "annotations" not in out


def test_masks_only_when_mask_on(image_file, tiny_cfg):
    tiny_cfg.INPUT.CROP.ENABLED = False
    ann = _ann([10, 10, 50, 40])
    ann["segmentation"] = [[10, 10, 60, 10, 60, 50, 10, 50]]
    out = DetrDatasetMapper(tiny_cfg, is_train=True)(_record(image_file, 300, 400, [dict(ann)]))
    assert not out["instances"].has("gt_masks")
    tiny_cfg.MODEL.MASK_ON = True
    out = DetrDatasetMapper(tiny_cfg, is_train=True)(_record(image_file, 300, 400, [dict(ann)]))
    assert out["instances"].has("gt_masks")


@pytest.mark.parametrize("is_train", [True, False])
def test_unreadable_image_error_names_the_file(image_file, tiny_cfg, is_train):
    mapper = DetrDatasetMapper(tiny_cfg, is_train=is_train)
    record = _record(image_file, 300, 400, [_ann([10, 10, 50, 40])])
    truncate(str(image_file))
    with pytest.raises(ImageReadError, match=f"Image file {image_file} cannot be read .*truncated"):
        mapper(record)
    os.remove(image_file)
    with pytest.raises(ImageReadError, match=f"Image file {image_file} does not exist"):
        mapper(record)
