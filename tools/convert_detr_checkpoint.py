#!/usr/bin/env python
"""Convert an original DETR checkpoint (facebookresearch/detr) to d2_detr's parameter names.

    python tools/convert_detr_checkpoint.py --input detr-r50-e632da11.pth --output model.pth
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth

The COCO class head (92 rows indexed by COCO category id) becomes Detectron2's 80 contiguous classes +
"no object" (a panoptic DETRsegm head of 251 rows: its 133 panoptic classes + "no object", and the mask head
is kept); ``--keep-class-head`` keeps it (and any other head) as it is.
"""
import argparse
import logging
import sys

from d2_detr.checkpoint import (
    DETR_CHECKPOINT_DESCRIPTION,
    convert_detr_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="original DETR checkpoint ({'model': state_dict} or a bare state dict)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--keep-class-head", action="store_true",
                        help="keep the class head's rows as they are (no COCO id -> contiguous mapping)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        state_dict = load_state_dict_file(args.input, expected=DETR_CHECKPOINT_DESCRIPTION)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        converted = convert_detr_state_dict(state_dict, coco_class_head=False if args.keep_class_head else None)
    except ValueError as e:
        sys.exit(f"error: {args.input}: {e}\nExpected {DETR_CHECKPOINT_DESCRIPTION}.")
    try:
        save_converted_checkpoint(converted, args.output)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot write {args.output}: {e}")
    num_classes = converted["class_embed.weight"].shape[0] - 1
    depth = resnet_depth(converted)
    config = f"configs/detr_r{depth}.yaml" if depth in (50, 101) else "CONFIG"
    if any(k.startswith("mask_head.") for k in converted):  # a DETRsegm checkpoint: panoptic as released
        config = "configs/detr_r50_panoptic.yaml" if depth == 50 else "CONFIG (MODEL.MASK_ON True)"
    print(f"Wrote {args.output} (ResNet-{depth} backbone, {num_classes} classes). Use it as MODEL.WEIGHTS "
          "(for a DC5 checkpoint, with the *_dc5.yaml config):\n"
          f"  python tools/train_net.py --config-file {config} --eval-only "
          f"MODEL.WEIGHTS {args.output} MODEL.DETR.NUM_CLASSES {num_classes}")


if __name__ == "__main__":
    main()
