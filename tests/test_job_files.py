"""What the batch-job files mean: every `cli.py` command parsed by the real CLI, read against what its
platform gives it (tests/job_files.py): the device it holds, the index it gets, the paths it shares.

* A pod or task that holds an NVIDIA GPU runs torch on CUDA; one that holds an Ascend NPU trains with
  MindSpore on the NPU (--device-target Ascend) and evaluates MindSpore members there; one that holds
  neither trains nothing. One process per accelerator.
* The member index is the completion index / array task id, and the indices cover 0..N-1 once, N the
  number of sub-datasets prepare writes. Batch training always resumes.
* train --data is prepare --out, ensemble-eval reads that data and the runs folder its members write,
  and the paths lie on the volumes the pods mount.
* Slurm steps get the CPUs of their allocation; a DDP member is srun's tasks forming one group.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from conftest import REPO
from job_files import (
    JobCommand,
    all_commands,
    compose_commands,
    compose_services,
    image_flavour,
    image_user,
    k8s_commands,
    k8s_documents,
    parse,
    slurm_commands,
)

COMMANDS = all_commands()
TRAIN = [c for c in COMMANDS if c.command == "train"]
ENSEMBLE = [c for c in COMMANDS if c.command == "ensemble-eval"]
PREPARE = [c for c in COMMANDS if c.command == "prepare"]


def _ids(commands: list[JobCommand]) -> list[str]:
    return [c.source for c in commands]


def _family(command: JobCommand) -> str:
    """What the command holds: 'gpu', 'npu' or 'cpu'."""
    if command.accelerator is None:
        return "cpu"
    return "npu" if command.accelerator.startswith("huawei.com/") else "gpu"


def _prepare_out(platform: str) -> str:
    outs = {parse(c).out for c in PREPARE if c.platform == platform}
    assert len(outs) == 1, (platform, outs)
    return outs.pop()


def _split(platform: str) -> int:
    """N: the number of sub-datasets the platform's prepare writes (its --split, else the CLI's default)."""
    splits = {parse(c).split for c in PREPARE if c.platform == platform}
    assert len(splits) == 1, (platform, splits)
    return splits.pop()


# ------------------------------------------------------------------ device


@pytest.mark.parametrize("command", TRAIN + ENSEMBLE, ids=_ids(TRAIN + ENSEMBLE))
def test_the_accelerator_a_job_holds_is_the_one_it_computes_on(command: JobCommand) -> None:
    args = parse(command)
    family = _family(command)
    assert family != "cpu", f"{command.source}: trains or evaluates without holding a GPU or NPU"
    if command.platform == "k8s":
        assert image_flavour(command.image) == {"gpu": "cuda", "npu": "ascend"}[family], command.source
    if args.command == "train" and family == "gpu":
        assert (args.backend, args.device) == ("torch", "cuda"), command.source
    if args.command == "train" and family == "npu":
        # Without --device-target Ascend, MindSpore trains on the CPU while the pod holds an NPU.
        assert (args.backend, args.device_target) == ("mindspore", "Ascend"), command.source
    if args.command == "ensemble-eval" and family == "gpu":
        assert args.device and args.device.split(":")[0] == "cuda", command.source
    if args.command == "ensemble-eval" and family == "npu":
        # MindSpore members run where SUBSPECTRAL_MS_DEVICE_TARGET says; the fusion (torch) on the CPU.
        assert command.env.get("SUBSPECTRAL_MS_DEVICE_TARGET") == "Ascend", command.source
        assert args.device == "cpu", command.source


@pytest.mark.parametrize("command", PREPARE, ids=_ids(PREPARE))
def test_prepare_holds_no_accelerator_and_runs_the_cpu_image(command: JobCommand) -> None:
    assert command.accelerator is None, command.source
    if command.image:  # Slurm runs the venv
        assert image_flavour(command.image) == "cpu", command.source


@pytest.mark.parametrize("command", TRAIN + ENSEMBLE, ids=_ids(TRAIN + ENSEMBLE))
def test_one_process_per_accelerator(command: JobCommand) -> None:
    assert command.processes == command.accelerators, (command.source, command.processes, command.accelerators)
    if command.platform == "k8s":  # Kubernetes refuses an extended resource whose request differs from its limit
        resources = command.details["container"]["resources"]
        assert resources["requests"][command.accelerator] == resources["limits"][command.accelerator]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.platform == "k8s"],
                         ids=_ids([c for c in COMMANDS if c.platform == "k8s"]))
def test_pods_run_as_the_user_of_their_image(command: JobCommand) -> None:
    assert command.details["pod"]["securityContext"]["runAsUser"] == image_user(image_flavour(command.image))


@pytest.mark.parametrize("command", [c for c in COMMANDS if _family(c) == "npu"],
                         ids=_ids([c for c in COMMANDS if _family(c) == "npu"]))
def test_npu_pods_mount_the_host_driver(command: JobCommand) -> None:
    driver = command.mounts.get("/usr/local/Ascend/driver", {})
    assert driver.get("hostPath", {}).get("path") == "/usr/local/Ascend/driver" and driver["readOnly"]


# ------------------------------------------------------------------ members: index, resume


def test_every_train_job_is_indexed() -> None:
    assert TRAIN and all(c.index_variable for c in TRAIN), [c.source for c in TRAIN if not c.index_variable]


@pytest.mark.parametrize("command", TRAIN, ids=_ids(TRAIN))
def test_member_index_covers_every_sub_dataset_once(command: JobCommand) -> None:
    from subspectral.train.run import parse_shards

    count = _split(command.platform)
    members = []
    for index in command.indices:
        args = parse(command, index)
        shards = parse_shards(args.shard, count)
        assert shards == [index], f"{command.source}: run {index} trains {shards}"
        members += shards
    assert sorted(members) == list(range(count)), f"{command.source}: members {members}, N = {count}"


@pytest.mark.parametrize("command", TRAIN, ids=_ids(TRAIN))
def test_batch_training_resumes_and_logs_without_a_bar(command: JobCommand) -> None:
    args = parse(command)
    assert args.resume, "a retried, requeued or re-applied member must continue from last.pt, not refuse"
    assert args.no_progress, "a progress bar in a log file is one line per refresh"


def test_slurm_array_tasks_are_requeued_after_preemption() -> None:
    for command in (c for c in TRAIN if c.platform == "slurm"):
        assert "requeue" in command.details["sbatch"] and command.details["sbatch"].get("open-mode") == "append"


# ------------------------------------------------------------------ data and runs


@pytest.mark.parametrize("platform", ["k8s", "slurm"])
def test_train_and_ensemble_read_what_prepare_wrote(platform: str) -> None:
    out = _prepare_out(platform)
    readers = [c for c in TRAIN + ENSEMBLE if c.platform == platform]
    assert readers
    for command in readers:
        assert parse(command).data == out, f"{command.source}: --data {parse(command).data}, prepare --out {out}"


@pytest.mark.parametrize("platform", ["k8s", "slurm"])
def test_each_ensemble_reads_the_runs_its_members_write(platform: str) -> None:
    written = defaultdict(set)  # runs folder -> what trained there (device family, backend)
    for command in (c for c in TRAIN if c.platform == platform):
        args = parse(command)
        written[args.out].add((_family(command), args.backend))
    read = {}
    for command in (c for c in ENSEMBLE if c.platform == platform):
        runs = str(parse(command).runs)
        assert runs in written, f"{command.source}: --runs {runs}, but members write to {sorted(written)}"
        # MindSpore members need the MindSpore of the ascend image to be evaluated.
        assert {_family(command)} == {family for family, _ in written[runs]}, command.source
        read[runs] = command.source
    assert set(read) == set(written), f"no ensemble reads {sorted(set(written) - set(read))}"


def _mount_of(command: JobCommand, path: str) -> dict:
    mounted = [mount for mount in command.mounts if path == mount or path.startswith(mount.rstrip("/") + "/")]
    assert mounted, f"{command.source}: {path} lies on no volume the container mounts ({sorted(command.mounts)})"
    return command.mounts[max(mounted, key=len)]


def test_k8s_runs_live_on_the_shared_claim_and_data_in_object_storage() -> None:
    claims = {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == "PersistentVolumeClaim"}
    for command in k8s_commands():
        args = parse(command)
        data = [*(args.src or []), args.out] if args.command == "prepare" else [args.data]
        assert all(uri.startswith("s3://") for uri in data), command.source  # reachable from every pod
        if args.command in ("train", "ensemble-eval"):
            runs = str(args.out if args.command == "train" else args.runs)
            volume = _mount_of(command, runs)
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim in claims, f"{command.source}: {runs} is not on a claim of storage.yaml"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"] and not volume["readOnly"]


@pytest.mark.parametrize("command", [c for c in k8s_commands() if c.details["container"].get("volumeMounts")],
                         ids=_ids([c for c in k8s_commands() if c.details["container"].get("volumeMounts")]))
def test_every_mount_names_a_volume_of_its_pod(command: JobCommand) -> None:
    assert not [mount for mount in command.mounts.values() if "missing" in mount], command.source


@pytest.mark.parametrize("command", [c for c in TRAIN if c.platform == "k8s"],
                         ids=_ids([c for c in TRAIN if c.platform == "k8s"]))
def test_train_pods_give_the_dataloader_workers_shared_memory(command: JobCommand) -> None:
    from subspectral.train.config import apply_overrides, load_recipe

    args = parse(command)
    if apply_overrides(load_recipe(args.config), args.overrides).data.workers > 0:
        assert _mount_of(command, "/dev/shm").get("emptyDir", {}).get("medium") == "Memory", command.source


def test_compose_prepare_writes_under_the_shared_data_folder() -> None:
    for command in compose_commands():
        args = parse(command)
        assert _mount_of(command, args.out), command.source
        assert command.env.get("SUBSPECTRAL_CACHE", "").startswith("/data/")  # every node sees the sample corpus


# ------------------------------------------------------------------ prepare on Ray


def test_rayjob_prepare_drives_the_cluster_kuberay_starts() -> None:
    import tomllib

    (command,) = [c for c in k8s_commands() if c.command == "prepare"]
    (rayjob,) = [doc for _, doc in k8s_documents() if doc["kind"] == "RayJob"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert parse(command).ray_address == "auto"  # the driver runs on the head: join that cluster
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # every shard task goes to a worker
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[data]=={cluster['rayVersion']}" in pins  # KubeRay talks to the Ray the image has
    python, cli_path = rayjob["spec"]["entrypoint"].split()[:2]
    assert (python, cli_path) == ("/opt/subspectral/.venv/bin/python", "/opt/subspectral/cli.py")
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_compose_prepare_joins_the_head_service() -> None:
    (command,) = compose_commands()
    services = compose_services()
    host, port = parse(command).ray_address.split(":")
    assert host in services and f"--port={port}" in services[host]["command"]
    assert f"--address={host}:{port}" in services["worker"]["command"]


# ------------------------------------------------------------------ Slurm


@pytest.mark.parametrize("command", slurm_commands(), ids=_ids(slurm_commands()))
def test_slurm_steps_get_the_cpus_of_their_allocation(command: JobCommand) -> None:
    # Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: a step without it gets one CPU per
    # task, so 8 DataLoader workers (or prepare's 64 Ray workers) would share a single core.
    allocated = command.details["sbatch"]["cpus-per-task"]
    assert command.details["launcher"][:1] == ["srun"], command.source
    assert command.details["srun"].get("cpus-per-task") in ("${SLURM_CPUS_PER_TASK}", "$SLURM_CPUS_PER_TASK",
                                                            allocated), command.source
    args = parse(command)
    if args.command == "prepare":
        assert args.num_workers == int(allocated), "one shard worker per allocated CPU"


def test_slurm_ddp_member_is_srun_tasks_forming_one_group() -> None:
    from subspectral.train.distributed import read_launch

    (command,) = [c for c in TRAIN if c.platform == "slurm" and c.processes > 1]
    assert not any("torchrun" in word or "torch.distributed" in word for word in command.details["launcher"])
    sbatch, nodes = command.details["sbatch"], int(command.details["sbatch"].get("nodes", "1"))
    world = nodes * command.processes
    assert re.fullmatch(r"gpu:\d+", sbatch["gres"]) and command.accelerators == command.processes
    # What srun gives task r (node r // per-node): the group train/distributed.py forms from it.
    for rank in range(world):
        env = {"SLURM_JOB_ID": "812345", "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(world),
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % command.processes),
               "SLURM_JOB_NODELIST": "gpu[001-004]"}
        launch = read_launch(env)
        assert (launch.info.rank, launch.info.world, launch.launcher) == (rank, world, "slurm")
        assert launch.init_method == "tcp://gpu001:17345"  # 15000 + 2345
    from subspectral.train.config import apply_overrides, load_recipe

    args = parse(command)
    batch = apply_overrides(load_recipe(args.config), args.overrides).data.batch_size
    assert batch % world == 0, f"the global batch {batch} does not split over {world} processes"
