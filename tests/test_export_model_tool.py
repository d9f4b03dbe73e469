"""tools/export_model.py end to end, and the onnxruntime + numpy snippet of docs/export.md (docs/export_onnxruntime.py)
run on its output."""
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from .conftest import REPO_DIR, TESTS_DIR, TINY_CONFIG, load_config

TOOL = os.path.join(REPO_DIR, "tools", "export_model.py")
SNIPPET = os.path.join(REPO_DIR, "docs", "export_onnxruntime.py")


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(build_model(load_config(TINY_CONFIG)), save_dir=str(folder)).save("model")
    return os.path.join(str(folder), "model.pth")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("exported")
    result = _run(TOOL, "--config-file", TINY_CONFIG, "--format", "onnx", "--output", out, "MODEL.WEIGHTS", weights)
    return out, result


def test_tool_writes_and_verifies_the_onnx_file(exported):
    out, result = exported
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(out / "model.onnx")
    # verified on a padded batch of two images at the test size (tiny.yaml: MIN_SIZE_TEST 96, MAX_SIZE_TEST 128)
    assert re.search(r"Verified .*model\.onnx on 2 image\(s\) of sizes \[\[96, 128\], \[72, 96\]\].*labels 0",
                     result.stdout)


def test_tool_torchscript(tmp_path, weights):
    result = _run(TOOL, "--config-file", TINY_CONFIG, "--format", "torchscript", "--output", tmp_path,
                  "MODEL.WEIGHTS", weights)
    assert result.returncode == 0, result.stderr
    module = torch.jit.load(str(tmp_path / "model.ts"))
    boxes, scores, labels = module(torch.zeros(1, 3, 64, 80), torch.tensor([[64, 80]]))
    assert boxes.shape == (1, 10, 4) and scores.shape == labels.shape == (1, 10)


def test_tool_errors_are_messages_not_tracebacks(tmp_path, weights):
    panoptic = os.path.join(TESTS_DIR, "configs", "tiny_panoptic.yaml")
    result = _run(TOOL, "--config-file", panoptic, "--format", "onnx", "--output", tmp_path, "MODEL.WEIGHTS", weights)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "export_model.py: error: MODEL.DETR.PANOPTIC_ON=True: the panoptic post-processing" in result.stderr
    result = _run(TOOL, "--config-file", TINY_CONFIG, "--format", "onnx", "--output", tmp_path)
    assert result.returncode == 1 and "MODEL.WEIGHTS is empty" in result.stderr
    assert not os.listdir(tmp_path)


def test_docs_snippet_runs_with_onnxruntime_and_numpy_only(exported):
    out, _ = exported
    with open(SNIPPET) as f:
        snippet = f.read()
    with open(os.path.join(REPO_DIR, "docs", "export.md")) as f:
        assert snippet in f.read(), "docs/export.md must show docs/export_onnxruntime.py exactly"
    # Run it; afterwards neither torch nor any project package may have been imported.
    check = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert not {'torch', 'detectron2', 'd2_detr'} & set(sys.modules), sorted(sys.modules)")
    result = _run("-c", check, SNIPPET, out / "model.onnx", "0.0")
    assert result.returncode == 0, result.stderr
    assert re.findall(r"image (\d): (\d+) detections", result.stdout) == [("0", "10"), ("1", "10")]
    assert re.search(r"class \d score 0\.\d\d box \[[-\d., ]+\]", result.stdout)
