"""Several processes (gloo, CPU): one DDP step equals one step on the whole batch; train_net --num-gpus 2."""
import json
import os
import subprocess
import sys

import torch
from detectron2.utils import comm

from d2_detr.engine import launch

from .conftest import REPO_DIR, TINY_CONFIG
from .step_helpers import SGD_OPTS, assert_same_step, fixed_inputs, initial_params, one_step


def _ddp_steps(inputs, output_path):
    """In each of the 2 processes: its half of ``inputs`` as one batch, then as 2 accumulated micro-batches;
    the main process saves the parameters after each step."""
    torch.set_num_threads(1)
    rank, world_size = comm.get_rank(), comm.get_world_size()
    assert world_size == 2 and comm.get_local_size() == 2 and comm.get_local_rank() == rank
    share = inputs[rank * 2:(rank + 1) * 2]
    results = {"ddp": one_step(SGD_OPTS, [share]), "ddp_accumulated": one_step(SGD_OPTS, [share[:1], share[1:]])}
    if comm.is_main_process():
        torch.save(results, output_path)


def test_two_processes_x_2_images_equal_one_process_x_4(tmp_path):
    """num_boxes and the class-weight normaliser count both processes' images; DDP averages gradients."""
    inputs = fixed_inputs(4)
    launch(_ddp_steps, 2, dist_url="auto", args=(inputs, tmp_path / "ddp.pth"), device="cpu")
    results = torch.load(tmp_path / "ddp.pth")
    reference = one_step(SGD_OPTS, [inputs])
    initial = initial_params(SGD_OPTS)
    assert_same_step(results["ddp"], reference, initial)
    assert_same_step(results["ddp_accumulated"], reference, initial)


def test_train_net_two_cpu_processes_train_and_evaluate(tmp_path):
    command = [sys.executable, os.path.join(REPO_DIR, "tools", "train_net.py"), "--config-file", TINY_CONFIG,
               "--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path), "SOLVER.IMS_PER_BATCH", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_DIR)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "World size: 2" in log
    assert "4 images per iteration (optimizer step) = 2 processes x 1 accumulated micro-batches x 2 images" in log
    assert "Evaluation results for bbox" in log and "|  AP   |  AP50  |" in log
    # only the main process writes checkpoints, metrics and results (others: their own log.txt.rank<N>)
    names = set(os.listdir(tmp_path))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint", "metrics.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")] and "log.txt.rank1" in names
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [r["iteration"] for r in rows if "total_loss" in r][-1] == 3 and any("bbox/AP" in r for r in rows)
    with open(tmp_path / "inference" / "synthetic_shapes_val_small" / "coco_instances_results.json") as f:
        image_ids = {p["image_id"] for p in json.load(f)}
    assert len(image_ids) == 16  # both processes' predictions gathered
