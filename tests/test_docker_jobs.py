"""The images and the batch-job files (docker/, deploy/) against the real CLI: lint, parse, every command.

No Docker engine or cluster runs here, so this checks what can be checked without one: hadolint on
every Dockerfile, the images' install path (scripts/setup.sh, as README and CI), every manifest parses,
and every `cli.py` command in the manifests, the compose file and the Slurm scripts goes through
``cli.build_parser()`` with its variables expanded as its platform would (tests/job_files.py), so a
renamed flag or recipe fails here and not on the cluster. What the commands mean (device, index, paths)
is checked in test_job_files.py, the manifests' schemas in test_k8s_schemas.py; the Ray head/worker
set-up of the compose file runs for real in test_cluster.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from job_files import (
    COMPOSE_FILE,
    DOCKERFILES,
    K8S_MANIFESTS,
    SLURM_SCRIPTS,
    JobCommand,
    all_commands,
    dockerfile_instructions,
    parse,
)

ALL_COMMANDS = all_commands()


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_like_ci_and_runs_the_cli_as_non_root(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
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
    sources = [token.rstrip("/") for name, args in dockerfile_instructions(dockerfile) if name == "COPY"
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
    assert sorted(kinds) == ["Job", "Job", "Job", "Job", "PersistentVolumeClaim", "RayJob", "compose"]


def test_commands_were_found_in_every_job_file() -> None:
    sources = {command.file for command in ALL_COMMANDS}
    expected = {p.name for p in [*K8S_MANIFESTS, *SLURM_SCRIPTS, COMPOSE_FILE]} - {"storage.yaml"}
    assert sources == expected
    assert {command.command for command in ALL_COMMANDS} == {"prepare", "train", "ensemble-eval"}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.source)
def test_job_command_is_accepted_by_the_cli(command: JobCommand) -> None:
    args = parse(command)
    if args.command == "train":
        from subspectral.train.config import apply_overrides, load_recipe

        apply_overrides(load_recipe(args.config), args.overrides)  # the recipe exists and takes the overrides
