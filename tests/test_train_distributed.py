"""Who started the process, read from its environment: torchrun, srun, or nobody (train/distributed.py).

The processes themselves are started for real in test_train_ddp.py and test_ensemble_distributed.py;
these are the rules, one environment each, as torchrun and srun write them.
"""

from __future__ import annotations

import pytest
from subspectral.train.distributed import DistInfo, first_host, read_launch

# What srun gives task 3 of 8 (two nodes x 4) of job 4711123, step 0.
SRUN_TASK = {"SLURM_JOB_ID": "4711123", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[017-018]",
             "SLURM_STEP_NODELIST": "gpu[017-018]"}
TORCHRUN_WORKER = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(("nodelist", "host"), [
    ("localhost", "localhost"),
    ("gpu017", "gpu017"),
    ("gpu[017-018]", "gpu017"),
    ("gpu[003-004,007],cpu1", "gpu003"),
    ("a1,b[1-2]", "a1"),
    ("node[7]-ib", "node7-ib"),
    ("rack[2-3]-n[01-04]", "rack2-n01"),
])
def test_first_host_of_a_slurm_hostlist(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_srun_task_joins_the_first_node_at_a_port_of_its_job() -> None:
    launch = read_launch(SRUN_TASK)
    assert launch.info == DistInfo(rank=3, world=8, local_rank=3)
    assert launch.launcher == "slurm"
    assert launch.init_method == "tcp://gpu017:16123"  # 15000 + the last four digits of the job id


def test_master_address_and_port_from_the_environment_win_under_srun() -> None:
    launch = read_launch({**SRUN_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"})
    assert launch.init_method == "tcp://10.1.2.3:29400"
    assert read_launch({**SRUN_TASK, "MASTER_ADDR": "fd00::7"}).init_method == "tcp://[fd00::7]:16123"


def test_torchrun_variables_win_over_slurm() -> None:
    launch = read_launch({**SRUN_TASK, **TORCHRUN_WORKER})
    assert launch.info == DistInfo(rank=5, world=16, local_rank=1)
    assert (launch.launcher, launch.init_method) == ("torchrun", "env://")
    # torchrun with one process inside a multi-task allocation: one process, not 8.
    assert read_launch({**SRUN_TASK, "WORLD_SIZE": "1", "RANK": "0"}).info == DistInfo()


@pytest.mark.parametrize("env", [
    {},
    {**SRUN_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},  # an array task
    {key: value for key, value in SRUN_TASK.items() if key != "SLURM_STEP_ID"},  # the batch script itself
], ids=["plain", "one-task", "batch-script"])
def test_single_process_unless_started_as_one_of_several_tasks(env: dict[str, str]) -> None:
    assert read_launch(env).info == DistInfo()
    assert not read_launch(env).info.enabled


def test_srun_without_a_way_to_find_rank_zero_says_what_to_set() -> None:
    task = {key: value for key, value in SRUN_TASK.items() if not key.endswith("NODELIST")}
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        read_launch(task)
    with pytest.raises(RuntimeError, match="set MASTER_PORT"):
        read_launch({**SRUN_TASK, "SLURM_JOB_ID": "4711123_7"})
