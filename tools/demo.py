#!/usr/bin/env python
"""Draw a trained DETR's detections on images.

    python tools/demo.py --config-file configs/quickstart_cpu.yaml --input photo.png more/ "shots/*.jpg" \\
        --output vis/ --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Writes one PNG per input image to --output (the image's base name + .png) with the boxes, class names and
scores of the predictions scoring at least --confidence-threshold. Inputs are image paths, folders (their
images, not recursive) or glob patterns (quote them). Config overrides come after --opts, or at the end of
the command as in tools/train_net.py. MODEL.DEVICE picks CPU or GPU (``MODEL.DEVICE cpu``). Exits with status
1 and a message, not a traceback, when an input, the checkpoint or the config cannot be used.
"""
import argparse
import os
import re
import sys
import time
from typing import List, Optional, Sequence, Tuple

from detectron2.utils.logger import setup_logger

from d2_detr.config import ConfigError, load_config
from d2_detr.utils.visualize import (
    DetrPredictor,
    InputError,
    dataset_metadata,
    find_images,
    load_inference_model,
    output_paths,
    read_image_rgb,
    save_image,
    visualize_predictions,
)

# A config key such as MODEL.WEIGHTS: where trailing overrides begin when --input swallowed them.
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def get_parser() -> argparse.ArgumentParser:
    """The command line: --config-file, --input, --output, --confidence-threshold, --opts/trailing overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image paths, folders or glob patterns, e.g. 'images/*.jpg'")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn images")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw the predictions scoring at least this (default 0.5)")
    parser.add_argument("--opts", dest="flag_opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides at the end of the command, as in tools/train_net.py")
    return parser


def split_trailing_opts(inputs: List[str], opts: List[str]) -> Tuple[List[str], List[str]]:
    """Move ``KEY VALUE`` overrides that ``--input``'s list swallowed (``--input a.png MODEL.DEVICE cpu``) to
    the overrides: from the first entry that looks like a config key and is not a file."""
    for i, item in enumerate(inputs):
        if _CONFIG_KEY.match(item) and not os.path.exists(item):
            return inputs[:i], inputs[i:] + opts
    return inputs, opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    inputs, opts = split_trailing_opts(args.input, list(args.opts) + list(args.flag_opts))
    logger = setup_logger(name="demo")
    setup_logger(name="d2_detr")
    setup_logger(name="fvcore")
    if not inputs:
        sys.exit("demo.py: error: --input names no image; pass image paths, folders or glob patterns.")
    try:
        cfg = load_config(args.config_file, opts)
    except ConfigError as e:
        sys.exit(f"demo.py: error: {e}")
    try:
        images = find_images(inputs)
        model = load_inference_model(cfg)
        predictor = DetrPredictor(cfg, model)
    except InputError as e:
        sys.exit(f"demo.py: error: {e}")
    metadata = dataset_metadata(cfg)
    targets = output_paths(images, args.output)
    os.makedirs(args.output, exist_ok=True)
    logger.info("%d image(s) -> %s (device %s, threshold %.2f)", len(images), args.output, cfg.MODEL.DEVICE,
                args.confidence_threshold)
    failed = []
    for i, (path, target) in enumerate(zip(images, targets), 1):
        start = time.perf_counter()
        try:
            image = read_image_rgb(path)
        except InputError as e:
            logger.error("[%d/%d] %s", i, len(images), e)
            failed.append(path)
            continue
        instances = predictor(image)
        drawing = visualize_predictions(image, instances, metadata, args.confidence_threshold)
        save_image(drawing, target)
        shown = int((instances.scores >= args.confidence_threshold).sum())
        logger.info("[%d/%d] %s: %d detection(s) >= %.2f in %.2f s -> %s", i, len(images), path, shown,
                    args.confidence_threshold, time.perf_counter() - start, target)
    if failed:
        sys.exit(f"demo.py: error: could not read {len(failed)} of {len(images)} image(s): {', '.join(failed)}; "
                 "check that they are valid images (PNG, JPEG, ...) or leave them out.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
