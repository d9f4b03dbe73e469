#!/usr/bin/env python
"""Inference latency of the PyTorch model against its TorchScript and ONNX exports (onnxruntime, CPU).

Builds the config's model with random weights (no checkpoint needed: latency does not depend on the values),
exports it with d2_detr.export to a temporary folder, checks that the exported outputs equal the PyTorch model's,
then times each on the same random image(s), alternating backends every round so that all see the same machine
load. Prints one row per backend with the load average before and after.

    python benchmarks/export_latency.py                                   # R-50 at 800x1066, batch 1, CPU
    python benchmarks/export_latency.py --repeats 10 --threads 1
    python benchmarks/export_latency.py --config-file tests/configs/tiny.yaml --size 96 128   # a smoke run
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import onnxruntime
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from d2_detr import add_detr_config
from d2_detr.export import batch_images, export_model, load_exported, verify_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "detr_r50.yaml"), metavar="FILE")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"), help="image size")
    parser.add_argument("--batch", type=int, default=1, help="images per call (all of --size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per backend first")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of torch and of onnxruntime's intra-op pool (default: torch's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return parser


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="d2_detr")
    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *args.size, generator=generator) * 255 for _ in range(args.batch)]
    batch, sizes = batch_images(images)
    inputs = [{"image": image} for image in images]

    calls: Dict[str, Callable[[], object]] = {"PyTorch (eager)": lambda: model.inference(inputs)}
    with tempfile.TemporaryDirectory() as folder:
        for fmt, name in (("torchscript", "TorchScript"), ("onnx", f"onnxruntime {onnxruntime.__version__}")):
            path = export_model(model, fmt, folder)
            verify_export(model, path, images)
            if fmt == "onnx":
                run = _onnxruntime_call(path, args.threads)
                calls[name] = lambda run=run: run(batch, sizes)
            else:
                run = load_exported(path)
                calls[name] = lambda run=run: run(batch, sizes)

        before = load_average()
        times: Dict[str, List[float]] = {name: [] for name in calls}
        for name, call in calls.items():
            for _ in range(args.warmup):
                call()
        for round_ in range(args.repeats):
            order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
            for name in order:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        after = load_average()

    print(f"{os.path.relpath(args.config_file, REPO)} (random weights), batch {args.batch} of {args.size[0]}x"
          f"{args.size[1]}, {args.threads} thread(s), warm-up {args.warmup}, repeats {args.repeats}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load average {before} before, {after} after")
    reference = statistics.median(times["PyTorch (eager)"])
    print(f"{'backend':<24} {'median (s)':>10} {'min (s)':>8} {'vs PyTorch':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:>10.3f} {min(values):>8.3f} {reference / median:>9.2f}x")
    return 0


def _onnxruntime_call(path: str, threads: int):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads, as a function of (images, sizes)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor, image_sizes: torch.Tensor):
        return session.run(None, {"images": images.numpy(), "image_sizes": image_sizes.numpy()})

    return run


if __name__ == "__main__":
    sys.exit(main())
