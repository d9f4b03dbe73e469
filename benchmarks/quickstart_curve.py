#!/usr/bin/env python
"""Learning curves against wall-clock training time: AP and AP50 on a config's test set at fixed minutes.

    python benchmarks/quickstart_curve.py                                   # configs/quickstart_cpu.yaml
    python benchmarks/quickstart_curve.py --eval-at-minutes 2 4 8 --json curve.json SOLVER.BASE_LR 0.001
    python benchmarks/quickstart_curve.py --plot curves.png \
        --run DETR configs/quickstart_cpu.yaml \
        --run "Deformable DETR" configs/quickstart_deformable_cpu.yaml \
        --run "DINO, no denoising" configs/quickstart_dino_cpu.yaml MODEL.DINO.DN_NUMBER 0

Trains with ``DetrTrainer`` exactly as ``tools/train_net.py`` would (the config's schedule, checkpoints and
logging, but no end-of-training evaluation) and, through a hook checking the elapsed training time after every
iteration, evaluates on ``DATASETS.TEST[0]`` with ``COCOEvaluator`` when each point of --eval-at-minutes is
reached. The clock starts with the first iteration (model building and dataset generation excluded) and is
paused while evaluating. Training stops after the last point; if SOLVER.MAX_ITER comes first, the final model
is evaluated once for the points left. Prints a table of (minutes, iteration, AP, AP50); asserts nothing.

One run (``--config-file``) trains in this process on MODEL.DEVICE; output goes to ``<OUTPUT_DIR>_curve`` unless
--output-dir says otherwise. With ``--run LABEL CONFIG [KEY VALUE ...]`` given (repeatable), the runs train one
after the other, each in a process of its own (same points, same machine: their curves are comparable), into
``<--output-dir or output/curves>/<label>``; the KEY VALUE pairs after a run's CONFIG are that run's overrides.
``--plot FILE`` draws every run's AP and AP50 against the minutes to a PNG.
"""
import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import HookBase, default_setup, hooks
from detectron2.evaluation import inference_on_dataset
from detectron2.utils.logger import setup_logger

from d2_detr import add_detr_config
from d2_detr.engine import DetrTrainer

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_DIR, "configs", "quickstart_cpu.yaml")

logger = logging.getLogger("quickstart_curve")


class StopTraining(BaseException):
    """Raised by :class:`WallClockEvalHook` after its last point to end ``trainer.train()``.

    A ``BaseException`` (like ``KeyboardInterrupt``), so Detectron2's loop does not log it as a failure; its
    ``after_train`` hooks still run.
    """


class WallClockEvalHook(HookBase):
    """Evaluates when the training time (wall clock, evaluation excluded) reaches each of ``eval_at_minutes``.

    ``evaluate(model)`` returns ``{"AP": ..., "AP50": ...}``. After the last point the hook raises
    :class:`StopTraining`. ``rows`` holds one dict per point: minutes, train_minutes, iteration, AP, AP50,
    eval_seconds and reason ("time" or "max_iter").
    """

    def __init__(self, eval_at_minutes: Sequence[float], evaluate: Callable[[torch.nn.Module], Dict[str, float]]):
        self.points = sorted(float(m) for m in eval_at_minutes)
        self._evaluate = evaluate
        self.rows: List[Dict[str, float]] = []
        self._next = 0
        self._start = 0.0
        self._paused = 0.0

    def training_seconds(self) -> float:
        """Wall-clock seconds since training started, evaluations excluded."""
        return time.perf_counter() - self._start - self._paused

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._paused = 0.0

    def after_step(self) -> None:
        elapsed = self.training_seconds()
        first = self._next
        while self._next < len(self.points) and elapsed >= 60.0 * self.points[self._next]:
            self._next += 1
        if self._next > first:
            self._record(self.points[first:self._next], elapsed, self.trainer.iter + 1, "time")
        if self._next == len(self.points):
            raise StopTraining()

    def after_train(self) -> None:
        if self._next < len(self.points) and self.trainer.iter >= self.trainer.max_iter:
            logger.info("SOLVER.MAX_ITER reached before %.2f min; evaluating the final model for the points left",
                        self.points[self._next])
            self._record(self.points[self._next:], self.training_seconds(), self.trainer.max_iter, "max_iter")
            self._next = len(self.points)

    def _record(self, points: Sequence[float], elapsed: float, iteration: int, reason: str) -> None:
        start = time.perf_counter()
        metrics = self._evaluate(self.trainer.model)
        seconds = time.perf_counter() - start
        self._paused += seconds
        for minutes in points:
            self.rows.append({"minutes": minutes, "train_minutes": elapsed / 60.0, "iteration": iteration,
                              "AP": metrics.get("AP", float("nan")), "AP50": metrics.get("AP50", float("nan")),
                              "eval_seconds": seconds, "reason": reason})
        logger.info("Curve point at %.2f min (iteration %d): AP %.2f, AP50 %.2f (evaluation took %.1f s)",
                    elapsed / 60.0, iteration, self.rows[-1]["AP"], self.rows[-1]["AP50"], seconds)


