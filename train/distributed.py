"""Process-group set-up under torchrun or Slurm's srun (NCCL on CUDA, gloo on CPU); rank helpers.

Who started the processes is read from the environment, as torchvision's ``init_distributed_mode`` does:

* torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Its
  variables win whenever ``WORLD_SIZE`` is set (torchrun started inside a Slurm allocation).
* ``srun`` sets, for each task it starts, ``SLURM_PROCID`` (rank), ``SLURM_NTASKS`` (world size) and
  ``SLURM_LOCALID`` (rank on the node), plus ``SLURM_STEP_ID`` (the task belongs to a job step). A batch
  script runs as no step: a bare ``python cli.py train`` there is one process, whatever ``--ntasks``
  says, instead of waiting for ranks that will never start. ``MASTER_ADDR`` and ``MASTER_PORT`` come
  from the environment when set; otherwise they are derived as Lightning's ``SLURMEnvironment`` does:
  the first host of the step's node list (rank 0 runs there) and 15000 + the last four digits of
  ``SLURM_JOB_ID`` (so that two jobs sharing a node do not collide).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from subspectral.train.run import DistInfo

SLURM_BASE_PORT = 15000


@dataclass(frozen=True)
class Launch:
    """How this process was started: its place in the group and where the group meets."""

    info: DistInfo
    launcher: str = "none"  # "torchrun", "slurm" or "none"
    init_method: str = "env://"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[003-004,007],cpu1' -> 'gpu003', 'rack[2-3]-n[1-4]' -> 'rack2-n1'."""
    depth, end = 0, len(nodelist)
    for position, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = position
            break
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", nodelist[:end].strip())


def slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for srun tasks: the environment's, else derived from the job."""
    address = env.get("MASTER_ADDR")
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("srun started this task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                               "set MASTER_ADDR to the host of rank 0")
        address = first_host(nodelist)
    port = env.get("MASTER_PORT")
    if not port:
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            raise RuntimeError(f"cannot derive MASTER_PORT from SLURM_JOB_ID={job_id!r}: set MASTER_PORT")
        port = str(SLURM_BASE_PORT + int(job_id[-4:]))
    return address, int(port)


def read_launch(env: Mapping[str, str]) -> Launch:
    """torchrun's variables, else srun's, else a single process. Pure: reads only ``env``."""
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return Launch(DistInfo())
        return Launch(DistInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0"))), "torchrun")
    world = int(env.get("SLURM_NTASKS", "1") or 1)
    if world <= 1 or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return Launch(DistInfo())
    info = DistInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")))
    address, port = slurm_rendezvous(env)
    host = f"[{address}]" if ":" in address else address  # an IPv6 literal
    return Launch(info, "slurm", f"tcp://{host}:{port}")


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun or srun with more than one process; a no-op otherwise."""
    launch = read_launch(os.environ)
    info = launch.info
    if not info.enabled:
        return info
    if device_type == "cuda":
        if launch.launcher == "slurm":
            # srun may show each task only its own GPU (--gpus-per-task, --gpu-bind): then it is device 0.
            info = replace(info, local_rank=info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=launch.init_method,
                                rank=info.rank, world_size=info.world)
    return info


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
