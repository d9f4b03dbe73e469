"""The install's promises: detectron2 imports with everything d2_detr uses, its data pipeline and its COCO
evaluator work in this environment (numpy >= 1.24, Pillow >= 10, with or without compiled ops), and the edits
tools/install_detectron2.py makes to detectron2's source release do what they say."""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

import d2_detr
from d2_detr.env import collect_report, detectron2_has_compiled_ops

from .conftest import REPO_DIR


def _detectron2_modules_used() -> set:
    """The detectron2 modules that d2_detr's library, tools and benchmarks import (found in their source)."""
    modules = set()
    for folder in ("d2_detr", "tools", "benchmarks"):
        for path in Path(REPO_DIR, folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                modules.update(name for name in names if name.split(".")[0] == "detectron2")
    return modules


def test_detectron2_modules_import():
    """Every detectron2 module the project uses imports (Detectron2's analysis tools included; the model zoo,
    which d2_detr does not use, is not required)."""
    modules = _detectron2_modules_used()
    assert {"detectron2.modeling", "detectron2.evaluation", "detectron2.engine", "detectron2.utils.analysis"} <= modules
    code = "import d2_detr\n" + "".join(f"import {name}\n" for name in sorted(modules))
    subprocess.run([sys.executable, "-c", code], check=True)


def _installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", os.path.join(REPO_DIR, "tools",
                                                                                      "install_detectron2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# detectron2 v0.6's detectron2/export/__init__.py, as in its source release.
_V06_EXPORT_INIT = """# -*- coding: utf-8 -*-

from .api import *
from .flatten import TracingAdapter
from .torchscript import scripting_with_instances, dump_torchscript_IR

__all__ = [k for k in globals().keys() if not k.startswith("_")]
"""


def test_installer_makes_the_caffe2_exporter_optional(tmp_path):
    """A release tree whose caffe2 exporter (export/api.py) needs the absent caffe2: after the installer's edit,
    detectron2.export imports, with the tracing adapter Detectron2's FLOP counter uses, and without the exporter."""
    installer = _installer()
    edits = [edit for edit in installer.EDITS if edit.glob == "detectron2/export/__init__.py"]
    assert len(edits) == 1
    export = tmp_path / "detectron2" / "export"
    export.mkdir(parents=True)
    (tmp_path / "detectron2" / "__init__.py").write_text("")
    (export / "__init__.py").write_text(_V06_EXPORT_INIT)
    (export / "api.py").write_text("from caffe2.proto import caffe2_pb2\n__all__ = ['Caffe2Tracer']\n")
    (export / "flatten.py").write_text("class TracingAdapter:\n    pass\n")
    (export / "torchscript.py").write_text("def scripting_with_instances():\n    pass\n\n\n"
                                           "def dump_torchscript_IR():\n    pass\n")
    installer.apply_edits(tmp_path, edits)
    code = ("import detectron2.export as e; assert e.__file__.startswith(%r), e.__file__; "
            "assert hasattr(e, 'TracingAdapter') and not hasattr(e, 'Caffe2Tracer'), dir(e)" % str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_installer_aborts_on_an_edit_that_does_not_match(tmp_path):
    installer = _installer()
    (edit,) = [edit for edit in installer.EDITS if edit.glob == "detectron2/export/__init__.py"]
    (tmp_path / "detectron2" / "export").mkdir(parents=True)
    (tmp_path / "detectron2" / "export" / "__init__.py").write_text("from .flatten import TracingAdapter\n")
    with pytest.raises(SystemExit, match="matched 0 times, expected 1"):
        installer.apply_edits(tmp_path, [edit])


def test_compiled_ops_missing_gives_clear_error_or_work():
    from detectron2 import _C

    if detectron2_has_compiled_ops():
        assert callable(_C.get_compiler_version)
    else:
        with pytest.raises(ImportError, match="compiled op"):
            _C.box_iou_rotated  # noqa: B018


def test_env_report_names_versions():
    report = dict(collect_report())
    assert report["torch"] == torch.__version__
    assert report["d2_detr"].startswith(d2_detr.__version__)
    assert report["detectron2 compiled ops"].startswith("yes" if detectron2_has_compiled_ops() else "no")
    out = subprocess.run([sys.executable, "-m", "d2_detr.env"], check=True, capture_output=True, text=True).stdout
    assert "detectron2 compiled ops" in out and "torchvision" in out


def _write_coco(path, boxes_per_image, image_size=(64, 80)):
    """A COCO JSON with one category; boxes in XYWH. Returns the annotations' dict."""
    h, w = image_size
    images, annotations = [], []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(data))
    return data


def _register(name, json_file, image_root):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))