class CurveTrainer(DetrTrainer):
    """``DetrTrainer`` whose end-of-training ``EvalHook`` is replaced by a :class:`WallClockEvalHook`."""

    def __init__(self, cfg, eval_at_minutes: Sequence[float]):
        self.curve_hook = WallClockEvalHook(eval_at_minutes, self.evaluate_first_test_set)
        super().__init__(cfg)  # calls build_hooks, which registers curve_hook

    def build_hooks(self):
        kept = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        return kept + [self.curve_hook]

    def evaluate_first_test_set(self, model: torch.nn.Module) -> Dict[str, float]:
        """COCO box metrics of ``model`` on ``DATASETS.TEST[0]``."""
        name = self.cfg.DATASETS.TEST[0]
        results = inference_on_dataset(model, self.build_test_loader(self.cfg, name),
                                       self.build_evaluator(self.cfg, name))
        return dict(results.get("bbox", {}))


def get_parser() -> argparse.ArgumentParser:
    """The command line: --config-file, --eval-at-minutes, --output-dir, --json and KEY VALUE overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help="config to train (default: configs/quickstart_cpu.yaml)")
    parser.add_argument("--eval-at-minutes", type=float, nargs="+", default=[3, 6, 9, 12, 15], metavar="MIN",
                        help="training minutes at which to evaluate (default: 3 6 9 12 15)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="OUTPUT_DIR of the run (default: the config's OUTPUT_DIR + '_curve')")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the curve(s) to this JSON file")
    parser.add_argument("--run", nargs="+", action="append", default=[], metavar="LABEL CONFIG [KEY VALUE]",
                        help="a labelled run: its config file and its own overrides (repeatable; replaces "
                             "--config-file; each run trains in a process of its own)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw AP and AP50 against minutes to this file")
    parser.add_argument("--from-json", nargs="+", default=[], metavar="FILE",
                        help="train nothing: print and plot the runs of earlier --json files")
    parser.add_argument("--labels", nargs="+", default=[], metavar="LABEL",
                        help="with --from-json: only these runs, in this order")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """The frozen config with overrides and the curve's OUTPUT_DIR; sets up logging as tools/train_net.py."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.OUTPUT_DIR = args.output_dir or cfg.OUTPUT_DIR.rstrip("/\\") + "_curve"
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, name="d2_detr")
    setup_logger(cfg.OUTPUT_DIR, name="quickstart_curve")
    return cfg


def format_table(rows: Sequence[Dict[str, float]]) -> str:
    """The curve as a fixed-width text table."""
    lines = [f"{'minutes':>8} {'train min':>10} {'iteration':>10} {'AP':>7} {'AP50':>7} {'eval s':>7}"]
    for row in rows:
        note = "  (SOLVER.MAX_ITER reached first)" if row["reason"] == "max_iter" else ""
        lines.append(f"{row['minutes']:>8.2f} {row['train_minutes']:>10.2f} {row['iteration']:>10d} "
                     f"{row['AP']:>7.2f} {row['AP50']:>7.2f} {row['eval_seconds']:>7.1f}{note}")
    return "\n".join(lines)


