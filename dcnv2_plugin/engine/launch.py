"""Starts data-parallel training: detectron2's `launch` on GPUs (NCCL), and
the same on CPU processes with the gloo backend, which detectron2's `launch`
does not offer (it asserts CUDA)."""

import logging
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(processes_per_machine: int) -> int:
    """Torch threads of each of a machine's CPU processes: $OMP_NUM_THREADS
    where the user set it, else the cores split evenly. More threads than
    cores would make each process wait on the others' spinning threads."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, available_cores() // processes_per_machine)


def _local_rendezvous_url(folder: str) -> str:
    """A file-based rendezvous for processes on this machine: a TCP port picked
    as free can be taken by another program before the first process listens
    on it (seen as EADDRINUSE), a file in a fresh folder cannot."""
    return "file://" + os.path.join(folder, "rendezvous")


def check_launch(device: str, processes_per_machine: int, num_machines: int, dist_url: str) -> None:
    """Refuses a launch that cannot work, saying what to change."""
    if processes_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus and --num-machines must be at least 1, got {processes_per_machine} and {num_machines}"
        )
    if device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError(
                f"MODEL.DEVICE is {device!r} but this machine has no CUDA GPU: set MODEL.DEVICE cpu "
                "(--num-gpus N then starts N CPU processes)"
            )
        if processes_per_machine > gpus:
            raise ValueError(
                f"--num-gpus {processes_per_machine} asks for more GPUs than this machine has ({gpus}): "
                f"use --num-gpus {gpus} or fewer"
            )
    elif device.startswith("cpu"):
        cores = available_cores()
        if processes_per_machine > cores:
            raise ValueError(
                f"--num-gpus {processes_per_machine} with MODEL.DEVICE cpu starts one process per core, but "
                f"only {cores} core(s) are available: use --num-gpus {cores} or fewer"
            )
    elif processes_per_machine * num_machines > 1:
        raise ValueError(f"multi-process training runs on MODEL.DEVICE cuda or cpu, not {device!r}")
    if num_machines > 1 and dist_url == "auto":
        raise ValueError(
            "--dist-url auto works on one machine only: give every machine the same "
            "--dist-url tcp://<address of machine 0>:<free port>"
        )


def launch(
    main_func,
    processes_per_machine: int,
    *,
    device: str,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Runs `main_func(*args)` in `processes_per_machine` processes on each of
    `num_machines` machines (GPUs: one per process; CPU: the cores split among
    the processes). One process in all runs it in this process."""
    check_launch(device, processes_per_machine, num_machines, dist_url)
    if not device.startswith("cpu"):
        return detectron2_launch(
            main_func,
            processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = processes_per_machine * num_machines
    if world_size == 1:
        return main_func(*args)
    threads = threads_per_process(processes_per_machine)
    with tempfile.TemporaryDirectory(prefix="dcnv2-launch-") as folder:
        url = _local_rendezvous_url(folder) if dist_url == "auto" else dist_url
        mp.start_processes(
            _cpu_worker,
            nprocs=processes_per_machine,
            args=(main_func, world_size, processes_per_machine, machine_rank, url, args, timeout, threads),
            daemon=False,
            start_method="spawn",
        )


def _cpu_worker(
    local_rank, main_func, world_size, processes_per_machine, machine_rank, dist_url, args, timeout, threads
):
    torch.set_num_threads(threads)
    rank = machine_rank * processes_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    except Exception:
        logger.error("could not join the process group at %s (rank %d of %d)", dist_url, rank, world_size)
        raise
    _create_local_process_group(processes_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _create_local_process_group(processes_per_machine: int) -> None:
    """The group of this machine's processes, which detectron2's `comm`
    (get_local_rank, get_local_size) reads."""
    if hasattr(comm, "create_local_process_group"):  # newer detectron2
        comm.create_local_process_group(processes_per_machine)
        return
    num_machines = dist.get_world_size() // processes_per_machine
    machine = dist.get_rank() // processes_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * processes_per_machine, (i + 1) * processes_per_machine)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group
