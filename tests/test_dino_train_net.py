"""tools/train_net.py end to end with DINO: train -> COCO eval, then --eval-only from the written checkpoint, and the
start-up checks of NUM_CLASSES and of the denoising label book."""
import json
import os

import torch

from .conftest import TESTS_DIR
from .test_train_net import train_net as run_train_net

TINY_DINO = os.path.join(TESTS_DIR, "configs", "tiny_dino.yaml")


def train_net(*args, check=True):
    return run_train_net(*args, check=check, config=TINY_DINO)


def test_train_then_eval_only(tmp_path):
    out = tmp_path / "train"
    train_net("OUTPUT_DIR", out)
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "total_loss" in r]
    assert train_rows[-1]["iteration"] == 3
    assert all({"loss_ce_enc", "loss_ce_0"} <= set(r) for r in train_rows)
    # denoising losses exist in steps whose batch holds boxes (a step of box-less images has none)
    assert any({"loss_bbox_dn", "loss_giou_dn_0"} <= set(r) for r in train_rows)
    assert any("bbox/AP" in r for r in rows)
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert "label_enc.weight" in final["model"] and "transformer.tgt_embed.weight" in final["model"]
    assert sorted(g["name"] for g in final["trainer"]["_trainer"]["optimizer"]["param_groups"]) == [
        "'sampling_offsets'", "backbone", "other"]

    proc = train_net("--eval-only", "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval")
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    results = tmp_path / "eval" / "inference" / "synthetic_shapes_val_small" / "coco_instances_results.json"
    assert os.path.exists(results)


def test_num_classes_and_label_book_are_checked_at_start_up(tmp_path):
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.DETR.NUM_CLASSES", 7, "MODEL.DINO.DN_LABELBOOK_SIZE", 7,
                     check=False)
    assert proc.returncode != 0 and "set MODEL.DETR.NUM_CLASSES 5" in proc.stderr
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.DINO.DN_LABELBOOK_SIZE", 4, check=False)
    assert proc.returncode != 0 and "DN_LABELBOOK_SIZE=4 is smaller than MODEL.DETR.NUM_CLASSES=5" in proc.stderr
