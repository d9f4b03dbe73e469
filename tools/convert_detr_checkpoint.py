#!/usr/bin/env python
"""Convert an original DETR (facebookresearch/detr), Deformable DETR (fundamentalvision/Deformable-DETR) or DINO
(IDEA-Research/DINO) checkpoint to d2_detr's parameter names; which it is is read from its keys (or set with
--layout).

    python tools/convert_detr_checkpoint.py --input detr-r50-e632da11.pth --output model.pth
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth

    python tools/convert_detr_checkpoint.py --input r50_deformable_detr-checkpoint.pth --output model.pth
    python tools/train_net.py --config-file configs/deformable_detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth

    python tools/convert_detr_checkpoint.py --input checkpoint0011_4scale.pth --output model.pth
    python tools/train_net.py --config-file configs/dino_r50_4scale_12ep.yaml --eval-only MODEL.WEIGHTS model.pth

DETR's COCO class head (92 rows indexed by COCO category id) becomes Detectron2's 80 contiguous classes +
"no object" (a panoptic DETRsegm head of 251 rows: its 133 panoptic classes + "no object", and the mask head
is kept); Deformable DETR's and DINO's 91-row sigmoid heads become the 80 classes. ``--keep-class-head`` keeps
them (and any other head) as they are.
"""
import argparse
import logging
import sys

from d2_detr.checkpoint import (
    DETR_CHECKPOINT_DESCRIPTION,
    convert_deformable_detr_state_dict,
    convert_detr_state_dict,
    convert_dino_state_dict,
    deformable_detr_variant,
    is_deformable_detr_state_dict,
    is_dino_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)

# Config of each released Deformable DETR variant.
DEFORMABLE_CONFIGS = {"base": "configs/deformable_detr_r50.yaml", "refine": "configs/deformable_detr_r50_refine.yaml",
                      "two_stage": "configs/deformable_detr_r50_two_stage.yaml"}


def detr_config(converted, depth) -> str:
    """The config to evaluate a converted DETR checkpoint with."""
    if any(k.startswith("mask_head.") for k in converted):  # a DETRsegm checkpoint: panoptic as released
        return "configs/detr_r50_panoptic.yaml" if depth == 50 else "CONFIG (MODEL.MASK_ON True)"
    return f"configs/detr_r{depth}.yaml" if depth in (50, 101) else "CONFIG"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="original checkpoint ({'model': state_dict} or a bare state dict)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument("--layout", choices=("auto", "detr", "deformable_detr", "dino"), default="auto",
                        help="the original model the checkpoint comes from (default: read from its keys)")
    parser.add_argument("--keep-class-head", action="store_true",
                        help="keep the class head's rows as they are (no COCO id -> contiguous mapping)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    coco_class_head = False if args.keep_class_head else None
    try:
        state_dict = load_state_dict_file(args.input, expected=DETR_CHECKPOINT_DESCRIPTION)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    dino = args.layout == "dino" or (args.layout == "auto" and is_dino_state_dict(state_dict))
    deformable = dino or args.layout == "deformable_detr" or (
        args.layout == "auto" and is_deformable_detr_state_dict(state_dict))
    try:
        if dino:
            converted = convert_dino_state_dict(state_dict, coco_class_head=coco_class_head)
        elif deformable:
            converted = convert_deformable_detr_state_dict(state_dict, coco_class_head=coco_class_head)
        else:
            converted = convert_detr_state_dict(state_dict, coco_class_head=coco_class_head)
    except ValueError as e:
        sys.exit(f"error: {args.input}: {e}\nExpected {DETR_CHECKPOINT_DESCRIPTION}.")
    try:
        save_converted_checkpoint(converted, args.output)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot write {args.output}: {e}")
    depth = resnet_depth(converted)
    if dino:
        num_classes = converted["class_embed.0.weight"].shape[0]
        config = "configs/dino_r50_4scale_12ep.yaml" if depth == 50 else "CONFIG"
        model = "DINO"
    elif deformable:
        num_classes = converted["class_embed.0.weight"].shape[0]
        config = DEFORMABLE_CONFIGS[deformable_detr_variant(state_dict)] if depth == 50 else "CONFIG"
        model = "Deformable DETR"
    else:
        num_classes = converted["class_embed.weight"].shape[0] - 1
        config = detr_config(converted, depth)
        model = "DETR"
    dc5 = "" if deformable else " (for a DC5 checkpoint, with the *_dc5.yaml config)"
    print(f"Wrote {args.output} ({model}, ResNet-{depth} backbone, {num_classes} classes). Use it as MODEL.WEIGHTS"
          f"{dc5}:\n  python tools/train_net.py --config-file {config} --eval-only "
          f"MODEL.WEIGHTS {args.output} MODEL.DETR.NUM_CLASSES {num_classes}")


if __name__ == "__main__":
    main()
