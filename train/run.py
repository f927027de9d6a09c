"""A member's run, whatever the backend: the job, run.json's content, the run folder's state and files.

Both backends import this module and none of it imports a framework, so a run folder (config.yaml,
run.json, metrics.jsonl, ``best`` linked to ``last``, final.json) means the same thing whoever wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subspectral.schemas import DatasetCard, InputConstants, ModelSpec, RunRecord
from subspectral.train.config import ConfigError, Recipe, resolve_stem
from subspectral.train.storage import absolute_uri

BASIS_FILE = "ebv_basis.safetensors"
# run.json fields that must agree between a checkpoint and the run resuming from it ("dataset": the same data,
# wherever it is stored now).
IDENTITY_FIELDS = ("shard", "class_table_sha256", "num_classes", "split", "format", "transform", "model", "dataset")
# Each backend's resumable checkpoint in a run folder.
LAST_CHECKPOINT = {"torch": "last.pt", "mindspore": "last.ckpt"}


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run; the message is one line for the user."""


class Diverged(ValueError):
    """The training loss became NaN or infinite; the message is one line for the user."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the processes of one member's run (torchrun, srun, msrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # index on the node; on CUDA, the device this process drives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


@dataclass(frozen=True)
class MemberJob:
    """Which member to train, from which data, into which runs folder."""

    data: str  # absolute path or URI (TrainOptions makes it so)
    shard: int
    out: Path
    resume: bool
    progress: bool


@dataclass(frozen=True)
class TrainOptions:
    """What the command line (or the Python API) asks of a backend, besides the recipe and the members."""

    data: str
    out: Path
    resume: bool = False
    progress: bool = True
    device: str = "auto"  # torch: auto | cpu | cuda
    device_target: str = "CPU"  # mindspore: CPU | GPU | Ascend
    mode: str = "graph"  # mindspore: graph | pynative

    def __post_init__(self) -> None:
        # run.json records where the data is; a relative path would only hold from this directory.
        object.__setattr__(self, "data", absolute_uri(self.data))


@dataclass
class BackendRun:
    """What a backend's ``train_members`` returns: final.json content per member, and how to report it."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    main: bool = True  # this process reports (rank 0 of a distributed run)
    label: str = ""  # appended to each member's summary line


def parse_shards(text: str, count: int) -> list[int]:
    """'all', 'K', '0,3,5' or '0-8' -> member indices; ValueError with a clear message otherwise."""
    if text == "all":
        return list(range(count))
    shards: list[int] = []
    for item in text.split(","):
        low, sep, high = item.partition("-")
        try:
            shards.extend(range(int(low), int(high) + 1) if sep else [int(low)])
        except ValueError as exc:
            raise ValueError(f"--shard {text!r}: expected K, K,L,M, K-L or all") from exc
    for shard in shards:
        if not 0 <= shard < count:
            raise ValueError(f"shard {shard} is out of range: this dataset has {count} sub-datasets "
                             f"(0..{count - 1})")
    return shards


def select_members(data: str, text: str) -> tuple[DatasetCard, list[int]]:
    """The dataset card of ``data`` and the members ``text`` (--shard) names in it."""
    from subspectral.train.prepared import read_card
    from subspectral.train.storage import DataError

    try:
        card = read_card(data)
    except OSError as exc:  # the store cannot be reached or read: endpoint, network, credentials, permissions
        raise DataError(f"cannot read {data}: {' '.join(str(exc).split())}") from exc
    return card, parse_shards(text, card.split)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name in the same folder, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def same_file_as(source: Path, path: Path) -> None:
    """Make ``path`` hold what ``source`` holds (atomically): a hard link, so best == last costs no disk.

    ``source`` is always replaced by rename, never rewritten in place, so the link keeps the old
    content when ``source`` moves on. Filesystems without hard links get a copy.
    """
    def link(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(path, link)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def input_constants(card: DatasetCard, shard: int, recipe: Recipe) -> InputConstants:
    """Scale, mean and std that map stored sample values to network input (see docs/training.md)."""
    mean = tuple(recipe.data.mean)
    if card.transform == "dct":
        # Band values are round(coef * dct_scale) with |coef| <= 255 * grid (band 0: r x block mean),
        # so this scale maps band 0 into [0, 1]; the other bands are centred on 0 and get no mean.
        scale = 1.0 / (255.0 * card.grid * card.dct_scale)
        if shard != 0:
            mean = (0.0,) * len(mean)
    else:
        scale = 1.0 / 255.0
    return InputConstants(scale=scale, mean=mean, std=tuple(recipe.data.std))


def run_record(job: MemberJob, card: DatasetCard, recipe: Recipe, backend: str,
               mindspore: dict[str, Any] | None = None) -> RunRecord:
    """run.json: everything an evaluator needs to rebuild and feed this member, and the data it trained on."""
    model = recipe.model
    # run.json records the stem the network is built with, never "auto"
    spec = ModelSpec(name=model.name, stem=resolve_stem(model.stem, card.size), head=model.head,
                     ebv_dim=(model.ebv_dim or card.num_classes) if model.head == "ebv" else None,
                     ebv_tau=model.ebv_tau, ebv_seed=model.ebv_seed, ebv_threshold=model.ebv_threshold,
                     input=input_constants(card, job.shard, recipe))
    return RunRecord.for_member(card, job.shard, job.data, backend=backend, recipe=recipe.name, model=spec,
                                mindspore=mindspore)


def prepare_run_dir(run_dir: Path, resume: bool, backend: str) -> str:
    """'fresh', 'resume' or 'done'; refuses to overwrite a run unless resuming, or to resume another backend's."""
    if (run_dir / "final.json").exists():
        if resume:
            return "done"
        raise ConfigError(f"{run_dir} already holds a finished member; use another --out or delete it")
    for owner, name in LAST_CHECKPOINT.items():
        if not (run_dir / name).exists():
            continue
        if not resume:
            raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or change --out")
        if owner != backend:
            raise ConfigError(f"{run_dir} holds a {owner} run ({name}); resume it with --backend {owner}")
        return "resume"
    return "fresh"
