"""d2_detr.export.exporter: TorchScript and ONNX files that reload (torch.jit.load, onnxruntime) and give the PyTorch
model's outputs, for one image and for a padded batch of two; clear errors for what cannot be exported."""
import os

import onnx
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from torch import nn

from d2_detr import add_detr_config
from d2_detr.export import ExportError, check_exportable_config, export_model, load_exported, verify_export
from d2_detr.export.exporter import check_exportable_model

from .conftest import PATCH_BACKBONE_OPTS, REPO_DIR, TESTS_DIR, TINY_CONFIG, load_config

R50_CONFIG = os.path.join(REPO_DIR, "configs", "detr_r50.yaml")
SEGM_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny_segm.yaml")
PANOPTIC_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny_panoptic.yaml")


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 255


# Batch 1, and a padded batch of two images of different sizes (neither a multiple of 32), at small sizes.
BATCHES = {"batch1": [(90, 120)], "padded_batch2": [(100, 75), (64, 131)]}
MODELS = {
    "tiny": (TINY_CONFIG, []),
    "tiny_masks_topk": (SEGM_CONFIG, ["MODEL.DETR.TEST_TOPK", 7]),
    "r50": (R50_CONFIG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    config, opts = MODELS[request.param]
    torch.manual_seed(0)
    return build_model(load_config(config, *opts)).eval()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_outputs_equal_pytorch_outputs(one_thread, model, fmt, tmp_path):
    path = export_model(model, fmt, str(tmp_path))
    assert os.path.basename(path) == {"torchscript": "model.ts", "onnx": "model.onnx"}[fmt]
    for name, sizes in BATCHES.items():
        images = [_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
        report = verify_export(model, path, images, atol=1e-4)  # raises beyond 1e-4 or on any differing label
        # at these sizes even the pixel coordinates agree within 1e-4
        assert report["boxes"] <= 1e-4 and report["scores"] <= 1e-4 and report["labels"] == 0, name


def test_onnx_file_has_opset_17_and_dynamic_batch_and_image_size(one_thread, tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval()
    proto = onnx.load(export_model(model, "onnx", str(tmp_path)))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"images": ["batch", 3, "height", "width"], "image_sizes": ["batch", 2]}
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    assert any(node.op_type == "Loop" for node in proto.graph.node)  # the per-image backbone


def test_exported_model_runs_a_batch_of_three(one_thread, tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG)).eval()
    run = load_exported(export_model(model, "onnx", str(tmp_path)))
    images = torch.zeros(3, 3, 70, 80)
    outputs = run(images, torch.tensor([[70, 80], [40, 80], [70, 33]]))
    assert outputs["boxes"].shape == (3, 10, 4) and outputs["labels"].dtype == torch.int64
    assert (outputs["boxes"][2, :, 0::2] <= 33).all() and (outputs["boxes"][1, :, 1::2] <= 40).all()  # clipped


def test_panoptic_postprocessing_cannot_be_exported():
    cfg = load_config(PANOPTIC_CONFIG)
    with pytest.raises(ExportError, match=r"PANOPTIC_ON.*panoptic post-processing.*PANOPTIC_ON False"):
        check_exportable_config(cfg)
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="panoptic post-processing"):
        check_exportable_model(build_model(cfg))


def test_compiled_transformer_cannot_be_exported():
    with pytest.raises(ExportError, match="COMPILE_TRANSFORMER False"):
        check_exportable_config(load_config(TINY_CONFIG, "MODEL.DETR.COMPILE_TRANSFORMER", True))


def test_padding_variant_deformable_model_is_refused():
    config = os.path.join(TESTS_DIR, "configs", "tiny_deformable.yaml")
    cfg = load_config(config, "MODEL.DEFORMABLE_DETR.PADDING_INVARIANT", False)
    with pytest.raises(ExportError, match="PADDING_INVARIANT True"):
        check_exportable_config(cfg)
    with pytest.raises(ExportError, match="PADDING_INVARIANT True"):
        check_exportable_model(build_model(cfg).eval())


def test_other_meta_architecture_is_refused():
    cfg = get_cfg()
    add_detr_config(cfg)
    with pytest.raises(ExportError, match="exports the Detr, DeformableDetr, Dino meta-architectures only"):
        check_exportable_config(cfg)


class FloorPatchBackbone(Backbone):
    """32x32 patches without padding: an h x w image gives floor(h / 32) x floor(w / 32) cells."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, kernel_size=32, stride=32)

    def forward(self, x):
        return {"patches": self.proj(x)}

    def output_shape(self):
        return {"patches": ShapeSpec(channels=16, stride=32)}


if "FloorPatchBackbone" not in BACKBONE_REGISTRY:
    BACKBONE_REGISTRY.register(FloorPatchBackbone)


def test_backbone_breaking_the_padding_rule_is_refused(tmp_path):
    opts = list(PATCH_BACKBONE_OPTS)
    opts[1] = "FloorPatchBackbone"
    model = build_model(load_config(TINY_CONFIG, *opts)).eval()
    with pytest.raises(ExportError, match=r"FloorPatchBackbone .*\(3, 4\) 'patches' cells, not .* = \(4, 5\)"):
        export_model(model, "onnx", str(tmp_path))
    assert not os.listdir(tmp_path)


def test_unknown_format_and_old_opset_are_refused(tmp_path):
    model = build_model(load_config(TINY_CONFIG)).eval()
    with pytest.raises(ExportError, match="unknown export format 'tflite'; use one of torchscript, onnx"):
        export_model(model, "tflite", str(tmp_path))
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export_model(model, "onnx", str(tmp_path), opset=13)
    assert not os.listdir(tmp_path)
