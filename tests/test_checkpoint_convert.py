"""Tests of the checkpoint converters (d2_detr.checkpoint) and their command-line tools.

``ReferenceDetr`` below is written from the DETR paper's description with the ORIGINAL implementation's
parameter names (torchvision ResNet with frozen BatchNorm under ``backbone.0.body``, ``transformer.*``, heads):
its state dict stands in for an original facebookresearch/detr checkpoint.
"""
import argparse
import math
import os
import pickle
import subprocess
import sys
from typing import List, Optional, Tuple

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter

from d2_detr import add_detr_config
from d2_detr.checkpoint import (
    DETR_CHECKPOINT_DESCRIPTION,
    coco_class_head_rows,
    convert_detr_state_dict,
    convert_torchvision_resnet_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The original normalises 0-1 RGB images with ImageNet's statistics (d2_detr: the same on the 0-255 scale).
MEAN01, STD01 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZES = [(80, 112), (112, 72)]  # (h, w): a padded batch of two images of different sizes, not multiples of 32
TOLERANCE = 1e-4
TINY_TRANSFORMER = [
    "MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 64,
    "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_OBJECT_QUERIES", 10,
]
TINY_REFERENCE = dict(d=32, nhead=4, ff=64, enc=2, dec=2, queries=10)  # ReferenceDetr's TINY_TRANSFORMER
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]


# ---------------------------------------------------------------- reference DETR, original key layout


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers), as in the original DETR."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class BackboneBody(nn.Module):
    """``backbone.0``: torchvision's ResNet with frozen BN; ``body`` returns layer4's output as "0"."""

    def __init__(self, arch: str, dilation: bool) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, arch)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        self.num_channels = resnet.fc.in_features
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})


