"""d2_detr.data.check: the pre-flight check of a dataset, as a library and at the start of training."""
import os
import re

import pytest
from detectron2.structures import BoxMode

from d2_detr.data.check import DatasetCheckError, DatasetProblem, check_datasets, check_record
from d2_detr.engine import DetrTrainer

from .coco_files import edit_json, register, truncate, unregister, write_coco_dataset
from .conftest import TINY_CONFIG, load_config

# file -> what is wrong with it in the damaged dataset
EXPECTED = {
    "0000.png": r"cannot be decoded \(OSError: .*truncated",
    "0001.png": r"image file does not exist",
    "0002.png": r"the image is 64x48 \(width x height\) but its record says 64x40",
    "0003.png": r"annotation 1: bbox \[50, 20, 30, 25\] \(XYWH_ABS\) extends outside the 64x48 image",
}


@pytest.fixture
def damaged(tmp_path):
    """A 3-class COCO dataset of 6 images: one truncated, one missing, one of another size than its record
    says, one with a box outside the image."""
    json_file, image_root = write_coco_dataset(tmp_path / "damaged", num_images=6)
    truncate(os.path.join(image_root, "0000.png"))
    os.remove(os.path.join(image_root, "0001.png"))

    def damage(content):
        content["images"][2]["height"] = 40
        content["annotations"][7]["bbox"] = [50, 20, 30, 25]  # image 3's second box

    edit_json(json_file, damage)
    clean = write_coco_dataset(tmp_path / "clean", num_images=2)
    names = register("check_damaged", json_file, image_root), register("check_clean", *clean)
    yield names
    unregister(names)


def _by_file(problems):
    found = {}
    for p in problems:
        found.setdefault(os.path.basename(p.file_name), []).append(p.message)
    return found


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_check_names_every_bad_file(damaged, num_workers):
    problems = check_datasets(damaged, num_workers=num_workers)
    assert {p.dataset for p in problems} == {"check_damaged"}
    found = _by_file(problems)
    assert set(found) == set(EXPECTED)
    for file_name, pattern in EXPECTED.items():
        assert len(found[file_name]) == 1 and re.fullmatch(pattern + ".*", found[file_name][0]), found[file_name]
    assert all(os.path.isabs(p.file_name) for p in problems)  # full paths, to find the files


def test_files_level_finds_missing_files_only(damaged):
    problems = check_datasets(damaged, level="files")
    assert [(os.path.basename(p.file_name), p.message) for p in problems] == [("0001.png", "image file does not exist")]


def test_dataset_that_cannot_be_loaded_is_one_problem(tmp_path):
    json_file, image_root = write_coco_dataset(tmp_path)
    edit_json(json_file, lambda content: content["annotations"][0].update(category_id=42))
    name = register("check_unloadable", json_file, image_root)
    try:
        (problem,) = check_datasets([name])
    finally:
        unregister([name])
    assert problem.dataset == name and problem.file_name == json_file
    assert "cannot be loaded (KeyError" in problem.message and "category_id=42" in problem.message
    with pytest.raises(KeyError, match="'check_not_registered' is not registered"):
        check_datasets(["check_not_registered"])


def _record(image_file, annotations, **extra):
    return {"file_name": image_file, "height": 48, "width": 64, "annotations": annotations, **extra}


def _ann(bbox, category_id=0, bbox_mode=BoxMode.XYWH_ABS, **extra):
    return {"bbox": bbox, "bbox_mode": bbox_mode, "category_id": category_id, **extra}


