"""The `cli.py` commands of the batch-job files (deploy/k8s, deploy/slurm, docker/compose.yaml), read as the
platform would run them: with the resources, environment, volumes and index each one gets.

A command's variables are expanded from what its platform really defines: a container's env and, in an
Indexed Job, JOB_COMPLETION_INDEX; the variables a Slurm script sets, SLURM_ARRAY_TASK_ID in an array and
SLURM_CPUS_PER_TASK from #SBATCH; compose's own defaults. A variable that nothing defines is an error, and
so is a `$` left in a container's args (Kubernetes expands only `$(VAR)`): a misspelt index cannot pass.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import yaml
from conftest import REPO

K8S_MANIFESTS = sorted((REPO / "deploy" / "k8s").glob("*.yaml"))
SLURM_SCRIPTS = sorted((REPO / "deploy" / "slurm").glob("*.sbatch"))
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
K8S_ACCELERATORS = ("nvidia.com/", "huawei.com/")  # extended resources of the device plugins


@dataclass(frozen=True)
class JobCommand:
    """One `cli.py` command of a job file and what the platform gives the process(es) that run it."""

    source: str  # file and place, for messages
    platform: str  # "k8s", "slurm" or "compose"
    template: str | list[str]  # after `cli.py`: shell text (expanded, then split) or a container's args
    env: dict[str, str]  # the variables the command sees, the index aside
    index_variable: str | None = None  # JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID
    indices: tuple[int, ...] = ()  # the indices the platform starts
    accelerator: str | None = None  # "nvidia.com/gpu", "huawei.com/Ascend910", Slurm's "gpu"; None: no device
    accelerators: int = 0  # per pod, or per node
    processes: int = 1  # processes per pod, or per node, that run the command
    image: str | None = None  # container image
    mounts: dict[str, dict] = field(default_factory=dict)  # mount path -> the volume behind it
    details: dict = field(default_factory=dict)  # the platform's own: container, pod spec, #SBATCH, srun options

    @property
    def file(self) -> str:
        return self.source.split(":")[0]

    def argv(self, index: int | None = None) -> list[str]:
        """What `cli.py` receives in the run with this index (the first the platform starts when None)."""
        env = dict(self.env)
        if self.index_variable:
            env[self.index_variable] = str(self.indices[0] if index is None else index)
        if isinstance(self.template, str):
            return shlex.split(expand_shell(self.template, env, self.source))
        argv = [expand_kubernetes(word, env, self.source) for word in self.template]
        assert not [word for word in argv if "$" in word], f"{self.source}: {argv} reaches the CLI unexpanded"
        return argv

    @property
    def command(self) -> str:
        """The sub-command (a literal word in every job file), read without expanding anything."""
        return (self.template.split() if isinstance(self.template, str) else self.template)[0]


# ------------------------------------------------------------------ variables

_SHELL_VARIABLE = re.compile(r"\$\{(\w+)(?::([-+])((?:[^{}])*))?\}|\$(\w+)|\$\(")


def expand_shell(text: str, env: dict[str, str], source: str) -> str:
    """$VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative} as bash expands them; an undefined VAR is an error."""

    def value(match: re.Match) -> str:
        if match[0] == "$(":
            raise AssertionError(f"{source}: command substitution in a cli.py command is not modelled here")
        name, operator, word = match[1] or match[4], match[2], match[3]
        if operator == "-":
            return env[name] if env.get(name) else expand_shell(word, env, source)
        if operator == "+":
            return expand_shell(word, env, source) if env.get(name) else ""
        assert name in env, f"{source}: ${name} is set by nothing the job file or its platform defines"
        return env[name]

    return _SHELL_VARIABLE.sub(value, text)


def expand_kubernetes(word: str, env: dict[str, str], source: str) -> str:
    """$(VAR) from the container's environment, as the kubelet expands args."""

    def value(match: re.Match) -> str:
        assert match[1] in env, f"{source}: $({match[1]}) is not in the container's environment"
        return env[match[1]]

    return re.sub(r"\$\((\w+)\)", value, word)


def after_cli(text: str) -> str:
    """The text after `cli.py` up to the end of that shell command."""
    rest = re.split(r"\S*cli\.py\s+", text, maxsplit=1)[1]
    return re.split(r"\s+(?:&&|\|\||;|\|)\s+", rest, maxsplit=1)[0]


def long_options(words: list[str]) -> dict[str, str]:
    """--name=value / --flag words -> {name: value or ""}; `--name value` is not used in these files."""
    options = {}
    for word in words:
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            options[name] = value
    return options


# ------------------------------------------------------------------ images

def dockerfile_instructions(dockerfile) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def image_user(flavour: str) -> int:
    """The uid docker/FLAVOUR.Dockerfile's final stage runs as."""
    instructions = dockerfile_instructions(REPO / "docker" / f"{flavour}.Dockerfile")
    users = [args for name, args in instructions if name == "USER"]
    return int(users[-1].split(":")[0])


def image_flavour(image: str) -> str:
    """CHANGE-ME-registry/subspectral:cuda-0.1.0 -> cuda (the Dockerfile it is built from)."""
    return image.rsplit(":", 1)[1].split("-")[0]


# ------------------------------------------------------------------ Kubernetes

def k8s_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in K8S_MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _container_env(container: dict) -> dict[str, str]:
    return {item["name"]: str(item.get("value", "<valueFrom>")) for item in container.get("env", [])}


