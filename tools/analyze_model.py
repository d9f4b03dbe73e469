#!/usr/bin/env python
"""FLOPs, activations, parameters and structure of a DETR config, with Detectron2's analysis tools.

    python tools/analyze_model.py --config-file configs/detr_r50.yaml --tasks flop parameter \\
        --input-size 800 1200 MODEL.WEIGHTS ""
    python tools/analyze_model.py --config-file configs/detr_r50.yaml --tasks flop -n 100 \\
        MODEL.WEIGHTS output/detr_r50/model_final.pth

Detectron2's tools/analyze_model.py for d2_detr's configs: ``--tasks`` any of flop, activation, parameter,
structure; config overrides (KEY VALUE) at the end. FLOPs follow fvcore and the DETR paper (one multiply-add is one
flop; elementwise work is not counted; attention counts as its two matrix products, see d2_detr.utils.analysis).
The flop and activation tasks run the model on ``-n`` inputs: images of ``--input-size H W`` with random pixels
(no dataset needed; default 1), or without it the first ``-n`` images of DATASETS.TEST[0] as evaluation sees them
(resized to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST; default 100). DETR's FLOPs depend on the image size only, not
on the pixels nor on the weights (fixed number of queries, no NMS): MODEL.WEIGHTS is loaded when set, and
MODEL.WEIGHTS "" skips it.
"""
import argparse
import itertools
import logging
import sys
import warnings
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils.analysis import activation_count_operators, parameter_count_table
from detectron2.utils.logger import setup_logger
from fvcore.nn import flop_count_table
from torch import nn

from d2_detr.config import ConfigError, load_config
from d2_detr.data.build import build_batched_test_loader
from d2_detr.data.dataset_mapper import DetrDatasetMapper
from d2_detr.engine import DetrTrainer
from d2_detr.utils.analysis import FlopCountAnalysis

logger = logging.getLogger("analyze_model")

TASKS = ("flop", "activation", "parameter", "structure")


def get_parser() -> argparse.ArgumentParser:
    """The command line: --config-file, --tasks, -n/--num-inputs, --input-size, trailing KEY VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--tasks", choices=TASKS, required=True, nargs="+", help="what to report")
    parser.add_argument("-n", "--num-inputs", type=int,
                        help="number of inputs the flop and activation counts average over (default: 100 images of "
                             "the dataset, or 1 synthetic image, DETR's counts depending on the size only)")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="count on images of this size with random pixels instead of DATASETS.TEST[0]")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu")
    return parser


def setup_cfg(config_file: str, opts: List[str]) -> CfgNode:
    """The frozen config: Detectron2's defaults, d2_detr's keys, the config file, no loader workers, ``opts``."""
    return load_config(config_file, ["DATALOADER.NUM_WORKERS", "0", *opts])


def build_model(cfg: CfgNode) -> nn.Module:
    """The config's model in eval mode, with MODEL.WEIGHTS loaded when set."""
    model = DetrTrainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def synthetic_inputs(size: Sequence[int], device: str) -> Iterator[List[Dict]]:
    """Endless one-image batches of ``size`` (H, W) with random pixels (seeded), as a test loader gives them."""
    height, width = size
    generator = torch.Generator().manual_seed(0)
    while True:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        yield [{"image": image.to(device), "height": height, "width": width}]


def model_inputs(cfg: CfgNode, input_size: Optional[Sequence[int]], count: int) -> Iterator[List[Dict]]:
    """``count`` one-image batches: synthetic ones of ``input_size``, or DATASETS.TEST[0]'s as evaluation sees them."""
    if input_size:
        return itertools.islice(synthetic_inputs(input_size, cfg.MODEL.DEVICE), count)
    if not cfg.DATASETS.TEST:
        sys.exit("analyze_model.py: error: DATASETS.TEST is empty: pass --input-size H W to count on synthetic "
                 "images, or DATASETS.TEST (\"name\",) to count on a registered dataset.")
    loader = build_batched_test_loader(cfg.DATASETS.TEST[0], DetrDatasetMapper(cfg, is_train=False))
    return itertools.islice(loader, count)


def describe(inputs: List[Dict]) -> str:
    return ", ".join("x".join(map(str, x["image"].shape[-2:])) for x in inputs)


def do_flop(cfg: CfgNode, args: argparse.Namespace) -> None:
    model = build_model(cfg)
    counts: Counter = Counter()
    totals, sizes = [], []
    first = None
    for index, inputs in enumerate(model_inputs(cfg, args.input_size, args.num_inputs)):
        flops = FlopCountAnalysis(model, inputs)
        # Folded frozen BatchNorms (MODEL.DETR.FOLD_FROZEN_BN) are computed inside their convolution, so
        # their modules are never called: nothing is missing from the count.
        flops.uncalled_modules_warnings(False)
        if index > 0:
            flops.unsupported_ops_warnings(False)
        counts += flops.by_operator()
        totals.append(flops.total())
        sizes.append(describe(inputs))
        first = first or flops
    if first is None:
        sys.exit("analyze_model.py: error: no inputs (-n 0, or an empty dataset)")
    logger.info("Flops table computed from only one input sample (%s):\n%s", sizes[0],
                flop_count_table(first, max_depth=3))
    logger.info("Average GFlops for each type of operators:\n%s",
                str([(k, v / len(totals) / 1e9) for k, v in counts.items()]))
    logger.info("Total GFlops: %.4g±%.2g over %d input(s) of size %s", np.mean(totals) / 1e9, np.std(totals) / 1e9,
                len(totals), ", ".join(sorted(set(sizes))) if len(set(sizes)) <= 3 else "various")


def do_activation(cfg: CfgNode, args: argparse.Namespace) -> None:
    model = build_model(cfg)
    counts: Counter = Counter()
    totals = []
    for inputs in model_inputs(cfg, args.input_size, args.num_inputs):
        count = activation_count_operators(model, inputs)
        counts += count
        totals.append(sum(count.values()))
    if not totals:
        sys.exit("analyze_model.py: error: no inputs (-n 0, or an empty dataset)")
    logger.info("(Million) Activations for Each Type of Operators:\n%s",
                str([(k, v / len(totals)) for k, v in counts.items()]))
    logger.info("Total (Million) Activations: %s±%s", np.mean(totals), np.std(totals))


def do_parameter(cfg: CfgNode, args: argparse.Namespace) -> None:
    model = DetrTrainer.build_model(cfg)
    logger.info("Parameter Count:\n%s", parameter_count_table(model, max_depth=5))


def do_structure(cfg: CfgNode, args: argparse.Namespace) -> None:
    logger.info("Model Structure:\n%s", DetrTrainer.build_model(cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.num_inputs is None:
        args.num_inputs = 1 if args.input_size else 100
    setup_logger(name="fvcore")
    setup_logger(name="d2_detr")
    setup_logger(name="detectron2")
    setup_logger(name="analyze_model")
    try:
        cfg = setup_cfg(args.config_file, list(args.opts))
    except ConfigError as e:
        sys.exit(f"analyze_model.py: error: {e}")
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"analyze_model.py: error: MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available here; "
                 "pass MODEL.DEVICE cpu (the counts do not depend on the device).")
    with warnings.catch_warnings():
        # Tracing through Detectron2's structures (Boxes, Instances) turns sizes into constants of the trace; the
        # counts are for the traced input size, which is what is asked for.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for task in args.tasks:
            {"flop": do_flop, "activation": do_activation, "parameter": do_parameter,
             "structure": do_structure}[task](cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
