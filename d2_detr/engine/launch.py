"""Multi-process launch as Detectron2's ``launch``, for CUDA (NCCL) and CPU (gloo) processes, that a signal to
the launcher stops.

Detectron2 v0.6's ``launch`` asserts CUDA and initialises NCCL in every process, so a CPU-only machine (or
``MODEL.DEVICE cpu``) cannot use it for more than one process. And when its launcher process alone gets SIGINT
(``kill -INT``, ``timeout -s INT``, a job scheduler; Ctrl-C in a terminal signals every process of the job), it
waits for its worker processes, which train on to ``SOLVER.MAX_ITER``.

:func:`launch` spawns the processes as Detectron2 does (same arguments, ranks, ``dist_url`` handling and
per-machine process group, so ``detectron2.utils.comm`` works as usual): Detectron2's own worker on CUDA, the
same with gloo and no GPU set-up otherwise. When the launcher gets SIGINT or SIGTERM, it passes SIGINT on to the
workers (each stops where it is, as after Ctrl-C: a checkpoint being written is abandoned and the previous one
stays the last, see ``AtomicDetectionCheckpointer``), kills those still running after ``stop_timeout`` seconds,
then ends itself as the signal asks (``KeyboardInterrupt`` for SIGINT).
"""
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT, _distributed_worker, _find_free_port
from detectron2.utils import comm

logger = logging.getLogger(__name__)

__all__ = ["launch"]


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
    stop_timeout: float = 60.0,
) -> Any:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each of ``num_machines``
    machines; call it on every machine, with its ``machine_rank``.

    Args:
        main_func, num_machines, machine_rank, timeout: as for Detectron2's ``launch``.
        num_processes_per_machine: GPUs per machine on CUDA (``--num-gpus``); processes per machine on CPU.
        dist_url: the process group's init method, e.g. ``tcp://host:port`` (the machine of rank 0), or
            "auto" (a free local port; one machine only).
        args: arguments of ``main_func``.
        device: ``MODEL.DEVICE``. CUDA: NCCL, one GPU per process (Detectron2's worker); otherwise gloo.
        stop_timeout: after SIGINT or SIGTERM to this process, how long the workers get to stop after the
            SIGINT passed on to them before they are killed.

    Returns:
        What ``main_func`` returns when it runs in this process (a single process), else None.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://<machine 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    cuda = torch.device(device).type == "cuda"
    logger.info(f"Launching {num_processes_per_machine} {'NCCL' if cuda else 'gloo'} processes on machine "
                f"{machine_rank} ({world_size} in all), process group at {dist_url}")
    worker = _distributed_worker if cuda else _distributed_cpu_worker
    _run_workers(worker, num_processes_per_machine,
                 (main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args), timeout),
                 stop_timeout)
    return None


class _Terminated(BaseException):
    """SIGTERM arrived while the launcher waited for its workers."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` in the main thread within the block (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_workers(worker: Callable[..., None], nprocs: int, args: tuple, stop_timeout: float) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)`` (non-daemonic processes; an error in one stops the
    others and is raised here), stopping the workers on SIGINT or SIGTERM to this process first."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, daemon=False, start_method="spawn")
    try:
        with _sigterm_raises():
            try:
                while not context.join():
                    pass
            except (KeyboardInterrupt, _Terminated) as e:
                _stop_workers(context.processes, "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM",
                              stop_timeout)
                raise
    except _Terminated:
        signal.raise_signal(signal.SIGTERM)  # to the handler in place before: by default, the process ends here
        raise SystemExit(128 + signal.SIGTERM)


def _stop_workers(processes: List[mp.Process], received: str, stop_timeout: float) -> None:
    """Send SIGINT to the live worker processes, wait up to ``stop_timeout`` seconds for them, kill the rest (at
    once if another signal interrupts the wait)."""
    alive = [p for p in processes if p.is_alive()]
    logger.warning(f"{received} received: stopping the {len(alive)} running worker process(es) "
                   f"{[p.pid for p in alive]}")
    for process in alive:
        os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + stop_timeout
    try:
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        for process in alive:
            if process.is_alive():
                logger.warning(f"Worker process {process.pid} is still running: killing it")
                process.kill()
            process.join()
    logger.warning(f"Worker processes stopped (exit codes {[p.exitcode for p in alive]})")


def _distributed_cpu_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
    timeout: timedelta,
) -> None:
    """One CPU process: Detectron2's ``_distributed_worker`` with gloo and no GPU set-up."""
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                                timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    assert comm._LOCAL_PROCESS_GROUP is None
    for machine in range(world_size // num_processes_per_machine):
        ranks = list(range(machine * num_processes_per_machine, (machine + 1) * num_processes_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
