"""Atomic checkpoints, a training run killed with SIGKILL then resumed with --resume, --resume past an
unreadable last checkpoint, and SIGINT to the launcher of a multi-process run."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from d2_detr.checkpoint import UnreadableCheckpointError, load_checkpoint_strict
from d2_detr.engine import AtomicDetectionCheckpointer

from .conftest import REPO_DIR, TINY_CONFIG, load_config, sigint_default

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


def _worker_pids(launcher_pid):
    """PIDs of the processes that torch.multiprocessing spawned from ``launcher_pid`` (Linux /proc)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    pids = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.append(pid)
        except FileNotFoundError:
            pass
    return pids


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigint_to_launcher_stops_cpu_workers_and_keeps_last_checkpoint(tmp_path):
    """``kill -INT`` to the launcher of a 2-process gloo run (as timeout and schedulers send it): both workers
    stop well before MAX_ITER, the launcher exits, and the last checkpoint is complete."""
    out = tmp_path / "run"
    command = _train(out, 100000, "--num-gpus", "2", "--dist-url", "auto") + ["SOLVER.IMS_PER_BATCH", "4"]
    env = dict(ENV, OMP_NUM_THREADS="1")
    with open(tmp_path / "launcher.log", "w") as log_file:
        proc = subprocess.Popen(command, env=env, cwd=REPO_DIR, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last_checkpoint").exists():
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "launcher.log").read_text()
    assert proc.returncode == -signal.SIGINT, log[-5000:]
    assert not [pid for pid in workers if _running(pid)]
    assert "SIGINT received: stopping the 2 running worker process(es)" in log
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    last = out / (out / "last_checkpoint").read_text()
    checkpoint = torch.load(last, weights_only=False)
    assert 1 <= checkpoint["iteration"] < 100000 - 1
    model = build_model(load_config(TINY_CONFIG))
    load_checkpoint_strict(model, str(last))


def _checkpoints(folder):
    """model_0000001 (weights 1), model_0000003 (3), model_final (4, the last) of a 2x2 linear layer."""
    model = nn.Linear(2, 2)
    checkpointer = AtomicDetectionCheckpointer(model, str(folder))
    for name, value in (("model_0000001", 1.0), ("model_0000003", 3.0), ("model_final", 4.0)):
        nn.init.constant_(model.weight, value)
        checkpointer.save(name, iteration=int(value))
    return folder / "model_final.pth", folder / "model_0000003.pth", folder / "model_0000001.pth"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_falls_back_to_previous_complete_checkpoint(tmp_path, caplog):
    final, third, first = _checkpoints(tmp_path)
    _truncate(final)
    model = nn.Linear(2, 2)
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    with caplog.at_level("WARNING", logger="d2_detr"):
        extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 3 and model.weight[0, 0].item() == 3.0
    assert f"Resumed from {third} instead of the last checkpoint" in caplog.text
    assert f"cannot read checkpoint '{final}'" in caplog.text and "truncated" in caplog.text

    third.unlink()  # a missing file is skipped as well
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1

    first.write_text("not a checkpoint")
    nn.init.constant_(model.weight, 7.0)
    with pytest.raises(UnreadableCheckpointError) as info:
        checkpointer.resume_or_load("", resume=True)
    message = str(info.value)
    assert f"--resume: no checkpoint in {tmp_path} can be read" in message and "Nothing was loaded" in message
    assert str(final) in message and str(first) in message and "another OUTPUT_DIR" in message
    assert model.weight[0, 0].item() == 7.0
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_final.pth"]  # kept
