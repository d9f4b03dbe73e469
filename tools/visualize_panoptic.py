#!/usr/bin/env python
"""Draw a panoptic DETR's output on images of a registered panoptic dataset, next to the ground truth.

    python tools/visualize_panoptic.py --config-file configs/quickstart_panoptic_cpu_masks.yaml \\
        --output docs/images/panoptic_synthetic.png MODEL.WEIGHTS output/quickstart_panoptic/masks/model_final.pth

Writes one PNG: the ground truth of the first --num-images images of --dataset (default: DATASETS.TEST[0]) in the
top row, the model's panoptic segmentation (MODEL.MASK_ON and MODEL.DETR.PANOPTIC_ON) in the bottom row, drawn
with Detectron2's Visualizer. Trailing KEY VALUE pairs override the config as in tools/train_net.py.
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

from d2_detr.config import ConfigError, load_config
from d2_detr.utils.visualize import InputError, load_inference_model
from d2_detr.utils.visualize_panoptic import draw_panoptic_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="PNG")
    parser.add_argument("--dataset", default=None, help="registered panoptic dataset (default DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--scale", type=float, default=2.0, help="drawing scale (default 2)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE")
    args = parser.parse_args()
    setup_logger(name="d2_detr")
    try:
        cfg = load_config(args.config_file, args.opts)
        model = load_inference_model(cfg)
    except (ConfigError, InputError) as e:
        sys.exit(f"error: {e}")
    path = draw_panoptic_grid(cfg, model, args.dataset or cfg.DATASETS.TEST[0], args.output, args.num_images,
                              args.scale)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
