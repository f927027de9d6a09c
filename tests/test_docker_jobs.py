"""The batch-job files (docker/, deploy/) against the real CLI: lint, parse, and every command they run.

No Docker engine or cluster runs here, so this checks what can be checked without one: hadolint on
every Dockerfile, the images' install path (scripts/setup.sh, as README and CI), every manifest parses,
and every `cli.py` command in the manifests, the compose file and the Slurm scripts goes through
``cli.build_parser()`` with its placeholders filled in, so a renamed flag or recipe fails here and not
on the cluster. The Ray head/worker set-up of the compose file runs for real in test_cluster.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
K8S_MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
SLURM_SCRIPTS = sorted((REPO / "deploy" / "slurm").glob("*.sbatch"))
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
MEMBERS = 36  # N of the ImageNet-21K job: sub-datasets, members, pods, array tasks
PLACEHOLDER_INDEX = 7  # what $(JOB_COMPLETION_INDEX), ${SLURM_ARRAY_TASK_ID} etc. become


@dataclass(frozen=True)
class JobCommand:
    source: str  # file and place, for messages
    argv: list[str]  # the arguments after cli.py, placeholders filled in


# ------------------------------------------------------------------ extracting commands

def fill_placeholders(text: str, compose: bool = False) -> str:
    """Shell/compose/Kubernetes variables → what a run would see: defaults kept, the rest a number."""
    if compose:
        text = text.replace("$$", "$")
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)  # ${VAR:-default}
    text = re.sub(r"\$\{\w+:\+[^}]*\}", "", text)  # ${VAR:+alternative}: VAR unset
    return re.sub(r"\$\(\w+\)|\$\{\w+\}|\$\w+", str(PLACEHOLDER_INDEX), text)


def cli_args(tokens: list[str]) -> list[str]:
    """The tokens after `cli.py` in a shell command, up to the end of that command."""
    start = next(i for i, token in enumerate(tokens) if token.endswith("cli.py")) + 1
    args = []
    for token in tokens[start:]:
        if token in ("&&", "||", ";", "|"):
            break
        args.append(token)
    return args


def _pod_containers(document: dict) -> list[dict]:
    if document.get("kind") == "Job":
        return document["spec"]["template"]["spec"]["containers"]
    return []


def k8s_commands() -> list[JobCommand]:
    commands = []
    for path in K8S_MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document.get("kind") == "RayJob":
                tokens = shlex.split(fill_placeholders(document["spec"]["entrypoint"]))
                commands.append(JobCommand(f"{path.name}: entrypoint", cli_args(tokens)))
            for container in _pod_containers(document):
                # The images' ENTRYPOINT is cli.py, so a container's args are the CLI's arguments.
                argv = [fill_placeholders(str(arg)) for arg in container["args"]]
                commands.append(JobCommand(f"{path.name}: container {container['name']}", argv))
    return commands


def compose_commands() -> list[JobCommand]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    commands = []
    for name, service in services.items():
        text = " ".join(service.get("command", []))
        if "cli.py" in text:
            tokens = shlex.split(fill_placeholders(text, compose=True))
            commands.append(JobCommand(f"compose.yaml: service {name}", cli_args(tokens)))
    return commands


def slurm_commands() -> list[JobCommand]:
    commands = []
    for path in SLURM_SCRIPTS:
        script = path.read_text().replace("\\\n", " ")
        for line in script.splitlines():
            if "cli.py" in line and not line.lstrip().startswith("#"):
                tokens = shlex.split(fill_placeholders(line))
                commands.append(JobCommand(f"{path.name}", cli_args(tokens)))
    return commands


ALL_COMMANDS = k8s_commands() + compose_commands() + slurm_commands()


def parse(command: JobCommand):
    from subspectral import cli

    try:
        return cli.build_parser().parse_args(command.argv)
    except SystemExit as exit_:  # argparse reports the bad flag on stderr and exits 2
        raise AssertionError(f"{command.source}: `cli.py {' '.join(command.argv)}` is rejected by the CLI's "
                             f"parser (exit {exit_.code}); see the message above") from None


# ------------------------------------------------------------------ Dockerfiles

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with the test extra (scripts/setup.sh test)"
    result = subprocess.run([hadolint, "--no-color", "--disable-ignore-pragma", str(dockerfile)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_the_three_images() -> None:
    assert [p.name for p in DOCKERFILES] == ["ascend.Dockerfile", "cpu.Dockerfile", "cuda.Dockerfile"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_like_ci_and_runs_the_cli_as_non_root(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    runs = [args for name, args in instructions if name == "RUN"]
    # One install path: the script README and CI use, which reads the pins from pyproject.toml and
    # installs pillow-simd last. A second `pip install` here would drift from what CI tests.
    assert any("scripts/setup.sh" in run for run in runs)
    assert not any(re.search(r"pip\S* install", run) for run in runs)
    stages = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert len(stages) >= 2, "multi-stage: the compiler and headers stay in the build stage"
    final = instructions[stages[-1]:]
    assert any(name == "COPY" and args.startswith("--from=build") for name, args in final)
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    entrypoint = [args for name, args in final if name == "ENTRYPOINT"][-1]
    assert "/opt/subspectral/cli.py" in entrypoint and entrypoint.startswith("[")  # exec form: signals reach it


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_holds_only_what_the_image_copies(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line for line in ignore.read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", "allowlist: everything is excluded first (.venv alone is several GB)"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    sources = [token.rstrip("/") for name, args in _instructions(dockerfile) if name == "COPY"
               and not args.startswith("--from") for token in args.split()[:-1]]
    assert sources and set(sources) <= allowed
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"


# ------------------------------------------------------------------ manifests

def test_every_manifest_parses() -> None:
    kinds = []
    for path in [*K8S_MANIFESTS, COMPOSE_FILE]:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert documents, path
        kinds += [doc.get("kind", "compose") for doc in documents]
    assert sorted(kinds) == ["Job", "Job", "Job", "PersistentVolumeClaim", "RayJob", "compose"]


def test_commands_were_found_in_every_job_file() -> None:
    sources = {command.source.split(":")[0] for command in ALL_COMMANDS}
    expected = {p.name for p in [*K8S_MANIFESTS, *SLURM_SCRIPTS, COMPOSE_FILE]} - {"storage.yaml"}
    assert sources == expected
    assert {command.argv[0] for command in ALL_COMMANDS} == {"prepare", "train", "ensemble-eval"}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.source)
def test_job_command_is_accepted_by_the_cli(command: JobCommand) -> None:
    args = parse(command)
    if args.command == "train":
        from subspectral.train.config import apply_overrides, load_recipe
        from subspectral.train.run import parse_shards

        # The pod index / array task id is what reaches --shard, and it names one member.
        assert parse_shards(args.shard, MEMBERS) == [PLACEHOLDER_INDEX]
        assert args.resume, "a retried or requeued member must continue from last.pt, not refuse"
        apply_overrides(load_recipe(args.config), args.overrides)  # the recipe exists and takes the overrides


def test_member_fan_out_matches_the_number_of_sub_datasets() -> None:
    from subspectral.pipeline.prepare_cli import DEFAULTS

    prepare_splits = {parse(c).split for c in ALL_COMMANDS if c.argv[0] == "prepare"}
    assert prepare_splits == {DEFAULTS["split"]} == {MEMBERS}
    for path in K8S_MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "Job" and "completions" in document["spec"]:
                assert document["spec"]["completionMode"] == "Indexed"
                assert document["spec"]["completions"] == MEMBERS
                limits = document["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                assert any(key.startswith(("nvidia.com/", "huawei.com/")) for key in limits), path.name
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", (REPO / "deploy/slurm/train-members.sbatch").read_text(),
                      re.MULTILINE)
    assert array and (int(array[1]), int(array[2])) == (0, MEMBERS - 1)


def test_cluster_jobs_keep_data_in_object_storage_and_runs_on_the_shared_volume() -> None:
    for command in k8s_commands():
        args = parse(command)
        data_uris = [*(args.src or [])] if args.command == "prepare" else [args.data]
        if args.command == "prepare":
            data_uris.append(args.out)
        assert all(uri.startswith("s3://") for uri in data_uris), command.source
        if args.command == "train":
            assert args.out.startswith("/runs/"), command.source
        if args.command == "ensemble-eval":
            assert str(args.runs).startswith("/runs/"), command.source
