#!/usr/bin/env python
"""Export a trained DETR to TorchScript or ONNX, and check that the exported file gives the PyTorch model's outputs.

    python tools/export_model.py --config-file configs/detr_r50.yaml --format onnx --output exported/ \\
        MODEL.WEIGHTS output/detr_r50/model_final.pth

Writes OUTPUT/model.onnx (``--format onnx``, opset ``--opset``, default 17) or OUTPUT/model.ts (``--format
torchscript``, load it with ``torch.jit.load``). The graph takes ``images`` (B, 3, H, W) float32 pixels (0-255,
INPUT.FORMAT channel order, zero-padded bottom/right to the largest image) and ``image_sizes`` (B, 2) int64, and
returns ``boxes`` (B, N, 4) xyxy pixels, ``scores`` (B, N), ``labels`` (B, N) and with MODEL.MASK_ON ``masks``
(B, N, H, W) bool; see docs/export.md. The model is exported on the CPU. Afterwards the exported file and
the PyTorch model are run on a padded batch of two random images at the test size (INPUT.MIN_SIZE_TEST /
MAX_SIZE_TEST) and must agree within ``--atol``. Config overrides (KEY VALUE) go at the end, as in
tools/train_net.py. Exits with status 1 and a message, not a traceback, when the config, the checkpoint or the
model cannot be exported.
"""
import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

from d2_detr.config import ConfigError, load_config
from d2_detr.env import MissingExtraError, require_extra
from d2_detr.export import (
    EXPORT_FORMATS,
    MIN_ONNX_OPSET,
    ExportError,
    check_exportable_config,
    export_model,
    verify_export,
)
from d2_detr.utils.visualize import InputError, load_inference_model


def get_parser() -> argparse.ArgumentParser:
    """The command line: --config-file, --format, --output, --opset, --atol, trailing KEY VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="file format to write")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the exported file")
    parser.add_argument("--opset", type=int, default=MIN_ONNX_OPSET,
                        help=f"ONNX opset, {MIN_ONNX_OPSET} or newer (default {MIN_ONNX_OPSET})")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest difference of scores, and of boxes relative to the image size, accepted by the "
                             "check (default 1e-4)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def setup_cfg(config_file: str, opts: List[str]) -> CfgNode:
    """The frozen config: Detectron2's defaults, d2_detr's keys, the config file, ``opts``, then MODEL.DEVICE cpu."""
    cfg = load_config(config_file, opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def verification_sizes(cfg: CfgNode) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Two image sizes (h, w) at the test resolution: a 3:4 landscape image and a smaller 4:3 portrait one."""
    short = min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    long = min(cfg.INPUT.MAX_SIZE_TEST, round(short * 4 / 3))
    return (short, long), (round(short * 3 / 4), short)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="export_model")
    setup_logger(name="d2_detr")
    setup_logger(name="fvcore")
    try:
        cfg = setup_cfg(args.config_file, list(args.opts))
    except ConfigError as e:
        sys.exit(f"export_model.py: error: {e}")
    try:
        if args.format == "onnx":
            require_extra("export", "ONNX export and its verification")  # before loading and tracing the model
        check_exportable_config(cfg)
        model = load_inference_model(cfg)
        path = export_model(model, args.format, args.output, opset=args.opset)
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(3, h, w, generator=generator) * 255 for h, w in verification_sizes(cfg)]
        verify_export(model, path, images, atol=args.atol)
    except (InputError, ExportError, MissingExtraError) as e:
        sys.exit(f"export_model.py: error: {e}")
    logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
