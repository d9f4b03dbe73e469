"""tools/check_dataset.py as a user runs it before a long job."""
import importlib.util
import os
import subprocess
import sys

from .coco_files import edit_json, truncate, write_coco_dataset
from .conftest import REPO_DIR, TINY_CONFIG

TOOL = os.path.join(REPO_DIR, "tools", "check_dataset.py")


def _tool_main():
    spec = importlib.util.spec_from_file_location("check_dataset_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_lists_bad_files_and_exits_non_zero(tmp_path):
    json_file, image_root = write_coco_dataset(tmp_path, num_images=5)
    truncate(os.path.join(image_root, "0001.png"))
    os.remove(os.path.join(image_root, "0003.png"))
    edit_json(json_file, lambda content: content["images"][4].update(width=60))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = ["--coco-json", json_file, "--image-root", image_root, "--num-workers", "1"]
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    name = f"check:{json_file}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(name)]
    assert lines == [
        f"{name}: {image_root}/0001.png: cannot be decoded (OSError: image file is truncated)",
        f"{name}: {image_root}/0003.png: image file does not exist",
        f"{name}: {image_root}/0004.png: the image is 64x48 (width x height) but its record says 60x48",
    ]
    assert "3 problems in 3 records of 1 datasets" in proc.stderr
    assert "5/5 images checked (100%), 3 problems" in proc.stdout  # progress


def test_config_datasets_and_num_classes(capsys):
    main = _tool_main()
    assert main(["--config-file", TINY_CONFIG, "--dataset", "synthetic_shapes_val_small"]) == 0
    assert "No problems in 1 datasets (level 'full'): synthetic_shapes_val_small" in capsys.readouterr().err
    assert main(["--config-file", TINY_CONFIG, "--level", "files", "MODEL.DETR.NUM_CLASSES", "3"]) == 1
    out = capsys.readouterr().out
    assert "error: MODEL.DETR.NUM_CLASSES=3, but dataset 'synthetic_shapes_train_small' has 5" in out
    assert main(["--dataset", "not_registered"]) == 2
    assert "'not_registered' is not registered" in capsys.readouterr().err
