"""Multi-process launch: Detectron2's ``launch`` on CUDA, the same with gloo processes on CPU.

Detectron2 v0.6's ``launch`` asserts CUDA and initialises NCCL in every process, so a CPU-only machine (or
``MODEL.DEVICE cpu``) cannot use it for more than one process. :func:`launch` hands CUDA runs to it unchanged
and, for CPU runs, spawns the processes itself the same way (same arguments, ranks, ``dist_url`` handling and
per-machine process group, so ``detectron2.utils.comm`` works as usual) with the gloo backend.
"""
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
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
) -> Any:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each of ``num_machines``
    machines; call it on every machine, with its ``machine_rank``.

    Args:
        main_func, num_machines, machine_rank, timeout: as for Detectron2's ``launch``.
        num_processes_per_machine: GPUs per machine on CUDA (``--num-gpus``); processes per machine on CPU.
        dist_url: the process group's init method, e.g. ``tcp://host:port`` (the machine of rank 0), or
            "auto" (a free local port; one machine only).
        args: arguments of ``main_func``.
        device: ``MODEL.DEVICE``. CUDA: Detectron2's ``launch`` (NCCL, one GPU per process); otherwise gloo.

    Returns:
        What ``main_func`` returns when it runs in this process (a single process), else None.
    """
    if torch.device(device).type == "cuda":
        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=tuple(args), timeout=timeout)
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://<machine 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info(f"Launching {num_processes_per_machine} gloo processes on machine {machine_rank} "
                f"({world_size} in all), process group at {dist_url}")
    mp.spawn(
        _distributed_cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args), timeout),
        daemon=False,
    )
    return None


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
