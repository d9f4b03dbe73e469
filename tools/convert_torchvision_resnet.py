#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet state dict to initial weights of d2_detr's backbone.

    python tools/convert_torchvision_resnet.py --input resnet50-0676ba61.pth --output r50.pth
    python tools/train_net.py --config-file configs/detr_r50.yaml MODEL.WEIGHTS r50.pth

Where torchvision's published files can be downloaded, ``MODEL.WEIGHTS torchvision://resnet50`` (or resnet101, ...)
does the same on the fly (d2_detr.checkpoint.torchvision_weights); this tool is for a file at hand.
"""
import argparse
import logging
import sys

from d2_detr.checkpoint import (
    TORCHVISION_RESNET_DESCRIPTION,
    convert_torchvision_resnet_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="torchvision ResNet state dict (.pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        state_dict = load_state_dict_file(args.input, expected=TORCHVISION_RESNET_DESCRIPTION)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        converted = convert_torchvision_resnet_state_dict(state_dict)
    except ValueError as e:
        sys.exit(f"error: {args.input}: {e}\nExpected {TORCHVISION_RESNET_DESCRIPTION}.")
    try:
        save_converted_checkpoint(converted, args.output)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot write {args.output}: {e}")
    depth = resnet_depth(converted)
    config = f"configs/detr_r{depth}.yaml" if depth in (50, 101) else "CONFIG"
    print(f"Wrote {args.output} (ResNet-{depth} backbone). Use it as MODEL.WEIGHTS with a ResNet-{depth} config:\n"
          f"  python tools/train_net.py --config-file {config} MODEL.WEIGHTS {args.output}")


if __name__ == "__main__":
    main()
