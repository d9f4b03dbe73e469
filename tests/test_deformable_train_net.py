"""tools/train_net.py end to end with Deformable DETR (two-stage with refinement, the variant that exercises
every part): train -> COCO eval, then --eval-only from the written checkpoint, and the NUM_CLASSES check."""
import json
import os

import torch

from .conftest import TESTS_DIR
from .test_train_net import train_net as run_train_net

TINY_DEFORMABLE = os.path.join(TESTS_DIR, "configs", "tiny_deformable.yaml")
TWO_STAGE = ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", True, "MODEL.DEFORMABLE_DETR.TWO_STAGE", True]


def train_net(*args, check=True):
    return run_train_net(*args, check=check, config=TINY_DEFORMABLE)


def test_train_then_eval_only(tmp_path):
    out = tmp_path / "train"
    log = train_net(*TWO_STAGE, "OUTPUT_DIR", out).stdout
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "total_loss" in r]
    assert train_rows[-1]["iteration"] == 3
    assert all("loss_ce_enc" in r and "loss_giou_1" not in r and "loss_bbox_0" in r for r in train_rows)
    assert any("bbox/AP" in r for r in rows)
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert "transformer.enc_output.weight" in final["model"]
    # the deformable recipe's parameter groups, restored with the optimizer state
    assert sorted(g["name"] for g in final["trainer"]["_trainer"]["optimizer"]["param_groups"]) == [
        "'sampling_offsets'", "backbone", "other"]  # two-stage: no reference_points layer

    proc = train_net("--eval-only", *TWO_STAGE, "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR",
                     tmp_path / "eval")
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert os.path.exists(tmp_path / "eval" / "inference" / "synthetic_shapes_val_small" / "coco_instances_results.json")


def test_num_classes_mismatch_is_caught_at_start_up(tmp_path):
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.DETR.NUM_CLASSES", 7, check=False)
    assert proc.returncode != 0
    assert "MODEL.DETR.NUM_CLASSES=7" in proc.stderr and "set MODEL.DETR.NUM_CLASSES 5" in proc.stderr
