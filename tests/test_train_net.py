"""tools/train_net.py end to end, as a user runs it: train -> COCO eval, --resume, --eval-only, bad runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from d2_detr.data import register_synthetic_shapes
from d2_detr.engine import DetrTrainer

from .conftest import PATCH_BACKBONE_OPTS, REPO_DIR, TINY_CONFIG, load_config

TRAIN_NET = os.path.join(REPO_DIR, "tools", "train_net.py")


def train_net(*args, check=True, config=TINY_CONFIG):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config-file", config, *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO_DIR)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 iterations of the tiny config, checkpoints every 2, evaluation at the end."""
    out = tmp_path_factory.mktemp("train")
    proc = train_net("OUTPUT_DIR", out)
    return out, proc.stdout + proc.stderr


def test_train_then_coco_eval(trained):
    out, log = trained
    assert "Evaluation results for bbox" in log and "|  AP   |  AP50  |" in log
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= set(os.listdir(out))
    rows = metrics(out)
    assert [r["iteration"] for r in rows if "total_loss" in r][-1] == 3
    train_rows = [r for r in rows if "total_loss" in r]
    assert all("class_error" in r and "cardinality_error" in r for r in train_rows)
    assert any("bbox/AP" in r for r in rows)


def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    for name in ("model_0000003.pth",):
        os.link(out / name, resumed / name)
    (resumed / "last_checkpoint").write_text("model_0000003.pth")
    proc = train_net("--resume", "OUTPUT_DIR", resumed, "SOLVER.MAX_ITER", 6, "TEST.EVAL_PERIOD", 0)
    assert "Starting training from iteration 4" in proc.stdout + proc.stderr
    iters = [r["iteration"] for r in metrics(resumed) if "total_loss" in r]
    assert iters[0] >= 4 and iters[-1] == 5
    final = torch.load(resumed / "model_final.pth", weights_only=False)
    assert final["iteration"] == 5
    # the LR schedule and the optimizer continued: 6 scheduler steps and 6 AdamW steps in all
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 6
    adamw_steps = {float(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert adamw_steps == {6.0}
    assert [r["lr"] for r in metrics(resumed) if "lr" in r][-1] == pytest.approx(1e-5)  # decayed at step 3


def test_eval_only(trained, tmp_path):
    out, _ = trained
    proc = train_net("--eval-only", "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path)
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert os.path.exists(tmp_path / "inference" / "synthetic_shapes_val_small" / "coco_instances_results.json")


def test_non_finite_loss_stops_with_iteration(tmp_path):
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", check=False)
    assert proc.returncode != 0
    assert "infinite or NaN at iteration=0" in proc.stdout + proc.stderr
    assert not any(name.endswith(".pth") for name in os.listdir(tmp_path))


def test_num_classes_mismatch_is_caught_at_start_up(tmp_path):
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.DETR.NUM_CLASSES", 7, check=False)
    assert proc.returncode != 0
    assert "MODEL.DETR.NUM_CLASSES=7" in proc.stderr and "set MODEL.DETR.NUM_CLASSES 5" in proc.stderr


def _evaluate(cfg, batch_size, output_dir):
    """COCO results and predictions of a model freshly initialised with seed 0."""
    cfg = cfg.clone()
    cfg.merge_from_list(["TEST.IMS_PER_BATCH", batch_size, "OUTPUT_DIR", str(output_dir)])
    torch.manual_seed(0)
    model = DetrTrainer.build_model(cfg)
    result = DetrTrainer.test(cfg, model)["bbox"]
    with open(output_dir / "inference" / cfg.DATASETS.TEST[0] / "coco_instances_results.json") as f:
        predictions = sorted(json.load(f), key=lambda p: p["image_id"])  # stable: query order kept
    return result, predictions


@pytest.fixture(scope="module")
def mixed_sizes_val(tmp_path_factory):
    name = "test_mixed_sizes_val"
    register_synthetic_shapes(name, num_images=12, seed=11, image_size=(64, 160),
                              root=str(tmp_path_factory.mktemp("mixed")))
    return name


def test_batched_evaluation_is_exact_with_pointwise_backbone(mixed_sizes_val, tmp_path):
    """With a backbone whose cells see only their own pixels, batching changes nothing at all: masks are
    applied at test time and the whole eval path (batched loader, padding, rescaling) is batch-invariant."""
    cfg = load_config(TINY_CONFIG, *PATCH_BACKBONE_OPTS, "DATASETS.TEST", (mixed_sizes_val,), "INPUT.MIN_SIZE_TEST", 0)
    (ap1, pred1), (ap4, pred4) = (_evaluate(cfg, b, tmp_path / f"b{b}") for b in (1, 4))
    assert {k: v for k, v in ap1.items() if v == v} == {k: v for k, v in ap4.items() if v == v}  # NaN != NaN
    assert len(pred1) == len(pred4) == 12 * 10
    for a, b in zip(pred1, pred4):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
