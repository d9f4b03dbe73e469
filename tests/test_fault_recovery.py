"""Atomic checkpoints, and a training run killed with SIGKILL then resumed with --resume."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from d2_detr.engine import AtomicDetectionCheckpointer

from .conftest import REPO_DIR, TINY_CONFIG

TRAIN_NET = os.path.join(REPO_DIR, "tools", "train_net.py")
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(nn.Linear(2, 2), str(tmp_path))
    checkpointer.save("model_0000001")

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000003")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")


def test_sigkill_while_writing_leaves_no_partial_checkpoint(tmp_path):
    """A process killed in the middle of writing a checkpoint: the previous one is still the last, the
    temporary file is never listed as a checkpoint, and the next run's checkpointer removes it."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from torch import nn
        from d2_detr.engine import AtomicDetectionCheckpointer
        checkpointer = AtomicDetectionCheckpointer(nn.Linear(2, 2), {str(tmp_path)!r})
        checkpointer.save("model_0000001")
        def killed_while_writing(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_while_writing
        checkpointer.save("model_0000003")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=REPO_DIR)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers and leftovers[0].startswith(".model_0000003.pth.")
    assert sorted(set(os.listdir(tmp_path)) - set(leftovers)) == ["last_checkpoint", "model_0000001.pth"]

    checkpointer = AtomicDetectionCheckpointer(nn.Linear(2, 2), str(tmp_path))
    assert checkpointer.get_all_checkpoint_files() == [str(tmp_path / "model_0000001.pth")]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=False)["model"].keys() == {"weight", "bias"}
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # temporary file removed


def _train(out, max_iter, *flags):
    return [sys.executable, TRAIN_NET, "--config-file", TINY_CONFIG, *flags, "OUTPUT_DIR", str(out),
            "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.STEPS", "(1,)",
            "SOLVER.MAX_ITER", str(max_iter)]


def test_sigkill_then_resume_continues_schedule_and_optimizer(tmp_path):
    """Kill a long run once it has saved a checkpoint (every 2 iterations; the LR drops after iteration 1),
    resume: training goes on from the next iteration with the decayed LR and AdamW's step count, as if never
    interrupted."""
    proc = subprocess.Popen(_train(tmp_path, 100000), env=ENV, cwd=REPO_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "last_checkpoint").exists():
            assert proc.poll() is None, "training stopped before its first checkpoints"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    last = (tmp_path / "last_checkpoint").read_text()
    for name in os.listdir(tmp_path):  # every file that looks like a checkpoint is a complete one
        if name.endswith(".pth"):
            torch.load(tmp_path / name, weights_only=False)
    killed_at = torch.load(tmp_path / last, weights_only=False)["iteration"]
    assert last == f"model_{killed_at:07d}.pth" and killed_at >= 1

    resumed = subprocess.run(_train(tmp_path, killed_at + 3, "--resume"), env=ENV,
                             cwd=REPO_DIR, capture_output=True, text=True)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    assert f"Starting training from iteration {killed_at + 1}" in log
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["iteration"] == killed_at + 2
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == killed_at + 3
    adamw_steps = {float(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert adamw_steps == {killed_at + 3.0}
    assert final["trainer"]["_trainer"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
