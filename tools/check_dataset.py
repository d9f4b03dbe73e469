#!/usr/bin/env python
"""Check datasets before a long job: every image exists, decodes and has the height and width of its record, and
every annotation has a finite box inside the image and a known category id.

    python tools/check_dataset.py --config-file configs/detr_r50.yaml          # DATASETS.TRAIN and DATASETS.TEST
    python tools/check_dataset.py --config-file configs/detr_r50.yaml --dataset coco_2017_val --num-workers 8
    python tools/check_dataset.py --coco-json my/annotations_train.json --image-root my/images

With a config, MODEL.DETR.NUM_CLASSES is also compared with the datasets' classes. Progress is logged every 5% of
a dataset. Prints one line per problem (dataset: file: what is wrong) and exits with status 1 if there is any,
0 otherwise. For datasets registered in your own script, call d2_detr.data.check_datasets there.
"""
import argparse
import os
import sys

from detectron2.data.datasets import register_coco_instances
from detectron2.utils.logger import setup_logger

from d2_detr.config import ConfigError, load_config
from d2_detr.data.check import LEVELS, check_datasets
from d2_detr.engine.trainer import check_num_classes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="config whose datasets are checked")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME",
                        help="a registered dataset to check (repeatable; default: DATASETS.TRAIN and DATASETS.TEST "
                             "of the config)")
    parser.add_argument("--coco-json", default="", metavar="FILE",
                        help="check this COCO json file (as register_coco_instances would register it)")
    parser.add_argument("--image-root", default="", metavar="DIR", help="image folder of --coco-json")
    parser.add_argument("--level", choices=LEVELS[1:], default="full",
                        help="'files': every file exists; 'full' (default): also decode and check annotations")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="processes decoding images (default: DATALOADER.NUM_WORKERS of the config)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    if not (args.config_file or args.dataset or args.coco_json):
        parser.error("give --config-file, --dataset or --coco-json")
    if args.image_root and not args.coco_json:
        parser.error("--image-root goes with --coco-json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger()
    setup_logger(name="d2_detr")
    try:
        cfg = load_config(args.config_file or None, args.opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    errors = []
    names = list(args.dataset)
    if args.coco_json:
        if not os.path.isfile(args.coco_json):
            print(f"error: --coco-json {args.coco_json} does not exist", file=sys.stderr)
            return 2
        name = f"check:{os.path.abspath(args.coco_json)}"
        register_coco_instances(name, {}, args.coco_json, args.image_root)
        names.append(name)
    if args.config_file:
        names = names or [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
        try:
            check_num_classes(cfg)
        except (ValueError, OSError) as e:
            errors.append(str(e))
    num_workers = cfg.DATALOADER.NUM_WORKERS if args.num_workers is None else args.num_workers
    try:
        problems = check_datasets(dict.fromkeys(names), level=args.level, image_format=cfg.INPUT.FORMAT,
                                  num_workers=num_workers)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    for error in errors:
        print(f"error: {error}")
    files = len({(p.dataset, p.file_name) for p in problems})
    if problems or errors:
        print(f"{len(problems)} problems in {files} records of {len(names)} datasets"
              + (f"; {len(errors)} config errors" if errors else ""), file=sys.stderr)
        return 1
    print(f"No problems in {len(names)} datasets (level {args.level!r}): {', '.join(names)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
