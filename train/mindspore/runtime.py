"""MindSpore process set-up: device target, GRAPH/PYNATIVE mode, data-parallel init under msrun or mpirun.

Call ``prepare_environment`` before the first ``import mindspore``: on x86 CPUs with AVX-512,
MindSpore 2.10's oneDNN (v3.10) runs plain-layout (NCHW) convolutions through its
``jit_uni_ncsp:conv+ref`` implementation, measured at 0.2-0.4 GFLOPS here (a 3x3 64->64 conv on
8x14x14: 280 ms); capped at AVX2 it picks ``gemm:jit`` at 55-60 GFLOPS (1.9 ms). So the CPU target
caps oneDNN at AVX2 unless the user set ``ONEDNN_MAX_CPU_ISA`` themselves (see BENCHMARKS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from subspectral.train.run import DistInfo

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")


@dataclass(frozen=True, kw_only=True)
class Runtime(DistInfo):
    """Where this process trains, and its place in the data-parallel group (``DistInfo``: rank, world)."""

    device_target: str
    mode: str


def launched_distributed() -> bool:
    """True under msrun (MS_WORKER_NUM / RANK_SIZE) or mpirun (OMPI_COMM_WORLD_SIZE) with more than one process."""
    for name in ("MS_WORKER_NUM", "RANK_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return False


def prepare_environment(device_target: str) -> None:
    if device_target == "CPU":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings go to stderr otherwise, one per op


def init_runtime(device_target: str, mode: str, seed: int) -> Runtime:
    """Set the context; join the collective group when launched by msrun/mpirun (data parallel)."""
    prepare_environment(device_target)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device(device_target)
    ms.set_seed(seed)
    if not launched_distributed():
        return Runtime(device_target=device_target, mode=mode)
    from mindspore.communication import get_group_size, get_rank, init

    init()  # hccl on Ascend, nccl on GPU, mccl (MindSpore's own) on CPU
    world, rank = get_group_size(), get_rank()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world)
    return Runtime(device_target=device_target, mode=mode, rank=rank, world=world)
