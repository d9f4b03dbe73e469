#!/usr/bin/env python
"""Train or evaluate DETR with Detectron2.

    python tools/train_net.py --config-file configs/detr_r50.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/quickstart_cpu.yaml --resume   # continue a run

Flags are Detectron2's (`--config-file`, `--eval-only`, `--resume`, `--num-gpus`, `--num-machines`,
`--machine-rank`, `--dist-url`) and `--overwrite-output-dir` (train in an OUTPUT_DIR that holds another run's
checkpoints, which is refused otherwise), followed by `KEY VALUE` config overrides. `--eval-only` loads
MODEL.WEIGHTS strictly (`TEST.STRICT_WEIGHTS False` accepts a partial match). The logic lives in
d2_detr.engine.train_net, so that your own script can register datasets and then run the same thing.
"""
from d2_detr.engine.train_net import run_from_command_line

if __name__ == "__main__":
    run_from_command_line()
