"""What ``tools/train_net.py`` runs, importable so a user's own script can register datasets first:

    from detectron2.data.datasets import register_coco_instances
    from d2_detr.engine.train_net import run_from_command_line

    register_coco_instances("my_train", {}, "train.json", "images/")
    if __name__ == "__main__":
        run_from_command_line()
"""
import argparse
import logging
import sys
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..checkpoint.loading import CheckpointError, load_inference_weights
from ..config import ConfigError, load_config as load_config_file
from .allocator import setup_malloc
from .checkpointer import RESUME_SOURCE, AtomicDetectionCheckpointer, checkpoint_files
from .launch import launch
from .trainer import DetrTrainer

__all__ = ["argument_parser", "check_output_dir", "load_config", "setup", "main", "run_from_command_line"]

logger = logging.getLogger(__name__)


def load_config(args) -> CfgNode:
    """The config of ``args`` (``--config-file`` + ``KEY VALUE`` overrides), frozen; see
    :func:`d2_detr.config.load_config`."""
    return load_config_file(args.config_file, args.opts)


def setup(args) -> CfgNode:
    """:func:`load_config`, with Detectron2's logging and output directory set up, d2_detr's logger included."""
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_detr")
    return cfg


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with ``--overwrite-output-dir``."""
    parser = default_argument_parser()
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="train in an OUTPUT_DIR that holds another run's checkpoints, replacing them "
                             "(without it, such a run is refused; --resume continues that run instead)")
    return parser


def check_output_dir(cfg: CfgNode, args) -> None:
    """Refuse to start a new training run in an ``OUTPUT_DIR`` that holds another run's checkpoints (it would
    replace them, and ``--resume`` would later mix the two runs), unless ``args.overwrite_output_dir``.
    Nothing to check with ``--resume`` (it continues that run) or ``--eval-only`` (it writes no checkpoint).

    Raises:
        CheckpointError: naming the folder, its checkpoint files, and the three ways to go on.
    """
    if args.eval_only or args.resume:
        return
    found = checkpoint_files(cfg.OUTPUT_DIR)
    if not found:
        return
    listed = ", ".join(found[:6]) + (f", ... ({len(found) - 6} more)" if len(found) > 6 else "")
    if getattr(args, "overwrite_output_dir", False):
        logger.warning(f"--overwrite-output-dir: OUTPUT_DIR {cfg.OUTPUT_DIR} holds checkpoints of another run "
                       f"({listed}); this run replaces those of the same name and tags its own as the last")
        return
    raise CheckpointError(
        f"OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds the checkpoints of another run ({listed}); a new run there would "
        "replace them and mix the two runs' checkpoints. Add --resume to continue that run, pass another "
        "OUTPUT_DIR to start a new one, or add --overwrite-output-dir to start over in this folder.")


def _load_evaluation_weights(cfg: CfgNode, model: nn.Module, resume: bool) -> None:
    """``MODEL.WEIGHTS`` or, with ``resume``, the last complete checkpoint of ``OUTPUT_DIR`` if it has one
    (Detectron2's choice), loaded strictly unless ``TEST.STRICT_WEIGHTS`` is False."""
    checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=False)
    if resume and checkpointer.has_checkpoint():
        checkpointer.load_last_complete(lambda path: load_inference_weights(model, cfg, path, source=RESUME_SOURCE))
    else:
        load_inference_weights(model, cfg)


def main(args):
    """Train (then evaluate), or with ``--eval-only`` evaluate ``MODEL.WEIGHTS`` (strictly: see
    ``TEST.STRICT_WEIGHTS``). Runs in every process."""
    cfg = setup(args)
    setup_malloc(cfg)
    if args.eval_only:
        model = DetrTrainer.build_model(cfg)
        _load_evaluation_weights(cfg, model, args.resume)
        results = DetrTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = DetrTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run_from_command_line(argv: Optional[List[str]] = None):
    """Parse Detectron2's usual flags (and ``--overwrite-output-dir``), check ``OUTPUT_DIR``
    (:func:`check_output_dir`) and launch ``main`` on ``--num-gpus`` processes per machine: one per GPU (NCCL)
    when ``MODEL.DEVICE`` is CUDA, else that many CPU processes (gloo).

    A checkpoint that cannot be used (missing, unreadable, not matching; or an ``OUTPUT_DIR`` in use) ends the
    program with status 1 and the message, without a traceback, when it is found in this process (always for
    ``OUTPUT_DIR``; for the weights, in a run of one process).
    """
    parser = argument_parser()
    args = parser.parse_args(argv)
    logger.info(f"Command line arguments: {args}")
    try:
        cfg = load_config(args)  # a bad config fails here, before any process starts
        check_output_dir(cfg, args)
        return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,), device=cfg.MODEL.DEVICE)
    except (CheckpointError, ConfigError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
