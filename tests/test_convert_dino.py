"""Conversion of original DINO checkpoints: a reference DINO written here in the original's key layout (one image,
no padding, the original's computations step by step), converted and loaded into d2_detr's Dino, gives the same
logits and boxes on a padded batch; renames, copies and class-row mapping of the converter."""
import math
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import Tensor, nn
from torch.nn import functional as F

from d2_detr.checkpoint import coco_sigmoid_class_head_rows, save_converted_checkpoint
from d2_detr.checkpoint.convert_dino import convert_dino_state_dict, is_dino_state_dict

from .conftest import REPO_DIR, TESTS_DIR, load_config
from .model_helpers import randomize_every_tensor
from .test_convert_deformable import (MLP, DecoderLayer, EncoderLayer, Stack, add_reference_levels,
                                     assert_matches_reference_per_image, reference_levels, reference_model)

TINY = dict(d=64, nhead=4, ff=64, enc=2, dec=2, queries=12, points=2)
TINY_OPTS = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.STEM_OUT_CHANNELS", 64, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
             "MODEL.DETR.NUM_OBJECT_QUERIES", 12, "MODEL.DETR.NUM_CLASSES", 80, "MODEL.DETR.TEST_TOPK", 0,
             "MODEL.DINO.DN_LABELBOOK_SIZE", 91]


