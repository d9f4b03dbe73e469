"""Tests of the built-in synthetic shapes dataset (d2_detr.data.synthetic: render, coco, store, catalog)."""
import json
import os
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode
from PIL import Image

from d2_detr.data.synthetic import (
    BUILTIN_SYNTHETIC_DATASETS,
    SYNTHETIC_CLASSES,
    SyntheticShapesConfig,
    ensure_all_generated,
    ensure_generated,
    generate_synthetic_shapes,
    is_synthetic_dataset,
    register_builtin_synthetic,
    register_synthetic_shapes,
    render_image,
)
from d2_detr.data.synthetic import coco as synthetic_coco
from d2_detr.data.synthetic_panoptic import register_synthetic_panoptic

K = len(SYNTHETIC_CLASSES)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def dataset_name():
    """A unique dataset name, removed from Detectron2's catalogs afterwards."""
    name = f"synthetic_shapes_test_{uuid.uuid4().hex[:8]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _annotated_objects(config):
    """(category_id, mean colour of its visible pixels, visible area, box area) of every annotated object."""
    rows = []
    for index in range(config.num_images):
        rendered = render_image(config, index)
        for inst in rendered.annotated_instances:
            ys, xs = np.nonzero(inst.visible_mask)
            box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
            colour = rendered.image[inst.visible_mask].mean(axis=0)
            rows.append((inst.category_id, colour, inst.visible_area, box_area))
    return rows


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    config = SyntheticShapesConfig(num_images=6, seed=7, image_size=48)
    a = generate_synthetic_shapes(str(tmp_path / "a"), config)
    b = generate_synthetic_shapes(str(tmp_path / "b"), config)
    c = generate_synthetic_shapes(str(tmp_path / "c"), SyntheticShapesConfig(num_images=6, seed=8, image_size=48))
    assert _read_bytes(a) == _read_bytes(b)
    assert _read_bytes(a) != _read_bytes(c)
    assert _read_bytes(tmp_path / "a/images/000003.png") == _read_bytes(tmp_path / "b/images/000003.png")


def test_image_depends_only_on_seed_and_index():
    short = SyntheticShapesConfig(num_images=3, seed=4, image_size=40)
    long = SyntheticShapesConfig(num_images=50, seed=4, image_size=40)
    np.testing.assert_array_equal(render_image(short, 2).image, render_image(long, 2).image)
    assert not np.array_equal(render_image(long, 2).image, render_image(long, 3).image)


