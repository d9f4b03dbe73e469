"""Speed of one setting against another in the same run: config overrides and environment variables.

Each setting runs in its own worker process (``benchmarks/speed.py``'s worker, which applies the process set-up
of ``tools/train_net.py``), built from the same config plus that setting's overrides and loaded with the same
weights; the parent alternates between the settings, flipping the order every round, so that both see the same
machine load. Measured: inference of batches of images of one size or of mixed sizes (landscape, portrait and
square images, as in COCO, so that a batch is padded), and the training step (forward with matching and losses,
backward, optimizer step). Printed per setting: the median, min and max seconds per call, images/s from the
median, and the medians of the system CPU seconds and minor page faults of the worker per call (these depend
little on other processes' load), with the load average before and after.

Examples::

    # the transformer's matrix products through oneDNN or F.linear (R-50 at 800x1066 on CPU)
    python benchmarks/switch_speed.py --a MODEL.DETR.ONEDNN_LINEAR False --b MODEL.DETR.ONEDNN_LINEAR True
    # glibc malloc keeping freed memory in the process, or not
    python benchmarks/switch_speed.py --a KEEP_FREED_MEMORY False --b KEEP_FREED_MEMORY True
    # the backbone image by image or on the padded batch, at test time, batches of 4 and 8 mixed-size images
    python benchmarks/switch_speed.py --mixed-sizes --infer-batches 4 8 --train-batch 0 \\
        --a MODEL.DETR.TEST_BACKBONE_PER_IMAGE False --b MODEL.DETR.TEST_BACKBONE_PER_IMAGE True

See benchmarks/README.md for results.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (benchmarks/speed.py: the worker and its measurements)

REPO = speed.REPO

# Aspect ratios (height / width) of the mixed-size batches, cycled: COCO's common landscape 4:3, portrait 3:4,
# square, and wider landscapes.
MIXED_ASPECTS = (3 / 4, 4 / 3, 1.0, 2 / 3, 3 / 4, 9 / 16, 4 / 3, 3 / 4)


class MixedSizeWorker(speed.Worker):
    """speed.py's worker, plus inference of a batch of images of different sizes, and the system time and minor
    page faults of every measured call."""

    @staticmethod
    def _with_faults(measure, *args, **kwargs) -> Dict[str, float]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        result = measure(*args, **kwargs)
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.update(system_seconds=after.ru_stime - before.ru_stime, minor_faults=after.ru_minflt - before.ru_minflt)
        return result

    def infer(self, batch: int, size: Tuple[int, int]) -> Dict[str, float]:
        return self._with_faults(super().infer, batch, size)

    def train(self, batch: int, size: Tuple[int, int]) -> Dict[str, float]:
        return self._with_faults(super().train, batch, size)

    def infer_mixed(self, sizes: List[Tuple[int, int]]) -> Dict[str, float]:
        """One timed inference call of one image of each of ``sizes``."""
        return self._with_faults(self._infer_mixed, sizes)

    def _infer_mixed(self, sizes: List[Tuple[int, int]]) -> Dict[str, float]:
        import time

        import torch

        model = self.model.eval()
        g = torch.Generator().manual_seed(1)
        inputs = [{"image": torch.rand(3, h, w, generator=g) * 255} for h, w in sizes]
        self._sync()
        start = time.perf_counter()
        with torch.no_grad():
            model(inputs)
        self._sync()
        return {"seconds": time.perf_counter() - start}


def mixed_sizes(batch: int, short_edge: int) -> List[Tuple[int, int]]:
    """(H, W) of ``batch`` images: shortest edge ``short_edge``, longest at most ``short_edge`` x 1333 / 800, aspect
    ratios cycled from MIXED_ASPECTS (as DETR's test resize leaves COCO images: 800, at most 1333)."""
    max_edge = short_edge * 1333 // 800
    sizes = []
    for i in range(batch):
        aspect = MIXED_ASPECTS[i % len(MIXED_ASPECTS)]
        short = min(short_edge, int(max_edge * min(aspect, 1 / aspect)))
        long_ = min(max_edge, int(round(short / min(aspect, 1 / aspect))))
        sizes.append((short, long_) if aspect < 1 else (long_, short))
    return sizes


class Setting:
    """A worker process with its own environment, running the working tree's d2_detr."""

    def __init__(self, name: str, env: Dict[str, str]) -> None:
        self.name = name
        full_env = dict(os.environ, **env)
        full_env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=REPO,
                                        env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    call = speed.Version.call
    close = speed.Version.close


def worker_main() -> None:
    """speed.py's JSON-line protocol, served by :class:`MixedSizeWorker`."""
    speed.Worker = MixedSizeWorker
    speed.worker_main()


def run_rounds(settings: Sequence[Setting], warmup: int, repeats: int, command: str,
               **kwargs) -> Dict[str, List[Dict[str, float]]]:
    """Samples (seconds, system_seconds, minor_faults) of ``repeats`` timed calls per setting after ``warmup``
    untimed ones, alternating settings."""
    samples = speed.interleaved(settings, warmup, repeats, command, **kwargs)
    keys = ("seconds", "system_seconds", "minor_faults")
    return {name: [{k: s[k] for k in keys} for s in values] for name, values in samples.items()}


def parse_env(pairs: Sequence[str]) -> Dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--a-env/--b-env take NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "detr_r50.yaml"))
    parser.add_argument("--a", nargs="*", default=[], metavar="KEY VALUE", help="config overrides of setting a")
    parser.add_argument("--b", nargs="*", default=[], metavar="KEY VALUE", help="config overrides of setting b")
    parser.add_argument("--a-env", nargs="*", default=[], metavar="NAME=VALUE", help="environment of setting a")
    parser.add_argument("--b-env", nargs="*", default=[], metavar="NAME=VALUE", help="environment of setting b")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"),
                        help="image size; with --mixed-sizes: shortest edge min(H, W), longest <= 1333/800 of it")
    parser.add_argument("--mixed-sizes", action="store_true", help="inference batches of mixed-size images")
    parser.add_argument("--infer-batches", type=int, nargs="*", default=(1,))
    parser.add_argument("--train-batch", type=int, default=2, help="training images per step (0: no training)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--json", default="", help="also write every sample to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return
    size = tuple(args.size)
    overrides = {"a": list(args.a), "b": list(args.b)}
    envs = {"a": parse_env(args.a_env), "b": parse_env(args.b_env)}
    settings = [Setting(name, envs[name]) for name in ("a", "b")]
    info = {}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="d2_detr_switch_") as tmp:
            weights = os.path.join(tmp, "weights.pth")
            for setting in settings:  # a initialises the weights, b loads them
                info[setting.name] = setting.call(
                    "setup", config=args.config_file, opts=overrides[setting.name], device="cpu",
                    threads=args.threads, weights_in=weights if setting.name == "b" else None,
                    weights_out=weights if setting.name == "a" else None)
                unknown = info[setting.name]["ignored_opts"]
                if unknown:
                    raise SystemExit(f"setting {setting.name}: unknown config keys {unknown}")
        results: Dict[str, Dict[str, Any]] = {}
        for batch in args.infer_batches:
            if args.mixed_sizes:
                sizes = mixed_sizes(batch, min(size))
                label = f"inference b{batch} mixed sizes"
                results[label] = run_rounds(settings, args.warmup, args.repeats, "infer_mixed", sizes=sizes)
            else:
                label = f"inference b{batch} {size[0]}x{size[1]}"
                results[label] = run_rounds(settings, args.warmup, args.repeats, "infer", batch=batch, size=size)
            results[label]["images"] = [batch]
        if args.train_batch > 0:
            label = f"train step b{args.train_batch} {size[0]}x{size[1]}"
            results[label] = run_rounds(settings, args.warmup, args.repeats, "train", batch=args.train_batch,
                                        size=size)
            results[label]["images"] = [args.train_batch]
    finally:
        for setting in settings:
            setting.close()
    load_after = os.getloadavg()

    print(f"\nconfig {os.path.relpath(os.path.abspath(args.config_file), REPO)}, torch {info['a']['torch']}, "
          f"{info['a']['threads']} threads, {os.cpu_count()} CPUs, warm-up {args.warmup}, repeats {args.repeats}, "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after")
    for name in ("a", "b"):
        env = " ".join(args.a_env if name == "a" else args.b_env)
        print(f"setting {name}: {' '.join(overrides[name]) or '(config as is)'}{' ' + env if env else ''}; "
              f"freed memory kept: {info[name]['freed_memory_kept']}")
    if args.mixed_sizes:
        print(f"mixed sizes: {mixed_sizes(max(args.infer_batches, default=0), min(size))}")
    print(f"{'measurement':<30} {'setting':>7} {'median s':>9} {'min s':>7} {'max s':>7} {'images/s':>9} "
          f"{'sys s':>6} {'faults':>8}")
    for label, samples in results.items():
        images = samples["images"][0]
        medians = {}
        for name in ("a", "b"):
            seconds = [s["seconds"] for s in samples[name]]
            medians[name] = statistics.median(seconds)
            system = statistics.median(s["system_seconds"] for s in samples[name])
            faults = statistics.median(s["minor_faults"] for s in samples[name])
            print(f"{label:<30} {name:>7} {medians[name]:>9.3f} {min(seconds):>7.3f} {max(seconds):>7.3f} "
                  f"{images / medians[name]:>9.2f} {system:>6.2f} {faults:>8.0f}")
        print(f"{'':<30} {'b vs a':>7} {medians['a'] / medians['b']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "results": results,
                       "load_average": {"before": load_before, "after": load_after}}, f, indent=1)


if __name__ == "__main__":
    main()
