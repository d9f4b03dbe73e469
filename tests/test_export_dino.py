"""Export of Dino (d2_detr.export, tools/export_model.py) to TorchScript and ONNX: the inference graph (no denoising
queries), verified against the PyTorch model on padded batches of images of other sizes than the traced ones."""
import os
import re

import onnx
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2_detr.export import check_exportable_config, export_model, load_exported, verify_export

from .conftest import REPO_DIR, TESTS_DIR, load_config
from .test_export_deformable import _images
from .test_export_model_tool import TOOL, _run

TINY_DINO = os.path.join(TESTS_DIR, "configs", "tiny_dino.yaml")


def test_dino_configs_are_exportable():
    for name in ("dino_r50_4scale_12ep.yaml", "dino_r50_4scale_24ep.yaml", "dino_r50_4scale_36ep.yaml"):
        check_exportable_config(load_config(os.path.join(REPO_DIR, "configs", name)))


def test_torchscript_runs_any_batch(tmp_path, one_thread):
    """Traced on two images, run on three others (and one alone): the same detections as the model's inference."""
    torch.manual_seed(0)
    model = build_model(load_config(TINY_DINO)).eval()
    path = export_model(model, "torchscript", str(tmp_path))
    report = verify_export(model, path, _images([(112, 150), (90, 120), (70, 70)]))
    assert report["boxes_relative"] <= 1e-4 and report["scores"] <= 1e-4 and report["labels"] == 0
    verify_export(model, path, _images([(100, 64)]))


def test_tool_exports_to_onnx_verified_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights"
    weights.mkdir()
    DetectionCheckpointer(build_model(load_config(TINY_DINO)), save_dir=str(weights)).save("model")
    out = tmp_path / "exported"
    result = _run(TOOL, "--config-file", TINY_DINO, "--format", "onnx", "--output", out,
                  "MODEL.WEIGHTS", weights / "model.pth")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Verified .*model\.onnx on 2 image\(s\) of sizes \[\[96, 128\], \[72, 96\]\].*labels 0",
                     result.stdout)
    outputs = load_exported(str(out / "model.onnx"))(*[torch.zeros(1, 3, 80, 100), torch.tensor([[80, 100]])])
    assert set(outputs) == {"boxes", "scores", "labels"} and outputs["scores"].shape == (1, 20)  # TEST_TOPK
    # the inference graph has no denoising part: the label embedding is not among its weights
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not any("label_enc" in init.name for init in graph.initializer)
