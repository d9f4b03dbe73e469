"""tools/train_net.py end to end, as a user runs it: train -> COCO eval, --resume, --eval-only, bad runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from d2_detr.data import register_synthetic_shapes
from d2_detr.engine import DetrTrainer

from .coco_files import CATEGORIES, register, unregister, write_coco_dataset
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


def test_config_errors_are_messages_not_tracebacks(tmp_path):
    proc = train_net("OUTPUT_DIR", tmp_path, "MODEL.DETR.NUM_CLASES", 7, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("train_net.py: error: override MODEL.DETR.NUM_CLASES 7: unknown config key MODEL.DETR.NUM_CLASES. "
            "Did you mean MODEL.DETR.NUM_CLASSES?") in proc.stderr
    assert not os.listdir(tmp_path)


@pytest.fixture
def coco_datasets(tmp_path):
    """Two datasets registered with register_coco_instances, of 3 and 2 classes; their thing_classes are only
    set when their json files are loaded."""
    names = (register("num_classes_coco3", *write_coco_dataset(tmp_path / "c3", num_images=2)),
             register("num_classes_coco2", *write_coco_dataset(tmp_path / "c2", num_images=2,
                                                               categories=CATEGORIES[:2])))
    yield names
    unregister(names)


@pytest.mark.parametrize("train,test,num_classes,wrong,expected", [
    (0, 0, 5, 0, 3),  # too many: trains and evaluates a wrong head
    (1, 0, 2, 0, 3),  # too few for the TEST set: class 2 would crash
])
def test_num_classes_checked_against_coco_json_at_start_up(coco_datasets, train, test, num_classes, wrong, expected):
    cfg = load_config(TINY_CONFIG, "DATASETS.TRAIN", (coco_datasets[train],), "DATASETS.TEST", (coco_datasets[test],),
                      "MODEL.DETR.NUM_CLASSES", num_classes)
    with pytest.raises(ValueError, match=rf"NUM_CLASSES={num_classes}, but dataset '{coco_datasets[wrong]}' has "
                                         rf"{expected} thing_classes \(from the categories of .*annotations.json\); "
                                         rf"set MODEL.DETR.NUM_CLASSES {expected}"):
        DetrTrainer.build_model(cfg)
    cfg.MODEL.DETR.NUM_CLASSES = expected
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST
    assert DetrTrainer.build_model(cfg).num_classes == expected


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


def _save_weights(path, *opts):
    """Weights of a freshly initialised tiny model (config + ``opts``), saved as a checkpoint."""
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(TINY_CONFIG, *opts)).state_dict()}, path)
    return path


def _error_message(proc):
    """The error of a run that train_net.py refused: status 1, no traceback, the message at the end."""
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr and "train_net.py: error: " in proc.stderr, proc.stderr[-5000:]
    return proc.stderr[proc.stderr.rindex("train_net.py: error: "):]


def test_eval_only_refuses_weights_of_another_config_unless_told(tmp_path):
    other = _save_weights(tmp_path / "other.pth", "MODEL.DETR.NUM_CLASSES", 7)
    proc = train_net("--eval-only", "MODEL.WEIGHTS", other, "OUTPUT_DIR", tmp_path / "eval", check=False)
    message = _error_message(proc)
    assert f"checkpoint '{other}' does not match the model built from the config" in message
    assert "MODEL.DETR.NUM_CLASSES 7 (the config has 5)" in message and "TEST.STRICT_WEIGHTS False" in message
    assert "Evaluation results" not in proc.stdout + proc.stderr

    proc = train_net("--eval-only", "MODEL.WEIGHTS", other, "OUTPUT_DIR", tmp_path / "partial",
                     "TEST.STRICT_WEIGHTS", False)
    log = proc.stdout + proc.stderr
    assert "TEST.STRICT_WEIGHTS is False" in log and "Evaluation results for bbox" in log


@pytest.mark.parametrize("case", ["no weights", "unrelated state dict", "truncated"])
def test_eval_only_refuses_what_is_not_a_trained_model(trained, tmp_path, case):
    out, _ = trained
    if case == "no weights":
        weights, expected = "", "MODEL.WEIGHTS is empty: evaluation and inference need a trained checkpoint"
    elif case == "unrelated state dict":
        weights = tmp_path / "resnet.pth"
        torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, weights)
        expected = "The checkpoint holds none of DETR's transformer and head weights"
    else:
        weights = tmp_path / "model_final.pth"
        data = (out / "model_final.pth").read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        expected = f"cannot read checkpoint '{weights}' (MODEL.WEIGHTS): the file is truncated"
    proc = train_net("--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "eval", check=False)
    assert expected in _error_message(proc)
    assert "Evaluation results" not in proc.stdout + proc.stderr


def test_training_from_missing_weights_names_the_file(tmp_path):
    missing = tmp_path / "no_such_model.pth"
    proc = train_net("MODEL.WEIGHTS", missing, "OUTPUT_DIR", tmp_path / "run", check=False)
    assert f"checkpoint '{missing}' (MODEL.WEIGHTS) does not exist" in _error_message(proc)


def test_resume_past_a_truncated_last_checkpoint(trained, tmp_path):
    """The last checkpoint (model_final.pth) is cut short: --resume warns, naming it, and uses
    model_0000003.pth, the newest complete one, to evaluate (--eval-only) or to continue training."""
    out, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_0000001.pth", "model_0000003.pth", "last_checkpoint"):
        os.link(out / name, resumed / name)
    data = (out / "model_final.pth").read_bytes()
    (resumed / "model_final.pth").write_bytes(data[: len(data) // 2])
    proc = train_net("--eval-only", "--resume", "OUTPUT_DIR", resumed)
    log = proc.stdout + proc.stderr
    assert f"Resumed from {resumed / 'model_0000003.pth'} instead of the last checkpoint" in log
    assert f"Loaded {resumed / 'model_0000003.pth'}" in log and "Evaluation results for bbox" in log

    proc = train_net("--resume", "OUTPUT_DIR", resumed, "SOLVER.MAX_ITER", 5, "DATASETS.TEST", "()")
    log = proc.stdout + proc.stderr
    assert f"Resumed from {resumed / 'model_0000003.pth'} instead of the last checkpoint" in log
    assert f"cannot read checkpoint '{resumed / 'model_final.pth'}'" in log and "truncated" in log
    assert "Starting training from iteration 4" in log
    assert torch.load(resumed / "model_final.pth", weights_only=False)["iteration"] == 4


def test_new_run_in_an_output_dir_with_checkpoints_is_refused(trained, tmp_path):
    out, _ = trained
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)}
    proc = train_net("OUTPUT_DIR", out, "SOLVER.MAX_ITER", 2, check=False)
    message = _error_message(proc)
    assert f"OUTPUT_DIR '{out}' holds the checkpoints of another run" in message
    assert "last_checkpoint" in message and "model_final.pth" in message
    assert "--resume" in message and "another OUTPUT_DIR" in message and "--overwrite-output-dir" in message
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)} == before

    again = tmp_path / "again"
    again.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        os.link(out / name, again / name)
    proc = train_net("--overwrite-output-dir", "OUTPUT_DIR", again, "SOLVER.MAX_ITER", 2, "DATASETS.TEST", "()")
    assert "--overwrite-output-dir: OUTPUT_DIR" in proc.stdout + proc.stderr
    assert torch.load(again / "model_final.pth", weights_only=False)["iteration"] == 1
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3  # the other run's file intact