def test_annotation_checks(tmp_path):
    _, image_root = write_coco_dataset(tmp_path, num_images=1)
    image = os.path.join(image_root, "0000.png")
    good = [
        _ann([0, 0, 64, 48]), _ann([0, 0, 64.5, 48.5]),  # the whole image; half a pixel over the border
        _ann([10, 10, 0, 0], category_id=2),  # an empty box: dropped by the mapper
        _ann([1, 2, 30, 40], bbox_mode=BoxMode.XYXY_ABS, iscrowd=1),
        _ann([0.1, 0.1, 0.5, 0.5], bbox_mode=BoxMode.XYWH_REL),  # relative boxes are not checked
    ]
    assert check_record(_record(image, good), num_classes=3) == []
    bad = [
        _ann([0, 0, 10, 10], category_id=3), _ann([0, 0, 10, 10], category_id=-1),
        _ann([20, 10, 5, 5], bbox_mode=BoxMode.XYXY_ABS), _ann([0, 0, float("nan"), 5]),
        _ann([-5, 0, 10, 10]), {"category_id": 0, "bbox_mode": BoxMode.XYWH_ABS}, _ann([1, 2, 3]),
    ]
    assert check_record(_record(image, bad), num_classes=3) == [
        "annotation 0: category_id 3 is not a class id 0..2 of the dataset's 3",
        "annotation 1: category_id -1 is not a class id 0..2 of the dataset's 3",
        "annotation 2: bbox [20, 10, 5, 5] (XYXY_ABS) has a negative width or height",
        "annotation 3: bbox [0, 0, nan, 5] is not finite",
        "annotation 4: bbox [-5, 0, 10, 10] (XYWH_ABS) extends outside the 64x48 image",
        "annotation 5: has no bbox",
        "annotation 6: bbox [1, 2, 3] is not 4 numbers",
    ]
    assert check_record(_record(image, bad[:2])) == []  # no class count: ids not checked
    assert check_record(_record(image, bad), level="files") == []  # files level: existence only


def test_segmentation_files_checked(tmp_path):
    _, image_root = write_coco_dataset(tmp_path, num_images=2)
    image, other = (os.path.join(image_root, f) for f in ("0000.png", "0001.png"))
    missing = str(tmp_path / "missing.png")
    record = _record(image, [], pan_seg_file_name=missing, segments_info=[{"id": 1, "category_id": 9}])
    assert check_record(record, level="files") == [f"pan_seg_file_name {missing} does not exist"]
    record.update(pan_seg_file_name=other, sem_seg_file_name=other)
    assert check_record(record, num_classes=3) == ["segment 0: category_id 9 is not a class id 0..2 of the dataset's 3"]


def test_check_error_lists_problems():
    problems = [DatasetProblem("d", f"/data/{i}.jpg", "image file does not exist") for i in range(25)]
    message = str(DatasetCheckError(problems))
    assert message.startswith("25 problems in 25 records of the datasets:\n  d: /data/0.jpg: image file does not")
    assert "d: /data/19.jpg" in message and "/data/20.jpg" not in message and "... and 5 more" in message
    assert "tools/check_dataset.py" in message and "DATASETS.CHECK_BEFORE_TRAINING none" in message


@pytest.mark.parametrize("level,files", [("files", {"0001.png"}), ("full", set(EXPECTED))])
def test_training_stops_before_the_first_iteration(damaged, tmp_path, level, files):
    cfg = load_config(TINY_CONFIG, "DATASETS.TRAIN", (damaged[0],), "DATASETS.TEST", (damaged[1],),
                      "MODEL.DETR.NUM_CLASSES", 3, "DATASETS.CHECK_BEFORE_TRAINING", level, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(DatasetCheckError) as info:
        DetrTrainer(cfg)
    assert set(_by_file(info.value.problems)) == files
    assert "0001.png: image file does not exist" in str(info.value)


def test_training_check_covers_test_datasets_and_can_be_turned_off(damaged, tmp_path):
    cfg = load_config(TINY_CONFIG, "DATASETS.TRAIN", (damaged[1],), "DATASETS.TEST", (damaged[0],),
                      "MODEL.DETR.NUM_CLASSES", 3, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(DatasetCheckError, match="check_damaged: .*0001.png: image file does not exist"):
        DetrTrainer(cfg)
    cfg.DATASETS.CHECK_BEFORE_TRAINING = "none"
    DetrTrainer(cfg)
    cfg.DATASETS.CHECK_BEFORE_TRAINING = "decode"
    with pytest.raises(ValueError, match="DATASETS.CHECK_BEFORE_TRAINING='decode'; expected one of"):
        DetrTrainer(cfg)
