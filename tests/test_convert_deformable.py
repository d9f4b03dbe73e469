"""Conversion of original Deformable DETR checkpoints (d2_detr.checkpoint.convert_deformable) and parity.

``ReferenceDeformableDetr`` below is written from the project's Deformable DETR facts with the ORIGINAL code's
parameter names (torchvision ResNet with frozen BatchNorm under ``backbone.0.body``, ``input_proj.N``,
``transformer.*``, per-layer heads and the decoder's copies of them): its state dict stands in for an original
checkpoint, and its forward, run on each image alone, is the reference the converted ``DeformableDetr`` must match
on a padded batch.
"""
import math
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter

from d2_detr.checkpoint import (
    coco_sigmoid_class_head_rows,
    convert_deformable_detr_state_dict,
    deformable_detr_variant,
    is_deformable_detr_state_dict,
    save_converted_checkpoint,
)

from .conftest import REPO_DIR, TESTS_DIR, load_config
from .model_helpers import randomize_every_tensor
from .test_checkpoint_convert import MEAN01, STD01, FrozenBatchNorm2d

TOLERANCE = 1e-4
IMAGE_SIZES = [(96, 130), (120, 84)]  # (h, w): a padded batch of two images of different sizes
TINY = dict(d=64, nhead=4, ff=64, enc=2, dec=2, queries=12, points=2)
# The reference's ResNet-18 in Detectron2's names, and its tiny transformer, under tests/configs/tiny_deformable.yaml.
TINY_OPTS = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 64, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
             "MODEL.DETR.NUM_OBJECT_QUERIES", 12, "MODEL.DETR.DROPOUT", 0.0, "MODEL.DETR.NUM_CLASSES", 80,
             "MODEL.DETR.TEST_TOPK", 0]
VARIANTS = {"base": (False, False), "refine": (True, False), "two_stage": (True, True)}


# ---------------------------------------------------------------- reference Deformable DETR, original key layout


def inverse_sigmoid(x: Tensor) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=1e-5) / (1 - x).clamp(min=1e-5))