def test_train_loader_over_coco_json_builds(tmp_path):
    """Building a train loader prints Detectron2's class histogram (numpy aliases removed in 1.24)."""
    from PIL import Image

    from detectron2.config import get_cfg

    from d2_detr import add_detr_config
    from d2_detr.engine import DetrTrainer

    _write_coco(tmp_path / "ann.json", [[[4, 4, 20, 30]], [[10, 8, 30, 20], [40, 30, 20, 20]]])
    for i in (1, 2):
        Image.new("RGB", (80, 64), (i * 40, 90, 160)).save(tmp_path / f"{i}.png")
    _register("install_test_train", tmp_path / "ann.json", tmp_path)
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_list(["DATASETS.TRAIN", ("install_test_train",), "SOLVER.IMS_PER_BATCH", 2,
                         "DATALOADER.NUM_WORKERS", 0, "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.CROP.ENABLED", False,
                         "INPUT.FORMAT", "RGB"])
    batch = next(iter(DetrTrainer.build_train_loader(cfg)))
    assert len(batch) == 2
    assert sorted(len(x["instances"]) for x in batch) == [1, 2]
    assert all(x["image"].shape[0] == 3 and x["image"].shape[1] == 64 for x in batch)


def _instances(boxes_xywh, scores, image_size=(64, 80)):
    inst = Instances(image_size)
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh], dtype=torch.float32).reshape(-1, 4)
    inst.pred_boxes = Boxes(xyxy)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
    return inst


@pytest.mark.parametrize("found,expected_ap", [(2, 100.0), (1, 100.0 * 51 / 101)])
def test_coco_evaluator_known_ap(tmp_path, found, expected_ap):
    """Two ground-truth boxes in two images. Finding both exactly gives AP 100; finding one gives
    precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points: AP 50.495 at every IoU."""
    gt = [[[4, 4, 20, 30]], [[10, 8, 30, 20]]]
    _write_coco(tmp_path / "ann.json", gt)
    _register("install_test_eval", tmp_path / "ann.json", tmp_path)
    DatasetCatalog.get("install_test_eval")  # as a test loader would: sets the category id mapping
    evaluator = COCOEvaluator("install_test_eval", output_dir=str(tmp_path / "eval"),
                              use_fast_impl=detectron2_has_compiled_ops())
    evaluator.reset()
    for image_id, boxes in enumerate(gt, start=1):
        predicted = boxes if image_id <= found else []
        evaluator.process([{"image_id": image_id}],
                          [{"instances": _instances(predicted, [0.9] * len(predicted))}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(expected_ap, abs=1e-3)
    assert results["bbox"]["AP75"] == pytest.approx(expected_ap, abs=1e-3)


def test_installer_reinstalls_its_own_detectron2_when_its_edits_changed(tmp_path):
    """An environment set up before an edit was added gets it on the next run (tools/setup_env.sh re-runs the
    installer when the installer changes); an official build, or one installed with today's edits, is left alone."""
    installer = _installer()
    tree = tmp_path / "release"
    (tree / "detectron2").mkdir(parents=True)
    installer.add_compiled_ops_standin(tree)
    assert not installer.installed_with_other_edits(tree / "detectron2")
    standin = tree / "detectron2" / "_C.py"
    older = "\n".join(line for line in standin.read_text().splitlines() if not line.startswith("INSTALLED_EDITS"))
    standin.write_text(older)  # as written before the installer recorded its edits
    assert installer.installed_with_other_edits(tree / "detectron2")
    standin.write_text(standin.read_text().replace("COMPILED = False", 'COMPILED = False\nINSTALLED_EDITS = "0123"'))
    assert installer.installed_with_other_edits(tree / "detectron2")
    official = tmp_path / "official" / "detectron2"
    official.mkdir(parents=True)
    (official / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert not installer.installed_with_other_edits(official)
