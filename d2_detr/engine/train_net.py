"""What ``tools/train_net.py`` runs, importable so a user's own script can register datasets first:

    from detectron2.data.datasets import register_coco_instances
    from d2_detr.engine.train_net import run_from_command_line

    register_coco_instances("my_train", {}, "train.json", "images/")
    if __name__ == "__main__":
        run_from_command_line()
"""
import logging
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_detr_config
from .allocator import setup_malloc
from .launch import launch
from .trainer import DetrTrainer

__all__ = ["load_config", "setup", "main", "run_from_command_line"]

logger = logging.getLogger(__name__)


def load_config(args) -> CfgNode:
    """The config of ``args`` (``--config-file`` + ``KEY VALUE`` overrides), frozen."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """:func:`load_config`, with Detectron2's logging and output directory set up, d2_detr's logger included."""
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_detr")
    return cfg


def main(args):
    """Train (then evaluate), or with ``--eval-only`` evaluate ``MODEL.WEIGHTS``. Runs in every process."""
    cfg = setup(args)
    setup_malloc(cfg)
    if args.eval_only:
        model = DetrTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = DetrTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = DetrTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run_from_command_line(argv: Optional[List[str]] = None):
    """Parse Detectron2's usual flags and launch ``main`` on ``--num-gpus`` processes per machine: one per
    GPU (NCCL) when ``MODEL.DEVICE`` is CUDA, else that many CPU processes (gloo)."""
    args = default_argument_parser().parse_args(argv)
    logger.info(f"Command line arguments: {args}")
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), device=load_config(args).MODEL.DEVICE)