def sine(coords: Tensor, num_feats: int) -> Tensor:
    """(...) positions -> (..., num_feats): sin at even feature i, cos at odd, of coord / 10000^(2 floor(i/2) / F)."""
    i = torch.arange(num_feats)
    angles = coords[..., None] / 10000 ** (2 * (i // 2) / num_feats)
    return torch.where(i % 2 == 0, angles.sin(), angles.cos())


class MSDeformAttn(nn.Module):
    def __init__(self, d: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, query: Tensor, ref: Tensor, value: Tensor, shapes: List, mask: Tensor) -> Tensor:
        """query (Q, d), ref (Q, L, 2|4), value (S, d), mask (S,) for ONE image."""
        q, d, m, lv, p = query.shape[0], value.shape[1], self.heads, self.levels, self.points
        value = self.value_proj(value).masked_fill(mask[:, None], 0).view(-1, m, d // m)
        offsets = self.sampling_offsets(query).view(q, m, lv, p, 2)
        weights = self.attention_weights(query).view(q, m, lv * p).softmax(-1).view(q, m, lv, p)
        if ref.shape[-1] == 2:
            size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (L, 2)
            loc = ref[:, None, :, None, :] + offsets / size[None, None, :, None, :]
        else:
            loc = ref[:, None, :, None, :2] + offsets / p * ref[:, None, :, None, 2:] * 0.5
        out = torch.zeros(m, d // m, q)
        start = 0
        for level, (h, w) in enumerate(shapes):
            grid = value[start : start + h * w].permute(1, 2, 0).reshape(m, d // m, h, w)
            start += h * w
            sampled = F.grid_sample(grid, 2 * loc[:, :, level].transpose(0, 1) - 1, align_corners=False)  # (m, D, q, p)
            out = out + (sampled * weights[:, :, level].transpose(0, 1)[:, None]).sum(-1)
        return self.output_proj(out.reshape(d, q).t())


class EncoderLayer(nn.Module):
    def __init__(self, d: int, ff: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, src, pos, ref, shapes, mask):
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, ff: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d, levels, heads, points)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, tgt, query_pos, ref, memory, shapes, mask):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt)[0])
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, ref, memory, shapes, mask))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Stack(nn.Module):
    def __init__(self, layers: List[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[2](F.relu(self.layers[1](F.relu(self.layers[0](x)))))


def add_reference_levels(model: nn.Module, d: int) -> None:
    """The original layout's ``backbone`` (torchvision ResNet-18 C3-C5, frozen BatchNorm) and ``input_proj`` (1x1
    convolutions of C3-C5, one stride-2 3x3 convolution of C5 for a fourth level, each with GroupNorm(32)) on
    ``model``."""
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    body = nn.Module()
    body.body = IntermediateLayerGetter(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"})
    model.backbone = nn.ModuleList([body])
    model.input_proj = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in (128, 256, 512)]
        + [nn.Sequential(nn.Conv2d(512, d, 3, stride=2, padding=1), nn.GroupNorm(32, d))])


def reference_levels(model: nn.Module, image: Tensor) -> Tuple[List[Tensor], List[Tuple[int, int]], Tensor]:
    """ONE 0-255 RGB image (3, h, w) through the modules of :func:`add_reference_levels` on ``model``: the 4 levels
    (d, h_l, w_l), their sizes, and their cells flattened level after level (S, d)."""
    x = ((image / 255 - torch.tensor(MEAN01)[:, None, None]) / torch.tensor(STD01)[:, None, None])[None]
    feats = list(model.backbone[0].body(x).values())
    srcs = [proj(f)[0] for proj, f in zip(model.input_proj, feats)]
    srcs.append(model.input_proj[3](feats[-1])[0])
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    return srcs, shapes, torch.cat([s.flatten(1).t() for s in srcs])


class ReferenceDeformableDetr(nn.Module):
    """torchvision ResNet-18 C3-C5 + one extra level, deformable transformer, 91-row sigmoid heads."""

    def __init__(self, refine: bool, two_stage: bool, num_classes: int = 91, d=64, nhead=4, ff=64, enc=2, dec=2,
                 queries=12, points=2) -> None:
        super().__init__()
        add_reference_levels(self, d)
        self.transformer = nn.Module()
        self.transformer.level_embed = nn.Parameter(torch.randn(4, d))
        self.transformer.encoder = Stack([EncoderLayer(d, ff, 4, nhead, points) for _ in range(enc)])
        self.transformer.decoder = Stack([DecoderLayer(d, ff, 4, nhead, points) for _ in range(dec)])
        num_heads = dec + two_stage
        make = (lambda m: [m() for _ in range(num_heads)]) if refine else (lambda m: [m()] * num_heads)
        self.class_embed = nn.ModuleList(make(lambda: nn.Linear(d, num_classes)))
        self.bbox_embed = nn.ModuleList(make(lambda: MLP(d)))
        if refine:  # the original's decoder holds the heads too (state dict keys transformer.decoder.*_embed.N)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            self.transformer.enc_output, self.transformer.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.transformer.pos_trans, self.transformer.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.query_embed = nn.Embedding(queries, 2 * d)
            self.transformer.reference_points = nn.Linear(d, 2)
        self.refine, self.two_stage, self.d, self.queries = refine, two_stage, d, queries

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        """ONE 0-255 RGB image (3, h, w), no padding -> last layer's logits (Q, K) and boxes (Q, 4)."""
        t = self.transformer
        srcs, shapes, src = reference_levels(self, image)
        pos = []
        for level, (h, w) in enumerate(shapes):
            ys = (torch.arange(1, h + 1.0) - 0.5) / (h + 1e-6) * 2 * math.pi
            xs = (torch.arange(1, w + 1.0) - 0.5) / (w + 1e-6) * 2 * math.pi
            enc = torch.cat([sine(ys, self.d // 2)[:, None].expand(h, w, -1),
                             sine(xs, self.d // 2)[None].expand(h, w, -1)], -1)
            pos.append(enc.reshape(h * w, self.d) + t.level_embed[level])
        pos = torch.cat(pos)
        mask = torch.zeros(src.shape[0], dtype=torch.bool)
        centres = [torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                              indexing="xy"), -1).reshape(-1, 2) for h, w in shapes]
        ref = torch.cat(centres)[:, None].expand(-1, 4, -1)
        memory = src
        for layer in t.encoder.layers:
            memory = layer(memory, pos, ref, shapes, mask)
        if self.two_stage:
            proposals = torch.cat([torch.cat([c, torch.full_like(c, 0.05 * 2**lvl)], -1)
                                   for lvl, c in enumerate(centres)])
            valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
            output = t.enc_output_norm(t.enc_output(memory * valid))
            coords = self.bbox_embed[-1](output) + torch.log(proposals / (1 - proposals)).masked_fill(~valid, math.inf)
            top = self.class_embed[-1](output)[:, 0].topk(self.queries).indices
            reference = coords[top].detach().sigmoid()
            query_pos, tgt = t.pos_trans_norm(t.pos_trans(sine(reference * 2 * math.pi, self.d // 2).flatten(1))).split(
                self.d, -1)
        else:
            query_pos, tgt = self.query_embed.weight.split(self.d, -1)
            reference = t.reference_points(query_pos).sigmoid()
        for i, layer in enumerate(t.decoder.layers):
            tgt = layer(tgt, query_pos, reference[:, None].expand(-1, 4, -1), memory, shapes, mask)
            delta = self.bbox_embed[i](tgt)
            if reference.shape[-1] == 2:
                delta = torch.cat([delta[:, :2] + inverse_sigmoid(reference), delta[:, 2:]], -1)
            else:
                delta = delta + inverse_sigmoid(reference)
            boxes, logits = delta.sigmoid(), self.class_embed[i](tgt)
            if self.refine:
                reference = boxes.detach()
        return {"logits": logits, "boxes": boxes}


# ---------------------------------------------------------------- helpers


def reference_model(variant: str, seed: int = 0) -> ReferenceDeformableDetr:
    """A reference model whose every tensor is random (no zero-initialised head or offset hides a wrong mapping)."""
    torch.manual_seed(seed)
    model = ReferenceDeformableDetr(*VARIANTS[variant], **TINY).eval()
    randomize_every_tensor(model, seed + 1)
    return model


def converted_model(reference: ReferenceDeformableDetr, variant: str, tmp_path) -> torch.nn.Module:
    """d2_detr's DeformableDetr loaded, through the converter and a saved checkpoint, with the reference's weights."""
    path = str(tmp_path / f"{variant}.pth")
    save_converted_checkpoint(convert_deformable_detr_state_dict(reference.state_dict()), path)
    refine, two_stage = VARIANTS[variant]
    cfg = load_config(os.path.join(TESTS_DIR, "configs", "tiny_deformable.yaml"), *TINY_OPTS,
                      "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", refine, "MODEL.DEFORMABLE_DETR.TWO_STAGE", two_stage)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(path)
    return model


def _images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in IMAGE_SIZES]


# ---------------------------------------------------------------- tests


def assert_matches_reference_per_image(model: nn.Module, reference: nn.Module) -> None:
    """``model``'s logits (on Detectron2's 80 COCO classes) and boxes on the padded batch of the test images equal
    ``reference``'s on each image alone, within TOLERANCE."""
    images = _images()
    with torch.no_grad():
        ours = model.predict(model.preprocess_image([{"image": im} for im in images]))
        expected = [reference(im) for im in images]
    rows = torch.tensor(coco_sigmoid_class_head_rows())
    for i, ref in enumerate(expected):
        assert ref["logits"].abs().max() > 1  # a non-trivial comparison
        torch.testing.assert_close(ours["pred_logits"][i], ref["logits"][:, rows], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(ours["pred_boxes"][i], ref["boxes"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_model_matches_reference_on_a_padded_batch(variant, tmp_path, one_thread):
    """Logits (on Detectron2's 80 COCO classes) and boxes of the converted model on a padded batch of two images
    equal the reference's on each image alone, within 1e-4."""
    reference = reference_model(variant)
    model = converted_model(reference, variant, tmp_path)
    assert_matches_reference_per_image(model, reference)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conversion_detects_the_variant_and_drops_the_decoder_copies(variant):
    state = reference_model(variant).state_dict()
    assert is_deformable_detr_state_dict(state) and deformable_detr_variant(state) == variant
    converted = convert_deformable_detr_state_dict(state)
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in converted)
    assert "backbone.res5.1.conv2.weight" in converted and "backbone.0.body.layer4.1.conv2.weight" not in converted
    assert converted["class_embed.0.weight"].shape == (80, 64)
    if variant == "two_stage":  # the proposal head keeps its class-agnostic row 0 first
        assert torch.equal(converted["class_embed.2.bias"][0], state["class_embed.2.bias"][0])
        assert torch.equal(converted["class_embed.2.bias"][1:], state["class_embed.2.bias"][[2, 3] + list(
            coco_sigmoid_class_head_rows()[3:])])
    kept = convert_deformable_detr_state_dict(state, coco_class_head=False)
    assert kept["class_embed.0.weight"].shape == (91, 64)


def test_detr_state_dict_is_not_taken_for_deformable():
    state = {"backbone.0.body.conv1.weight": torch.zeros(1), "input_proj.weight": torch.zeros(1),
             "transformer.encoder.layers.0.linear1.weight": torch.zeros(1)}
    assert not is_deformable_detr_state_dict(state)
    with pytest.raises(ValueError, match="does not look like an original Deformable DETR model state dict"):
        convert_deformable_detr_state_dict(state)


def test_inconsistent_decoder_copy_and_unknown_keys_are_errors():
    state = dict(reference_model("refine").state_dict())
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match="should be a copy of bbox_embed.1.layers.0.bias"):
        convert_deformable_detr_state_dict(state)
    state = dict(reference_model("base").state_dict(), **{"extra_head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="extra_head.weight"):
        convert_deformable_detr_state_dict(state)
    with pytest.raises(ValueError, match="Pass the checkpoint's 'model' entry"):
        convert_deformable_detr_state_dict({"model": state})


def test_two_stage_with_shared_heads_cannot_map_coco_classes():
    """Without refinement the proposals share the class head: its row 0 cannot be both proposal score and class 0."""
    torch.manual_seed(0)
    state = ReferenceDeformableDetr(refine=False, two_stage=True, **TINY).state_dict()
    with pytest.raises(ValueError, match="--keep-class-head"):
        convert_deformable_detr_state_dict(state)
    assert convert_deformable_detr_state_dict(state, coco_class_head=False)["class_embed.2.weight"].shape[0] == 91


def test_tool_detects_the_layout_and_names_the_config(tmp_path):
    src, out = tmp_path / "original.pth", tmp_path / "converted.pth"
    torch.save({"model": reference_model("refine").state_dict()}, src)
    proc = subprocess.run([sys.executable, os.path.join(REPO_DIR, "tools", "convert_detr_checkpoint.py"),
                           "--input", str(src), "--output", str(out)], capture_output=True, text=True, cwd=REPO_DIR,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr
    assert "Deformable DETR, ResNet-18 backbone, 80 classes" in proc.stdout and f"MODEL.WEIGHTS {out}" in proc.stdout
    assert "convert_deformable" not in proc.stderr or "decoder copies of the heads dropped" in proc.stderr
    assert set(torch.load(out, weights_only=False)["model"]) == set(convert_deformable_detr_state_dict(
        reference_model("refine").state_dict()))
