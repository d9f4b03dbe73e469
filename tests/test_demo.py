"""tools/demo.py and d2_detr.utils.visualize: drawings of an untrained tiny DETR, and clear errors for bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from d2_detr.utils.visualize import InputError, find_images, load_inference_model, visualize_dataset_predictions

from .conftest import REPO_DIR, TINY_CONFIG, load_config

DEMO = os.path.join(REPO_DIR, "tools", "demo.py")


def _save_weights(folder, *opts) -> str:
    """Weights of a freshly initialised tiny model (config + ``opts``) as a DetectionCheckpointer file."""
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG, *opts))
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return os.path.join(str(folder), "model.pth")


def _write_image(path, width=150, height=100, seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)


def _run_demo(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, DEMO, "--config-file", TINY_CONFIG, *map(str, args)], cwd=REPO_DIR,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _save_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, weights):
    """One demo run on an image file, a folder (with a non-image file) and a glob pattern."""
    root = tmp_path_factory.mktemp("demo")
    _write_image(root / "single.png", width=150, height=100)
    (root / "folder").mkdir()
    _write_image(root / "folder" / "a.png", width=64, height=80, seed=1)
    Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8)).save(root / "folder" / "b.jpg")
    (root / "folder" / "notes.txt").write_text("not an image")
    (root / "globbed").mkdir()
    _write_image(root / "globbed" / "c.png", width=90, height=70, seed=2)
    _write_image(root / "globbed" / "skipped.bmp", seed=3)
    out = root / "out"
    result = _run_demo("--input", root / "single.png", root / "folder", root / "globbed" / "*.png",
                       "--output", out, "--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", weights,
                       "MODEL.DEVICE", "cpu")
    return root, out, result


def test_demo_writes_png_of_input_size(demo_run):
    root, out, result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = Image.open(out / "single.png")
    assert drawn.format == "PNG" and drawn.size == (150, 100)
    original = np.asarray(Image.open(root / "single.png").convert("RGB"))
    assert (np.asarray(drawn.convert("RGB")) != original).any(), "threshold 0 should draw boxes"
    assert "[1/4]" in result.stdout + result.stderr  # progress is logged per image


def test_demo_reads_folders_and_globs(demo_run):
    _, out, result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png", "single.png"]
    assert Image.open(out / "a.png").size == (64, 80)
    assert Image.open(out / "b.png").size == (50, 40)
    assert Image.open(out / "c.png").size == (90, 70)


def test_demo_unreadable_image_is_a_clear_error(tmp_path, weights):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"these bytes are not a PNG")
    result = _run_demo("--input", bad, "--output", tmp_path / "out", "MODEL.WEIGHTS", weights)
    assert result.returncode != 0
    assert str(bad) in result.stderr and "cannot read image" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_demo_checkpoint_of_other_config_names_the_key(tmp_path):
    other = _save_weights(tmp_path, "MODEL.DETR.NUM_CLASSES", 7)
    _write_image(tmp_path / "img.png")
    result = _run_demo("--input", tmp_path / "img.png", "--output", tmp_path / "out", "MODEL.WEIGHTS", other)
    assert result.returncode != 0
    assert "MODEL.DETR.NUM_CLASSES 7" in result.stderr and other in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "img.png").exists()


def test_find_images_errors(tmp_path):
    with pytest.raises(InputError, match="matches no image"):
        find_images([str(tmp_path / "*.png")])
    with pytest.raises(InputError, match="does not exist"):
        find_images([str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="holds no image"):
        find_images([str(tmp_path)])


def test_empty_weights_asks_for_a_checkpoint():
    with pytest.raises(InputError, match="MODEL.WEIGHTS is empty.*checkpoint"):
        load_inference_model(load_config())


def test_visualize_dataset_predictions(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    model.train()
    paths = visualize_dataset_predictions(tiny_cfg, model, "synthetic_shapes_val_small", str(tmp_path),
                                          num_images=3, threshold=0.0)
    assert len(paths) == 3 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] > 2 * image.size[1]  # ground truth beside predictions (128x128 images)
    assert model.training  # mode restored