class SinePositionEmbedding(nn.Module):
    """``backbone.1``: 2-D sine encoding, normalised, scale 2*pi, temperature 10000, y half first."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
        i = torch.arange(self.num_pos_feats)
        dim_t = 10000 ** (2 * (i // 2) / self.num_pos_feats)
        even = i % 2 == 0  # sin at even feature indices, cos at odd ones
        pos_y = y_embed[..., None] / dim_t
        pos_x = x_embed[..., None] / dim_t
        pos_y = torch.where(even, pos_y.sin(), pos_y.cos())
        pos_x = torch.where(even, pos_x.sin(), pos_x.cos())
        return torch.cat([pos_y, pos_x], dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = src + pos, v = src), then the ReLU feed-forward block."""

    def __init__(self, d: int, nhead: int, ff: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention over queries, cross-attention to the memory, feed-forward block."""

    def __init__(self, d: int, nhead: int, ff: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead)
        self.multihead_attn = nn.MultiheadAttention(d, nhead)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt)[0])
        cross = self.multihead_attn(tgt + query_pos, memory + pos, value=memory, key_padding_mask=mask)[0]
        tgt = self.norm2(tgt + cross)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Stack(nn.Module):
    """``transformer.encoder`` / ``transformer.decoder``: ``layers`` (and the decoder's final ``norm``)."""

    def __init__(self, layers: List[nn.Module], norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class Transformer(nn.Module):
    def __init__(self, d: int, nhead: int, ff: int, enc: int, dec: int) -> None:
        super().__init__()
        self.encoder = Stack([EncoderLayer(d, nhead, ff) for _ in range(enc)])
        self.decoder = Stack([DecoderLayer(d, nhead, ff) for _ in range(dec)], nn.LayerNorm(d))

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """Returns the last decoder layer's normalised output (B, Q, d)."""
        batch_size = src.shape[0]
        memory = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch_size, 1)
        tgt = torch.zeros_like(query_pos)
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
        return self.decoder.norm(tgt).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, d: int, out: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(num_layers - 1)] + [nn.Linear(d, out)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class ReferenceDetr(nn.Module):
    def __init__(self, arch: str = "resnet50", dilation: bool = False, num_classes: int = 91, d: int = 256,
                 nhead: int = 8, ff: int = 2048, enc: int = 6, dec: int = 6, queries: int = 100) -> None:
        super().__init__()
        body = BackboneBody(arch, dilation)
        self.backbone = nn.ModuleList([body, SinePositionEmbedding(d // 2)])  # the original Joiner
        self.stride = 16 if dilation else 32
        self.transformer = Transformer(d, nhead, ff, enc, dec)
        self.input_proj = nn.Conv2d(body.num_channels, d, kernel_size=1)
        self.query_embed = nn.Embedding(queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, 4, 3)

    def forward(self, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """0-255 RGB images (3, h, w) -> logits (B, Q, K+1), boxes (B, Q, 4) normalised cxcywh."""
        mean, std = torch.tensor(MEAN01)[:, None, None], torch.tensor(STD01)[:, None, None]
        height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
        batch = torch.stack([F.pad((im / 255 - mean) / std, (0, width - im.shape[2], 0, height - im.shape[1]))
                             for im in images])
        features = self.backbone[0].body(batch)["0"]
        fh, fw = features.shape[-2:]
        mask = torch.ones(len(images), fh, fw, dtype=torch.bool)
        for i, im in enumerate(images):  # valid iff y < ceil(h / stride) and x < ceil(w / stride)
            mask[i, : math.ceil(im.shape[1] / self.stride), : math.ceil(im.shape[2] / self.stride)] = False
        pos = self.backbone[1](mask)
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()


def calibrate_batchnorm_(backbone: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm (in eval mode) running statistics near those of its input on random images,
    perturbed per channel: distinct values everywhere, yet activations of the random network stay O(1)."""
    def set_statistics(module: nn.Module, inputs: Tuple[Tensor]) -> None:
        x, n = inputs[0], inputs[0].shape[1]
        std = x.std((0, 2, 3))
        module.running_mean.copy_(x.mean((0, 2, 3)) + 0.2 * std * torch.randn(n, generator=generator))
        module.running_var.copy_(std ** 2 * torch.empty(n).uniform_(0.5, 2.0, generator=generator))

    norms = [m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=generator))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
        handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
        backbone.eval()(torch.randn(2, 3, 64, 64, generator=generator))
    for handle in handles:
        handle.remove()


def random_reference(seed: int = 0, **kwargs) -> ReferenceDetr:
    """A ReferenceDetr with seeded random weights everywhere (no zero biases, no identity BatchNorm)."""
    torch.manual_seed(seed)
    model = ReferenceDetr(**kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and LayerNorm
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=generator))
    calibrate_batchnorm_(model.backbone[0].body, generator)
    return model


def random_images(seed: int = 1) -> List[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) * 255 for h, w in IMAGE_SIZES]


def reference_each_alone(reference: nn.Module, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """The reference's (logits, boxes) of each image run alone, stacked. At inference Detr's backbone sees each
    image of a mixed-size batch alone too (so no convolution reads another image's padding); its masked
    transformer then gives the same outputs as for the image alone."""
    outputs = [reference([image]) for image in images]
    return torch.cat([logits for logits, _ in outputs]), torch.cat([boxes for _, boxes in outputs])


# ---------------------------------------------------------------- d2_detr side


def build_detr(config_file: str, *opts):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return build_model(cfg).eval()


def checkpointer_load(model: nn.Module, path: str):
    """``DetectionCheckpointer(model).load(path)``, returning the incompatible keys it found."""
    checkpointer = DetectionCheckpointer(model)
    found = []
    load_model = checkpointer._load_model
    checkpointer._load_model = lambda checkpoint: found.append(load_model(checkpoint)) or found[-1]
    checkpointer.load(path)
    return found[0]


def assert_loads_exactly(model: nn.Module, path: str) -> None:
    """Every weight of ``model`` is loaded and nothing else is in the checkpoint."""
    incompatible = checkpointer_load(model, path)
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []


@torch.no_grad()
def detr_outputs(model: nn.Module, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
    outputs = model.predict(model.preprocess_image([{"image": im} for im in images]))
    return outputs["pred_logits"], outputs["pred_boxes"]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("config_file,dilation,small", [("detr_r50.yaml", False, False),
                                                       ("detr_r50_dc5.yaml", True, True)])
def test_parity_with_original_layout_coco_head(tmp_path, config_file, dilation, small):
    """DETR-R50 (full size) and R50-DC5 (full backbone, small transformer for speed) with the 92-row COCO
    head: same logits (at the mapped rows) and boxes on a padded batch of two images of different sizes."""
    reference = random_reference(dilation=dilation, **(TINY_REFERENCE if small else {}))
    images = random_images()
    with torch.no_grad():
        ref_logits, ref_boxes = reference_each_alone(reference, images)

    converted = convert_detr_state_dict(reference.state_dict())
    assert converted["class_embed.weight"].shape[0] == 81
    path = str(tmp_path / "model.pth")
    save_converted_checkpoint(converted, path)
    model = build_detr(config_file, *(TINY_TRANSFORMER if small else []))
    assert_loads_exactly(model, path)
    logits, boxes = detr_outputs(model, images)

    assert logits.shape == (2, 10 if small else 100, 81)
    rows = coco_class_head_rows()
    assert rows[0] == 1 and rows[-2] == 90 and rows[-1] == 91
    assert (logits - ref_logits[..., rows]).abs().max() < TOLERANCE
    assert (boxes - ref_boxes).abs().max() < TOLERANCE


def test_parity_custom_class_head_passes_through(tmp_path):
    """R-18 (basic blocks), a 6-row class head (5 classes): the head is kept as it is."""
    reference = random_reference(arch="resnet18", num_classes=5, **TINY_REFERENCE)
    images = random_images(seed=2)
    with torch.no_grad():
        ref_logits, ref_boxes = reference_each_alone(reference, images)

    original = reference.state_dict()
    converted = convert_detr_state_dict(original)
    assert torch.equal(converted["class_embed.weight"], original["class_embed.weight"])
    path = str(tmp_path / "model.pth")
    save_converted_checkpoint(converted, path)
    model = build_detr("Base-DETR.yaml", *R18, *TINY_TRANSFORMER, "MODEL.DETR.NUM_CLASSES", 5)
    assert_loads_exactly(model, path)
    logits, boxes = detr_outputs(model, images)
    assert (logits - ref_logits).abs().max() < TOLERANCE
    assert (boxes - ref_boxes).abs().max() < TOLERANCE


def _fake_detr_state_dict(rows: int) -> dict:
    """The smallest dict with an original DETR checkpoint's key families (shapes irrelevant here)."""
    sd = {"backbone.0.body.conv1.weight": torch.zeros(2, 3, 1, 1)}
    sd.update({f"backbone.0.body.bn1.{t}": torch.zeros(2) for t in ("weight", "bias", "running_mean", "running_var")})
    sd.update({
        "backbone.0.body.layer3.22.bn2.running_var": torch.ones(2),
        "backbone.0.body.layer4.0.downsample.0.weight": torch.zeros(2, 2, 1, 1),
        "backbone.0.body.layer4.0.downsample.1.num_batches_tracked": torch.tensor(0),
        "transformer.decoder.norm.weight": torch.ones(4),
        "input_proj.weight": torch.zeros(4, 2, 1, 1),
        "query_embed.weight": torch.zeros(3, 4),
        "class_embed.weight": torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 4),
        "class_embed.bias": torch.arange(rows, dtype=torch.float32),
        "bbox_embed.layers.2.bias": torch.zeros(4),
        "backbone.1.row_embed.weight": torch.zeros(50, 2),  # the "learned" position encoding
    })
    return sd


def test_key_mapping_and_class_head_options():
    converted = convert_detr_state_dict(_fake_detr_state_dict(92))
    assert set(converted) == {
        "backbone.stem.conv1.weight", "backbone.stem.conv1.norm.weight", "backbone.stem.conv1.norm.bias",
        "backbone.stem.conv1.norm.running_mean", "backbone.stem.conv1.norm.running_var",
        "backbone.res4.22.conv2.norm.running_var", "backbone.res5.0.shortcut.weight",
        "transformer.decoder.norm.weight", "input_proj.weight", "query_embed.weight",
        "class_embed.weight", "class_embed.bias", "bbox_embed.layers.2.bias", "position_encoding.row_embed.weight",
    }
    # Row i of the COCO head is COCO category id i, so the mapped bias holds the ids.
    assert converted["class_embed.bias"].tolist() == coco_class_head_rows()
    assert converted["class_embed.bias"][:12].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert converted["class_embed.bias"][-1] == 91

    kept = convert_detr_state_dict(_fake_detr_state_dict(92), coco_class_head=False)
    assert kept["class_embed.bias"].tolist() == list(range(92))
    assert convert_detr_state_dict(_fake_detr_state_dict(6))["class_embed.bias"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="92 rows"):
        convert_detr_state_dict(_fake_detr_state_dict(6), coco_class_head=True)


def test_torchvision_resnet_gives_same_res5(tmp_path):
    """torchvision's ResNet-50 (BatchNorm in eval mode) and the converted backbone: same res5 features."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    calibrate_batchnorm_(resnet, torch.Generator().manual_seed(0))
    converted = convert_torchvision_resnet_state_dict(resnet.state_dict())
    assert not any(k.startswith("backbone.fc") or "num_batches_tracked" in k for k in converted)
    path = str(tmp_path / "r50.pth")
    save_converted_checkpoint(converted, path)

    model = build_detr("detr_r50.yaml", *TINY_TRANSFORMER)
    incompatible = checkpointer_load(model, path)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]

    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = IntermediateLayerGetter(resnet, {"layer4": "out"})(x)["out"]
        actual = model.backbone(x)["res5"]
    assert actual.shape == expected.shape == (1, 2048, 2, 3)
    assert (actual - expected).abs().max() < TOLERANCE * max(1.0, expected.abs().max().item())


def test_resnet101_keys_load_as_model_weights(tmp_path):
    """ResNet-101 (23 blocks in layer3): every backbone key maps, through MODEL.WEIGHTS of detr_r101.yaml."""
    converted = convert_torchvision_resnet_state_dict(torchvision.models.resnet101(weights=None).state_dict())
    assert resnet_depth(converted) == 101
    assert "backbone.res4.22.conv3.norm.running_var" in converted
    path = str(tmp_path / "r101.pth")
    save_converted_checkpoint(converted, path)

    model = build_detr("detr_r101.yaml", *TINY_TRANSFORMER)
    incompatible = checkpointer_load(model, path)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    backbone_keys = {"backbone." + k for k in model.backbone.state_dict()}
    assert set(converted) == backbone_keys
    assert not backbone_keys & set(incompatible.missing_keys)


def test_bad_input_raises_clear_value_error():
    random_dict = {"foo.weight": torch.zeros(1), "bar": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"original DETR.*backbone\.0\.body\.conv1\.weight.*found: bar, foo\.weight"):
        convert_detr_state_dict(random_dict)
    with pytest.raises(ValueError, match=r"torchvision ResNet.*conv1\.weight.*found: bar, foo\.weight"):
        convert_torchvision_resnet_state_dict(random_dict)
    with pytest.raises(ValueError, match=r"dict of tensors.*got list"):
        convert_detr_state_dict([1, 2])

    detr = _fake_detr_state_dict(92)
    with pytest.raises(ValueError, match="'model' entry"):
        convert_detr_state_dict({"model": detr})
    with pytest.raises(ValueError, match="convert_detr_state_dict"):
        convert_torchvision_resnet_state_dict(detr)
    with pytest.raises(ValueError, match=r"backbone\.0\.body\.layer9\.0\.conv1\.weight, mask_head\.weight"):
        convert_detr_state_dict({**detr, "mask_head.weight": torch.zeros(1),
                                 "backbone.0.body.layer9.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="original DETR"):
        convert_detr_state_dict(torchvision.models.resnet18(weights=None).state_dict())
    with pytest.raises(ValueError, match=r"\.pkl"):
        save_converted_checkpoint({}, "model.pkl")


def _run_tool(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_tools_end_to_end(tmp_path):
    reference = random_reference(arch="resnet18", **TINY_REFERENCE)  # COCO head
    src = str(tmp_path / "detr-r18.pth")
    # A training checkpoint of the original also stores its argparse arguments.
    torch.save({"model": reference.state_dict(), "args": argparse.Namespace(lr=1e-4)}, src)
    out = str(tmp_path / "out" / "model.pth")
    stdout = _run_tool("convert_detr_checkpoint.py", "--input", src, "--output", out)
    assert f"MODEL.WEIGHTS {out}" in stdout and "MODEL.DETR.NUM_CLASSES 80" in stdout
    assert os.listdir(tmp_path / "out") == ["model.pth"]  # no temporary file left behind
    checkpoint = torch.load(out)
    assert checkpoint["__author__"] == "d2_detr" and checkpoint["matching_heuristics"] is False
    assert_loads_exactly(build_detr("Base-DETR.yaml", *R18, *TINY_TRANSFORMER), out)

    resnet_src = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet_src)
    resnet_out = str(tmp_path / "r18.pth")
    stdout = _run_tool("convert_torchvision_resnet.py", "--input", resnet_src, "--output", resnet_out)
    assert f"MODEL.WEIGHTS {resnet_out}" in stdout
    converted = load_state_dict_file(resnet_out)
    assert converted.keys() == convert_torchvision_resnet_state_dict(torch.load(resnet_src)).keys()


def _write_bad_checkpoints(directory) -> dict:
    """Files a user may pass instead of a checkpoint: name -> (path, exception type, what the message says)."""
    good = str(directory / "good.pth")
    torch.save({"model": _fake_detr_state_dict(92)}, good)
    data = open(good, "rb").read()
    legacy = str(directory / "legacy.pth")
    torch.save({"model": _fake_detr_state_dict(92)}, legacy, _use_new_zipfile_serialization=False)
    legacy_data = open(legacy, "rb").read()
    files = {
        "text": (b"hello world\n", ValueError, r"not written by torch\.save: it is text, starting with 'hello world'"),
        "html": (b"<!DOCTYPE html><html>Not found</html>", ValueError, "an HTML page"),
        "empty": (b"", ValueError, "is empty"),
        "truncated": (data[: len(data) // 2], ValueError, "truncated or corrupt"),
        "truncated_legacy": (legacy_data[: len(legacy_data) // 2], ValueError, "truncated or corrupt"),
        "plain_pickle": (pickle.dumps({"model": {}}, protocol=4), ValueError, "plain Python pickle"),
    }
    cases = {}
    for name, (content, error, message) in files.items():
        path = str(directory / f"{name}.pth")
        with open(path, "wb") as f:
            f.write(content)
        cases[name] = (path, error, message)
    module = str(directory / "module.pth")
    torch.save(nn.Linear(2, 2), module)  # a whole model, pickled
    cases["whole_module"] = (module, ValueError, r"holds a torch\.nn\.modules\.linear\.Linear.*state_dict\(\)")
    cases["missing"] = (str(directory / "missing.pth"), FileNotFoundError, "does not exist")
    cases["directory"] = (str(directory), FileNotFoundError, "is a directory")
    return cases


BAD_CHECKPOINTS = ["text", "html", "empty", "truncated", "truncated_legacy", "plain_pickle", "whole_module",
                   "missing", "directory"]


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_file_raises_clear_error(tmp_path, case):
    path, error, message = _write_bad_checkpoints(tmp_path)[case]
    with pytest.raises(error, match=message) as info:
        load_state_dict_file(path, expected=DETR_CHECKPOINT_DESCRIPTION)
    assert path in str(info.value) and "original DETR checkpoint" in str(info.value)


@pytest.mark.parametrize("case", ["text", "truncated", "missing"])
def test_convert_tool_on_bad_file_names_it_and_writes_nothing(tmp_path, case):
    path, _, message = _write_bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out" / "model.pth"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_detr_checkpoint.py"), "--input", path, "--output",
         str(out)], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert f"\nerror: {path}" in "\n" + result.stderr and "original DETR checkpoint" in result.stderr
    assert not out.parent.exists()


def test_convert_tool_on_a_state_dict_of_another_model(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, path)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_detr_checkpoint.py"), "--input", path, "--output",
         str(tmp_path / "model.pth")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {path}: This does not look like an original DETR model state dict" in result.stderr
    assert not (tmp_path / "model.pth").exists()
