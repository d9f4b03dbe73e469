#!/usr/bin/env python
"""Train or evaluate DETR with Detectron2.

    python tools/train_net.py --config-file configs/detr_r50.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/quickstart_cpu.yaml --resume   # continue a run

Flags are Detectron2's (`--config-file`, `--eval-only`, `--resume`, `--num-gpus`, `--num-machines`,
`--machine-rank`, `--dist-url`), followed by `KEY VALUE` config overrides.
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2_detr import add_detr_config
from d2_detr.engine import DetrTrainer


def setup(args):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_detr")
    return cfg


def main(args):
    cfg = setup(args)
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


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