def test_annotations_match_drawn_pixels(tmp_path):
    config = SyntheticShapesConfig(num_images=10, seed=3, image_size=(48, 72), max_objects=6, empty_fraction=0.0)
    json_file = generate_synthetic_shapes(str(tmp_path / "ds"), config)
    coco = _read_json(json_file)
    assert [c["id"] for c in coco["categories"]] == list(range(1, K + 1))
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    anns_by_image = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert min(a["id"] for a in coco["annotations"]) == 1
    assert any(len(anns) >= 2 for anns in anns_by_image.values())

    for index, img in enumerate(coco["images"]):
        rendered = render_image(config, index)
        pixels = np.asarray(Image.open(tmp_path / "ds" / "images" / img["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(pixels, rendered.image)
        height, width = pixels.shape[:2]
        assert (img["height"], img["width"]) == (height, width)
        assert 48 <= height <= 72 and 48 <= width <= 72
        objects = rendered.annotated_instances
        anns = anns_by_image[img["id"]]
        assert len(anns) == len(objects)
        for ann, obj in zip(anns, objects):
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == (height, width)
            np.testing.assert_array_equal(mask, obj.visible_mask)
            assert ann["iscrowd"] == 0 and ann["category_id"] == obj.category_id
            assert ann["area"] == int(mask.sum()) > 0
            assert ann["area"] >= 0.5 * obj.full_area
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
            # The pixels under the mask show the object's fill colour (plus zero-mean noise), not background.
            assert np.abs(pixels[mask].mean(axis=0) - np.array(obj.colour)).max() < 8


def test_empty_fraction_and_image_size_range():
    config = SyntheticShapesConfig(num_images=40, seed=11, image_size=(32, 64), empty_fraction=0.5)
    rendered = [render_image(config, i) for i in range(config.num_images)]
    num_empty = sum(not r.annotated_instances for r in rendered)
    assert 8 <= num_empty <= 32
    shapes = {r.image.shape[:2] for r in rendered}
    assert len(shapes) > 5 and any(h != w for h, w in shapes)
    assert all(32 <= s <= 64 for shape in shapes for s in shape)
    no_empty = SyntheticShapesConfig(num_images=20, seed=11, image_size=48, empty_fraction=0.0)
    assert all(render_image(no_empty, i).instances for i in range(no_empty.num_images))


def test_class_balance_and_no_trivial_rule():
    rows = _annotated_objects(SyntheticShapesConfig(num_images=200, seed=5, image_size=48))
    labels = np.array([r[0] for r in rows])
    counts = np.bincount(labels, minlength=K + 1)[1:]
    assert len(rows) > 400
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()

    def nearest_centroid_accuracy(features):
        # Fit class centroids on the first half, score on the second half.
        half = len(labels) // 2
        centroids = np.stack([features[:half][labels[:half] == k].mean(axis=0) for k in range(1, K + 1)])
        dist = ((features[half:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        return float((dist.argmin(axis=1) + 1 == labels[half:]).mean())

    colours = np.array([r[1] for r in rows])
    sizes = np.log(np.array([[r[2], r[3]] for r in rows], dtype=np.float64))
    chance = 1.0 / K
    assert nearest_centroid_accuracy(colours) < chance + 0.1
    assert nearest_centroid_accuracy(sizes) < chance + 0.15


def test_cached_and_regenerated_when_params_change(tmp_path, monkeypatch):
    target = str(tmp_path / "ds")
    small = SyntheticShapesConfig(num_images=3, seed=1, image_size=32)
    json_file = generate_synthetic_shapes(target, small)
    assert _read_json(os.path.join(target, "params.json")) == small.to_params()
    assert _read_json(json_file)["info"]["params"] == small.to_params()

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    with monkeypatch.context() as m:
        m.setattr(synthetic_coco, "write_detection_dataset", fail)
        generate_synthetic_shapes(target, small)

    bigger = SyntheticShapesConfig(num_images=5, seed=1, image_size=32)
    generate_synthetic_shapes(target, bigger)
    assert len(_read_json(json_file)["images"]) == 5
    assert len(os.listdir(os.path.join(target, "images"))) == 5
    assert sorted(os.listdir(tmp_path)) == [".ds.lock", "ds"]


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    target = str(tmp_path / "ds")
    config = SyntheticShapesConfig(num_images=4, seed=2, image_size=32)
    real_render = synthetic_coco.render_image
    calls = []

    def render_then_crash(cfg, index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(cfg, index)

    with monkeypatch.context() as m:
        m.setattr(synthetic_coco, "render_image", render_then_crash)
        with pytest.raises(KeyboardInterrupt):
            generate_synthetic_shapes(target, config)
    assert sorted(os.listdir(tmp_path)) == [".ds.lock"]

    # A killed process leaves a temp dir and, say, a dataset dir without params.json: both are replaced.
    os.makedirs(tmp_path / ".ds.tmp-killed" / "images")
    os.makedirs(tmp_path / "ds" / "images")
    (tmp_path / "ds" / "annotations.json").write_text("{}")
    json_file = generate_synthetic_shapes(target, config)
    assert len(_read_json(json_file)["images"]) == 4
    assert sorted(os.listdir(tmp_path)) == [".ds.lock", "ds"]


def test_registered_dataset_loads_through_catalog(tmp_path, dataset_name):
    register_synthetic_shapes(dataset_name, num_images=6, seed=9, image_size=40, empty_fraction=0.0, root=str(tmp_path))
    meta = MetadataCatalog.get(dataset_name)
    assert meta.thing_classes == list(SYNTHETIC_CLASSES)
    assert meta.evaluator_type == "coco"
    json_file = os.path.join(str(tmp_path), dataset_name, "annotations.json")
    assert meta.as_dict()["json_file"] == json_file
    assert not os.path.exists(os.path.join(str(tmp_path), dataset_name))  # generated lazily
    assert is_synthetic_dataset(dataset_name) and not is_synthetic_dataset("coco_2017_train")

    records = DatasetCatalog.get(dataset_name)
    assert os.path.isfile(json_file) and meta.json_file == json_file
    assert len(records) == 6
    category_ids = set()
    for record in records:
        assert os.path.isfile(record["file_name"])
        assert record["file_name"].startswith(meta.image_root)
        assert {"height", "width", "image_id", "annotations"} <= set(record)
        for ann in record["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert len(ann["bbox"]) == 4 and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"], dict)
            category_ids.add(ann["category_id"])
    assert category_ids and category_ids <= set(range(K))
    assert meta.thing_dataset_id_to_contiguous_id == {k + 1: k for k in range(K)}
    assert ensure_generated(dataset_name) == meta.json_file


def test_ensure_generated_before_any_load(tmp_path, dataset_name):
    register_synthetic_shapes(dataset_name, num_images=2, seed=0, image_size=32, root=str(tmp_path))
    ensure_all_generated(["not_a_synthetic_dataset", dataset_name])
    assert os.path.isfile(MetadataCatalog.get(dataset_name).as_dict()["json_file"])
    with pytest.raises(KeyError):
        ensure_generated("not_a_synthetic_dataset")


@pytest.mark.parametrize("attribute", ["json_file", "image_root"])
def test_reading_a_file_path_of_the_metadata_generates_the_files(tmp_path, dataset_name, attribute):
    """What Detectron2 reads from the metadata exists when it reads it, with no call to ensure_generated."""
    register_synthetic_shapes(dataset_name, num_images=3, seed=4, image_size=32, empty_fraction=0.0,
                              root=str(tmp_path))
    meta = MetadataCatalog.get(dataset_name)
    assert meta.thing_classes and meta.get("evaluator_type") == "coco"  # other attributes generate nothing
    assert not os.path.exists(os.path.join(str(tmp_path), dataset_name))
    path = getattr(meta, attribute)
    assert os.path.exists(path)
    assert len(os.listdir(meta.image_root)) == 3 and os.path.isfile(meta.json_file)


def test_panoptic_variant_generates_its_files_when_its_metadata_paths_are_read(tmp_path, dataset_name):
    """COCOPanopticEvaluator reads panoptic_json and panoptic_root: they exist once read."""
    register_synthetic_panoptic(dataset_name, num_images=2, seed=8, image_size=32, root=str(tmp_path))
    meta = MetadataCatalog.get(dataset_name)
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert not os.path.exists(os.path.join(str(tmp_path), dataset_name))
    assert len(os.listdir(meta.panoptic_root)) == 2 and os.path.isfile(meta.panoptic_json)


def test_coco_evaluator_built_before_any_load(tmp_path, dataset_name):
    """COCOEvaluator opens the json file in its constructor: it works on a freshly registered dataset."""
    register_synthetic_shapes(dataset_name, num_images=2, seed=6, image_size=32, empty_fraction=0.0,
                              root=str(tmp_path))
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=str(tmp_path / "eval"))
    assert len(evaluator._coco_api.getImgIds()) == 2


def test_register_builtin_is_idempotent_and_lazy():
    register_builtin_synthetic()
    register_builtin_synthetic()
    for name, config in BUILTIN_SYNTHETIC_DATASETS.items():
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).as_dict()["json_file"].endswith(os.path.join(name, "annotations.json"))
    train = BUILTIN_SYNTHETIC_DATASETS["synthetic_shapes_train"]
    val = BUILTIN_SYNTHETIC_DATASETS["synthetic_shapes_val"]
    assert train.seed != val.seed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": (64, 32)},
        {"image_size": 8},
        {"max_objects": 0},
        {"empty_fraction": 1.5},
        {"object_size": (0.5, 0.2)},
        {"num_images": -1},
    ],
)
def test_invalid_config_rejected(kwargs):
    args = {"num_images": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        SyntheticShapesConfig(**args)
