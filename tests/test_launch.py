"""d2_detr.engine.launch: SIGINT or SIGTERM to the launcher stops its worker processes, and then the launcher."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import REPO_DIR, sigint_default

# Two CPU workers that wait until interrupted; each writes "started.<rank>.<pid>" and, when it gets
# KeyboardInterrupt, "stopped.<rank>". Rank 1 ignores SIGINT when asked to.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from d2_detr.engine.launch import launch

    def work(folder, rank1_ignores_sigint):
        from detectron2.utils import comm
        rank = comm.get_rank()
        if rank == 1 and rank1_ignores_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        open(os.path.join(folder, f"started.{rank}.{os.getpid()}"), "w").close()
        try:
            while True:
                time.sleep(0.05)
        except KeyboardInterrupt:
            open(os.path.join(folder, f"stopped.{rank}"), "w").close()
            raise

    if __name__ == "__main__":
        launch(work, 2, dist_url="auto", args=(sys.argv[1], sys.argv[2] == "1"), device="cpu",
               stop_timeout=float(sys.argv[3]))
""")


def _started_workers(folder, proc, deadline_s=300):
    """{rank: pid} of the two workers, once both have started."""
    deadline = time.monotonic() + deadline_s
    while True:
        started = [name.split(".") for name in os.listdir(folder) if name.startswith("started.")]
        if len(started) == 2:
            return {int(rank): int(pid) for _, rank, pid in started}
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sent, rank1_ignores_sigint, stop_timeout", [
    (signal.SIGINT, False, 300), (signal.SIGTERM, True, 3)], ids=["sigint", "sigterm-and-a-worker-ignoring-sigint"])
def test_signal_to_launcher_stops_workers(tmp_path, sent, rank1_ignores_sigint, stop_timeout):
    """The workers get SIGINT (KeyboardInterrupt: they stop where they are); one that ignores it is killed
    after stop_timeout; the launcher then ends as the signal asks."""
    script = tmp_path / "workers.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "markers"
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_DIR, PYTHONWARNINGS="ignore")
    command = [sys.executable, str(script), str(folder), str(int(rank1_ignores_sigint)), str(stop_timeout)]
    proc = subprocess.Popen(command, env=env, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=sigint_default)
    try:
        pids = _started_workers(folder, proc)
        proc.send_signal(sent)
        output, _ = proc.communicate(timeout=stop_timeout + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -sent, output
    assert not [pid for pid in pids.values() if _alive(pid)]
    stopped = sorted(name for name in os.listdir(folder) if name.startswith("stopped."))
    assert stopped == (["stopped.0"] if rank1_ignores_sigint else ["stopped.0", "stopped.1"])
    assert f"{signal.Signals(sent).name} received: stopping the 2 running worker process(es)" in output
    assert (f"Worker process {pids[1]} is still running: killing it" in output) == rank1_ignores_sigint
