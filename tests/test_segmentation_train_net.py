"""The paper's two-stage segmentation training through tools/train_net.py: a box detector is loaded with
MODEL.DETR.FROZEN_WEIGHTS and frozen, the mask head trains, then --eval-only reports segm AP (COCOEvaluator) or
PQ (COCOPanopticEvaluator) tables."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from .conftest import REPO_DIR, TESTS_DIR, load_config

TRAIN_NET = os.path.join(REPO_DIR, "tools", "train_net.py")
SEGM_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny_segm.yaml")
PANOPTIC_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny_panoptic.yaml")


def train_net(config, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config-file", config, *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO_DIR)
    if proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def save_box_detector(config, path):
    """A detector of the config without its mask head, saved as tools/train_net.py saves models."""
    torch.manual_seed(0)
    cfg = load_config(config, "MODEL.MASK_ON", False, "MODEL.DETR.CRITERION_NAME", "SetCriterion")
    state = build_model(cfg).state_dict()
    torch.save({"model": state}, path)
    return state


@pytest.mark.parametrize("config, table, copypaste", [
    (SEGM_CONFIG, "Evaluation results for segm", "copypaste: Task: segm"),
    (PANOPTIC_CONFIG, "Panoptic Evaluation Results", "copypaste: PQ,SQ,RQ,PQ_th,SQ_th,RQ_th,PQ_st,SQ_st,RQ_st"),
], ids=["instance", "panoptic"])
def test_frozen_detector_mask_training_then_eval_only(tmp_path, config, table, copypaste):
    detector = save_box_detector(config, tmp_path / "box.pth")
    out = tmp_path / "train"
    log = train_net(config, "MODEL.DETR.FROZEN_WEIGHTS", tmp_path / "box.pth", "SOLVER.MAX_ITER", 2,
                    "DATASETS.TEST", "()", "OUTPUT_DIR", out)
    # the box checkpoint's missing mask head is reported the Detectron2 way, the detector frozen
    assert "Some model parameters or buffers are not found in the checkpoint" in log
    assert "mask_head.out_lay.{bias, weight}" in log and "Detector frozen" in log
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert all("loss_mask" in r and "loss_dice" in r for r in rows if "total_loss" in r)
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert all(torch.equal(final[k], v) for k, v in detector.items())  # the detector did not move
    assert any(k.startswith("mask_head.") for k in final)

    log = train_net(config, "--eval-only", "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval")
    assert table in log and copypaste in log