def slug(label: str) -> str:
    """A folder name for a run label: lower case, runs of other characters as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "run"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_in_subprocess(label: str, config: str, opts: Sequence[str], points: Sequence[float], output_dir: str) -> Dict:
    """One run of this script (``--config-file``) in a fresh process; its JSON result with ``label`` added."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "curve.json")
        command = [sys.executable, os.path.abspath(__file__), "--eval-at-minutes", *map(str, points),
                   "--config-file", config, "--output-dir", output_dir, "--json", result_path, *opts]
        logger.info("Run %r: %s", label, " ".join(command))
        subprocess.run(command, check=True)
        result = load_runs([result_path])[0]
    result["label"] = label
    return result


def plot_curves(runs: Sequence[Dict], path: str) -> None:
    """AP and AP50 against training minutes, one line a run, side by side, to a PNG at ``path``; each point at the
    training time its model was evaluated at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, ax in zip(("AP", "AP50"), axes):
        for run in runs:
            # At the training time each model was evaluated at (a run that SOLVER.MAX_ITER ended early stops there).
            points = list({p["iteration"]: p for p in run["points"]}.values())
            ax.plot([p["train_minutes"] for p in points], [p[metric] for p in points], marker="o",
                    label=run["label"])
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.set_ylabel(f"COCO box {metric} (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left")
    first = runs[0]
    fig.suptitle(f"{first['dataset']}: {first['device']}, {first['torch_threads']} torch threads, {cpu_name()}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_runs(paths: Sequence[str]) -> List[Dict]:
    """The runs of earlier ``--json`` files, in order."""
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.extend(json.load(f)["runs"])
    return runs


def report(results: Sequence[Dict], args: argparse.Namespace) -> None:
    """One table per run, then the --json file and the --plot of all of them."""
    for result in results:
        print(f"\n{result['label']}: {result['config_file']} {' '.join(result['opts'])} on {result['dataset']} "
              f"({result['device']}, {result['torch_threads']} torch threads, {cpu_name()}):")
        print(format_table(result["points"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": cpu_name(), "runs": list(results)}, f, indent=2)
        print(f"Wrote {args.json}")
    if args.plot:
        plot_curves(results, args.plot)
        print(f"Wrote {args.plot}")


def main_runs(args: argparse.Namespace) -> int:
    """The ``--run`` mode: every run in a process of its own, then one table each, the JSON and the plot."""
    for run in args.run:
        if len(run) < 2 or len(run) % 2:
            sys.exit(f"quickstart_curve.py: error: --run takes LABEL CONFIG and KEY VALUE pairs, got {run}")
        if not os.path.isfile(run[1]):
            sys.exit(f"quickstart_curve.py: error: --run {run[0]!r}: no config file {run[1]!r}")
    labels = [run[0] for run in args.run]
    if len(set(map(slug, labels))) != len(labels):
        sys.exit(f"quickstart_curve.py: error: run labels must differ (as folder names): {labels}")
    setup_logger(name="quickstart_curve")
    base = args.output_dir or os.path.join("output", "curves")
    report([run_in_subprocess(label, config, opts, args.eval_at_minutes, os.path.join(base, slug(label)))
            for label, config, *opts in args.run], args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if any(m <= 0 for m in args.eval_at_minutes):
        sys.exit("quickstart_curve.py: error: --eval-at-minutes must all be positive")
    if args.from_json:
        runs = {run["label"]: run for run in load_runs(args.from_json)}
        missing = [label for label in args.labels if label not in runs]
        if missing:
            sys.exit(f"quickstart_curve.py: error: no run labelled {missing} in {args.from_json} (runs: {list(runs)})")
        report([runs[label] for label in args.labels] if args.labels else list(runs.values()), args)
        return 0
    if args.run:
        if args.opts:
            sys.exit("quickstart_curve.py: error: with --run, put overrides in the runs (--run LABEL CONFIG KEY VALUE)")
        return main_runs(args)
    cfg = setup(args)
    if not len(cfg.DATASETS.TEST):
        sys.exit("quickstart_curve.py: error: the config has no DATASETS.TEST to evaluate on")
    trainer = CurveTrainer(cfg, args.eval_at_minutes)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
    except StopTraining:
        logger.info("Stopped after the last curve point")
    report([{"label": os.path.basename(args.config_file), "config_file": args.config_file, "opts": list(args.opts),
             "device": cfg.MODEL.DEVICE, "torch_threads": torch.get_num_threads(), "dataset": cfg.DATASETS.TEST[0],
             "points": trainer.curve_hook.rows}], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
