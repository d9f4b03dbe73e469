"""d2_detr.data.categories: the classes of a registered dataset before it is loaded."""
import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2_detr.data.categories import coco_json_categories, dataset_thing_classes

from .coco_files import edit_json, register, unregister, write_coco_dataset

# Unsorted, non-contiguous ids: load_coco_json orders the classes by id.
UNSORTED = ((7, "zebra"), (1, "ant"), (3, "cow"))


@pytest.fixture
def coco(tmp_path):
    json_file, image_root = write_coco_dataset(tmp_path, num_images=2, categories=UNSORTED)
    yield json_file, image_root
    unregister(["categories_test"])


def test_classes_of_a_register_coco_instances_dataset_match_what_loading_sets(coco):
    name = register("categories_test", *coco)
    assert MetadataCatalog.get(name).get("thing_classes") is None  # what Detectron2 leaves before loading
    classes = dataset_thing_classes(name)
    assert classes == ["ant", "cow", "zebra"]
    DatasetCatalog.get(name)  # load_coco_json sets thing_classes
    assert MetadataCatalog.get(name).thing_classes == classes


def test_categories_found_without_parsing_the_whole_file(coco, monkeypatch):
    def no_full_parse(*args, **kwargs):
        raise AssertionError("json.load called")

    monkeypatch.setattr(json, "load", no_full_parse)
    assert [(c["id"], c["name"]) for c in coco_json_categories(coco[0])] == list(UNSORTED)


def test_ambiguous_key_falls_back_to_parsing(coco):
    # "categories" also as the key of a nested object (and as a string value): the file is parsed.
    edit_json(coco[0], lambda content: content.update(
        info={"categories": [{"id": 99, "name": "not this one"}], "note": "categories"}))
    with open(coco[0]) as f:
        assert f.read().count('"categories"') == 3
    assert [(c["id"], c["name"]) for c in coco_json_categories(coco[0])] == list(UNSORTED)


def test_bad_json_files(tmp_path):
    text = tmp_path / "text.json"
    text.write_text("not json")
    with pytest.raises(ValueError, match=f"{text} is not a json file"):
        coco_json_categories(str(text))
    no_categories = tmp_path / "no_categories.json"
    no_categories.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no COCO \"categories\" list"):
        coco_json_categories(str(no_categories))


def test_metadata_classes_first_and_unknown_sources(coco):
    name = register("categories_test", *coco, metadata={"thing_classes": ["a", "b"]})
    assert dataset_thing_classes(name) == ["a", "b"]
    # a panoptic registration's json_file holds only the things: not used
    unregister([name])
    DatasetCatalog.register(name, list)
    MetadataCatalog.get(name).set(json_file=coco[0], evaluator_type="coco_panoptic_seg")
    assert dataset_thing_classes(name) is None


def test_missing_json_file_is_named(tmp_path):
    missing = str(tmp_path / "missing.json")
    name = register("categories_test", missing, str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match=f"'categories_test'.*{missing} does not exist"):
            dataset_thing_classes(name)
    finally:
        unregister([name])