def _accelerator(container: dict) -> tuple[str | None, int]:
    limits = container.get("resources", {}).get("limits", {})
    names = [name for name in limits if name.startswith(K8S_ACCELERATORS)]
    assert len(names) <= 1, names
    return (names[0], int(limits[names[0]])) if names else (None, 0)


def _mounts(container: dict, pod: dict) -> dict[str, dict]:
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    return {mount["mountPath"]: {**volumes.get(mount["name"], {"missing": mount["name"]}),
                                 "readOnly": mount.get("readOnly", False)}
            for mount in container.get("volumeMounts", [])}


def _pod_command(source: str, template, container: dict, pod: dict, **job) -> JobCommand:
    accelerator, count = _accelerator(container)
    return JobCommand(source, "k8s", template, _container_env(container), accelerator=accelerator,
                      accelerators=count, image=container["image"], mounts=_mounts(container, pod),
                      details={"container": container, "pod": pod}, **job)


def k8s_commands() -> list[JobCommand]:
    commands = []
    for name, document in k8s_documents():
        if document["kind"] == "RayJob":  # the driver runs on the head, started by `ray job submit` in a shell
            head = document["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            commands.append(_pod_command(f"{name}: entrypoint", after_cli(document["spec"]["entrypoint"]),
                                         head["containers"][0], head))
        if document["kind"] != "Job":
            continue
        spec, pod = document["spec"], document["spec"]["template"]["spec"]
        job = {}
        if spec.get("completionMode") == "Indexed":
            job = {"index_variable": "JOB_COMPLETION_INDEX", "indices": tuple(range(spec.get("completions", 1)))}
        for container in pod["containers"]:
            # The images' ENTRYPOINT is cli.py, so a container's args are the CLI's arguments.
            commands.append(_pod_command(f"{name}: container {container['name']}", list(map(str, container["args"])),
                                         container, pod, **job))
    return commands


# ------------------------------------------------------------------ Slurm

def sbatch_options(script: str) -> dict[str, str]:
    return long_options([word for line in script.splitlines() if line.startswith("#SBATCH")
                         for word in shlex.split(line[len("#SBATCH"):])])


def _array_indices(spec: str) -> tuple[int, ...]:
    indices = []
    for item in spec.split("%")[0].split(","):
        low, _, high = item.partition("-")
        indices.extend(range(int(low), int(high or low) + 1))
    return tuple(indices)


def _gpus(options: dict[str, str]) -> int:
    found = re.fullmatch(r"gpu(?::\w+)?:(\d+)", options.get("gres", ""))
    return int(found[1]) if found else 0


def slurm_commands() -> list[JobCommand]:
    commands = []
    for path in SLURM_SCRIPTS:
        script = path.read_text().replace("\\\n", " ")
        options = sbatch_options(script)
        env = {"SLURM_SUBMIT_DIR": "/shared/subspectral"}  # what Slurm sets that the scripts read
        if "cpus-per-task" in options:
            env["SLURM_CPUS_PER_TASK"] = options["cpus-per-task"]
        job = {}
        if "array" in options:
            job = {"index_variable": "SLURM_ARRAY_TASK_ID", "indices": _array_indices(options["array"])}
        for line in script.splitlines():
            line = line.strip()
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assignment:  # DATA=${DATA:-s3://...}: the script's default, the variable unset at submission
                env[assignment[1]] = expand_shell(assignment[2], env, path.name)
            if "cli.py" not in line or line.startswith("#"):
                continue
            launcher = shlex.split(line.split("cli.py")[0])
            srun = long_options(launcher[1:]) if launcher[:1] == ["srun"] else {}
            per_node = srun.get("ntasks-per-node") or options.get("ntasks-per-node") or options.get("ntasks", "1")
            gpus = _gpus(options)
            commands.append(JobCommand(
                path.name, "slurm", after_cli(line), dict(env), accelerator="gpu" if gpus else None,
                accelerators=gpus, processes=int(expand_shell(per_node, env, path.name)),
                details={"sbatch": options, "launcher": launcher, "srun": srun}, **job))
    return commands


# ------------------------------------------------------------------ docker compose

def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def compose_commands() -> list[JobCommand]:
    commands = []
    for name, service in compose_services().items():
        text = " ".join(service.get("command", [])).replace("$$", "$")  # compose's escape for the shell's $
        if "cli.py" not in text:
            continue
        # Names without a value pass the host's variable through: unset here, as in a plain `up`.
        env = dict(item.split("=", 1) for item in service.get("environment", []) if "=" in item)
        mounts = {spec.rsplit(":", 1)[1]: {"hostPath": spec.rsplit(":", 1)[0]} for spec in service.get("volumes", [])}
        commands.append(JobCommand(f"compose.yaml: service {name}", "compose", after_cli(text), env,
                                   image=expand_shell(service["image"], {}, name), mounts=mounts,
                                   details={"service": service}))
    return commands


def all_commands() -> list[JobCommand]:
    return k8s_commands() + slurm_commands() + compose_commands()


def parse(command: JobCommand, index: int | None = None):
    """The CLI's own parser on the command; a rejected command fails with the file it comes from."""
    from subspectral import cli

    argv = command.argv(index)
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse reports the bad flag on stderr and exits 2
        raise AssertionError(f"{command.source}: `cli.py {shlex.join(argv)}` is rejected by the CLI's parser "
                             f"(exit {exit_.code}); see the message above") from None