def sine(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """(...) positions -> (..., num_feats): sin at even feature i, cos at odd, of coord / T^(2 floor(i/2) / F)."""
    i = torch.arange(num_feats)
    angles = coords[..., None] / temperature ** (2 * (i // 2) / num_feats)
    return torch.where(i % 2 == 0, angles.sin(), angles.cos())


def inverse_sigmoid(x: Tensor) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3))


class RefPointHead(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2 * d, d), nn.Linear(d, d)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[1](F.relu(self.layers[0](x)))


class ReferenceDino(nn.Module):
    """torchvision ResNet-18 C3-C5 + one extra level, deformable encoder, mixed query selection, DINO decoder,
    91-row heads shared by the decoder layers, separate encoder heads, denoising label embedding."""

    def __init__(self, d=64, nhead=4, ff=64, enc=2, dec=2, queries=12, points=2, num_classes=91) -> None:
        super().__init__()
        add_reference_levels(self, d)
        t = self.transformer = nn.Module()
        t.level_embed = nn.Parameter(torch.randn(4, d))
        t.encoder = Stack([EncoderLayer(d, ff, 4, nhead, points) for _ in range(enc)])
        t.decoder = Stack([DecoderLayer(d, ff, 4, nhead, points) for _ in range(dec)])
        t.decoder.norm, t.decoder.ref_point_head = nn.LayerNorm(d), RefPointHead(d)
        t.tgt_embed = nn.Embedding(queries, d)
        t.enc_output, t.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
        t.enc_out_class_embed, t.enc_out_bbox_embed = nn.Linear(d, num_classes), MLP(d)
        self.label_enc = nn.Embedding(92, d)
        self.class_embed = nn.ModuleList([nn.Linear(d, num_classes)] * dec)
        self.bbox_embed = nn.ModuleList([MLP(d)] * dec)
        t.decoder.class_embed, t.decoder.bbox_embed = self.class_embed, self.bbox_embed
        self.d, self.queries = d, queries

    def forward(self, image: Tensor) -> Dict[str, Tensor]:
        """ONE 0-255 RGB image (3, h, w), no padding -> last layer's logits (Q, K) and boxes (Q, 4)."""
        t, d = self.transformer, self.d
        srcs, shapes, src = reference_levels(self, image)
        pos = []
        for level, (h, w) in enumerate(shapes):  # no -0.5 offset, temperature 20
            ys = torch.arange(1, h + 1.0) / (h + 1e-6) * 2 * math.pi
            xs = torch.arange(1, w + 1.0) / (w + 1e-6) * 2 * math.pi
            enc = torch.cat([sine(ys, d // 2, 20.0)[:, None].expand(h, w, -1),
                             sine(xs, d // 2, 20.0)[None].expand(h, w, -1)], -1)
            pos.append(enc.reshape(h * w, d) + t.level_embed[level])
        pos = torch.cat(pos)
        mask = torch.zeros(src.shape[0], dtype=torch.bool)
        centres = [torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                              indexing="xy"), -1).reshape(-1, 2) for h, w in shapes]
        memory = src
        for layer in t.encoder.layers:
            memory = layer(memory, pos, torch.cat(centres)[:, None].expand(-1, 4, -1), shapes, mask)
        proposals = torch.cat([torch.cat([c, torch.full_like(c, 0.05 * 2**lvl)], -1) for lvl, c in enumerate(centres)])
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        output = t.enc_output_norm(t.enc_output(memory * valid))
        coords = t.enc_out_bbox_embed(output) + torch.log(proposals / (1 - proposals)).masked_fill(~valid, math.inf)
        top = t.enc_out_class_embed(output).max(-1).values.topk(self.queries).indices
        reference = coords[top].sigmoid()
        tgt = t.tgt_embed.weight
        for i, layer in enumerate(t.decoder.layers):
            embedding = torch.cat([sine(reference[:, k] * 2 * math.pi, d // 2, 10000.0) for k in (1, 0, 2, 3)], -1)
            tgt = layer(tgt, t.decoder.ref_point_head(embedding), reference[:, None].expand(-1, 4, -1), memory,
                        shapes, mask)
            hs = t.decoder.norm(tgt)
            logits = self.class_embed[i](hs)
            boxes = (self.bbox_embed[i](hs) + inverse_sigmoid(reference)).sigmoid()
            reference = (self.bbox_embed[i](tgt) + inverse_sigmoid(reference)).sigmoid()
        return {"logits": logits, "boxes": boxes}


def reference_dino(seed: int = 0) -> ReferenceDino:
    """A reference model whose every tensor is random (no zero-initialised head or offset hides a wrong mapping)."""
    torch.manual_seed(seed)
    model = ReferenceDino(**TINY).eval()
    randomize_every_tensor(model, seed + 1)
    return model


def test_converted_model_matches_reference_on_a_padded_batch(tmp_path, one_thread):
    """Logits (on Detectron2's 80 COCO classes) and boxes of the converted model on a padded batch of two images
    equal the reference's on each image alone, within 1e-4."""
    reference = reference_dino()
    path = str(tmp_path / "dino.pth")
    save_converted_checkpoint(convert_dino_state_dict(reference.state_dict()), path)
    model = build_model(load_config(os.path.join(TESTS_DIR, "configs", "tiny_dino.yaml"), *TINY_OPTS)).eval()
    DetectionCheckpointer(model).load(path)
    assert_matches_reference_per_image(model, reference)


def test_conversion_renames_maps_rows_and_drops_the_decoder_copies():
    state = reference_dino().state_dict()
    assert is_dino_state_dict(state)
    converted = convert_dino_state_dict(state)
    assert not any(k.startswith(("transformer.decoder.bbox_embed", "transformer.decoder.class_embed",
                                 "transformer.enc_out_")) for k in converted)
    assert "backbone.res5.1.conv2.weight" in converted and "enc_bbox_embed.layers.2.weight" in converted
    rows = coco_sigmoid_class_head_rows()
    assert torch.equal(converted["enc_class_embed.weight"], state["transformer.enc_out_class_embed.weight"][rows])
    assert torch.equal(converted["class_embed.1.bias"], state["class_embed.1.bias"][rows])
    labels = converted["label_enc.weight"]
    assert labels.shape == (92, 64) and torch.equal(labels[:80], state["label_enc.weight"][rows])
    assert torch.equal(labels[80:], state["label_enc.weight"][[i for i in range(92) if i not in rows]])
    kept = convert_dino_state_dict(state, coco_class_head=False)
    assert kept["class_embed.0.weight"].shape == (91, 64) and torch.equal(kept["label_enc.weight"],
                                                                          state["label_enc.weight"])


def test_deformable_detr_state_dict_is_not_taken_for_dino():
    state = reference_model("two_stage").state_dict()
    assert not is_dino_state_dict(state)
    with pytest.raises(ValueError, match="does not look like an original DINO model state dict"):
        convert_dino_state_dict(state)


def test_inconsistent_decoder_copy_and_unknown_keys_are_errors():
    state = dict(reference_dino().state_dict())
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match="should be a copy of bbox_embed.1.layers.0.bias"):
        convert_dino_state_dict(state)
    state = dict(reference_dino().state_dict(), **{"extra_head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="extra_head.weight"):
        convert_dino_state_dict(state)


def test_tool_detects_the_layout_and_names_the_config(tmp_path):
    src, out = tmp_path / "original.pth", tmp_path / "converted.pth"
    torch.save({"model": reference_dino().state_dict()}, src)
    proc = subprocess.run([sys.executable, os.path.join(REPO_DIR, "tools", "convert_detr_checkpoint.py"),
                           "--input", str(src), "--output", str(out)], capture_output=True, text=True, cwd=REPO_DIR,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr
    assert "DINO, ResNet-18 backbone, 80 classes" in proc.stdout and f"MODEL.WEIGHTS {out}" in proc.stdout
    assert set(torch.load(out, weights_only=False)["model"]) == set(convert_dino_state_dict(
        reference_dino().state_dict()))
