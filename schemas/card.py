"""The dataset card (dataset.json) as a typed, validated value: what `prepare` states and every reader relies on.

``DatasetCard.from_json`` refuses a card of another schema version or one its JSON Schema
(``dataset_card.schema.json``) rejects, with one line; a reader then takes the sample shape and
dtype, the sub-dataset folders and the shard file names from the card, never from a guess. The shard
names and the per-shard digest table (``shards.parquet``) are defined here once, for the writer and
the readers alike. Pure: no file is opened here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .documents import SCHEMA_VERSION, ContractError, canonical_sha256, check_document, listing_sha256

CARD_KIND = "subspectral-dataset"
CARD_SCHEMA_FILE = "dataset_card.schema.json"
SPLITS = ("train", "val")


def sub_dataset_names(count: int) -> list[str]:
    """Folder names of ``count`` sub-datasets: sub-00 … (two digits, more when count > 100)."""
    width = max(2, len(str(count - 1)))
    return [f"sub-{k:0{width}d}" for k in range(count)]


def shard_name(split: str, shard: int) -> str:
    """``train-000017``: the name of shard 17 of a split, without extension (tars, stats files)."""
    return f"{split}-{shard:06d}"


def shard_file(split: str, shard: int) -> str:
    return shard_name(split, shard) + ".tar"


@dataclass(frozen=True)
class SplitSummary:
    shards: int
    samples: int
    sha256: tuple[str, ...] | None = None  # val: per sub-dataset, listing_sha256 of its shards (train: None)


@dataclass(frozen=True)
class Counts:
    inputs: int
    written: int
    rejected: int
    rejected_by_reason: Mapping[str, int]
    # Classes that rejects left short of --min-per-class / --val-per-class: {"min_per_class": [[name,
    # written], ...], "val_per_class": [[name, val written], ...]}; None in cards that predate it.
    short_classes: Mapping[str, Sequence[Sequence]] | None = None


@dataclass(frozen=True)
class ByteCounts:
    total: int
    per_sub_dataset: tuple[int, ...]
    per_sample_per_sub_dataset: float | None  # None when nothing was written


@dataclass(frozen=True)
class Source:
    uris: tuple[str, ...]
    layout: str
    label_field: str | None = None  # webdataset sources: the JSON field that held the label (None: .cls)


@dataclass(frozen=True)
class DatasetCard:
    """dataset.json; field names are the JSON keys (docs/format.md, "Dataset card")."""

    tool_version: str
    split: int  # N, the number of sub-datasets
    grid: int  # r = sqrt(N)
    size: int  # s, the side of a sub-image
    image_size: int  # S = r * s
    sample_shape: tuple[int, int, int]  # a decoded sample: (s, s, 3)
    sample_dtype: str  # numpy dtype name of a decoded sample: uint8, or the bands' int16 / int32
    resize_mode: str
    transform: str  # none | dct
    dct_scale: int | None
    format: str  # jpg | png | webp | npy | dctz (schemas/bands.py)
    quality: int
    seed: int
    shard_size: int
    val_per_class: int
    min_per_class: int
    min_side: int
    max_pixels: int
    max_file_bytes: int  # larger files were rejected unread (too_large)
    num_classes: int
    class_table_sha256: str
    sub_datasets: tuple[str, ...]
    splits: Mapping[str, SplitSummary]  # train, val
    counts: Counts
    bytes: ByteCounts
    source: Source
    pil: str
    sample_json: bool = False  # each sample also has a KEY.json member (--sample-json)
    shard_bytes: int | None = None  # the target tar size shard_size was chosen for; None: --shard-size given

    def __post_init__(self) -> None:
        # What readers index by or allocate from must agree; the rest is the writer's business.
        problems = []
        if tuple(self.sample_shape) != (self.size, self.size, 3):
            problems.append(f"sample_shape {list(self.sample_shape)} is not [size, size, 3]")
        if tuple(self.sub_datasets) != tuple(sub_dataset_names(self.split)):
            problems.append(f"sub_datasets are not the {self.split} folders sub-00 …")
        if (self.transform == "dct") != (self.dct_scale is not None):
            problems.append("dct_scale is set for transform none, or missing for dct")
        problems += [f"splits.{name}.sha256 has {len(info.sha256)} digests for {self.split} sub-datasets"
                     for name, info in self.splits.items() if len(info.sha256 or ()) not in (0, self.split)]
        if problems:
            raise ContractError(f"inconsistent dataset card: {'; '.join(problems)}")

    @classmethod
    def from_json(cls, document: Any, where: str = "dataset.json") -> DatasetCard:
        """The card of a parsed dataset.json; ContractError (one line) unless it is a valid card of this version."""
        check_document(document, CARD_SCHEMA_FILE, CARD_KIND, where)
        fields = {k: v for k, v in document.items() if k not in ("schema", "schema_version")}
        counts, sizes, source = fields["counts"], fields["bytes"], fields["source"]
        try:
            return cls(**{
                **fields,
                "sample_shape": tuple(fields["sample_shape"]),
                "sub_datasets": tuple(fields["sub_datasets"]),
                "splits": {name: SplitSummary(info["shards"], info["samples"],
                                              tuple(info["sha256"]) if "sha256" in info else None)
                           for name, info in fields["splits"].items()},
                "counts": Counts(counts["inputs"], counts["written"], counts["rejected"],
                                 dict(counts["rejected_by_reason"]), counts.get("short_classes")),
                "bytes": ByteCounts(sizes["total"], tuple(sizes["per_sub_dataset"]),
                                    sizes["per_sample_per_sub_dataset"]),
                "source": Source(tuple(source["uris"]), source["layout"], source.get("label_field")),
            })
        except ContractError as error:
            raise ContractError(f"{where}: {error}") from None

    def to_json(self) -> dict[str, Any]:
        """The dataset.json document (what ``from_json`` reads back to an equal card)."""
        return {
            "schema": CARD_KIND,
            "schema_version": SCHEMA_VERSION,
            "tool_version": self.tool_version,
            "split": self.split,
            "grid": self.grid,
            "size": self.size,
            "image_size": self.image_size,
            "sample_shape": list(self.sample_shape),
            "sample_dtype": self.sample_dtype,
            "resize_mode": self.resize_mode,
            "transform": self.transform,
            "dct_scale": self.dct_scale,
            "format": self.format,
            "quality": self.quality,
            "sample_json": self.sample_json,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
            "val_per_class": self.val_per_class,
            "min_per_class": self.min_per_class,
            "min_side": self.min_side,
            "max_pixels": self.max_pixels,
            "max_file_bytes": self.max_file_bytes,
            "num_classes": self.num_classes,
            "class_table_sha256": self.class_table_sha256,
            "sub_datasets": list(self.sub_datasets),
            "splits": {name: {"shards": info.shards, "samples": info.samples,
                              **({} if info.sha256 is None else {"sha256": list(info.sha256)})}
                       for name, info in self.splits.items()},
            "counts": {"inputs": self.counts.inputs, "written": self.counts.written,
                       "rejected": self.counts.rejected,
                       "rejected_by_reason": dict(self.counts.rejected_by_reason),
                       **({} if self.counts.short_classes is None else
                          {"short_classes": {name: [list(pair) for pair in pairs]
                                             for name, pairs in self.counts.short_classes.items()}})},
            "bytes": {"total": self.bytes.total, "per_sub_dataset": list(self.bytes.per_sub_dataset),
                      "per_sample_per_sub_dataset": self.bytes.per_sample_per_sub_dataset},
            "source": {"uris": list(self.source.uris), "layout": self.source.layout,
                       **({} if self.source.label_field is None else {"label_field": self.source.label_field})},
            "pil": self.pil,
        }

    @cached_property
    def sha256(self) -> str:
        """The card's identity: SHA-256 of its canonical JSON (runs record it; equal cards, equal digests)."""
        return canonical_sha256(self.to_json())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.sample_dtype)

    def shard_files(self, split: str) -> list[str]:
        """The file names of a split's shards in one sub-dataset, in order: train-000000.tar, …"""
        return [shard_file(split, j) for j in range(self.splits[split].shards)]

    def shard_paths(self, split: str, sub_dataset: int) -> list[str]:
        """Paths of sub-dataset k's shards of ``split``, relative to the dataset's folder."""
        folder = self.sub_datasets[sub_dataset]
        return [f"{folder}/{name}" for name in self.shard_files(split)]

    def shard_digests(self, table: pa.Table, split: str, sub_dataset: int) -> list[str]:
        """Sub-dataset k's per-shard SHA-256s of ``split`` (val) from shards.parquet, checked against this card."""
        if self.splits[split].sha256 is None:
            raise ContractError(f"the {split} shards are not hashed (only val shards are)")
        rows = table.filter(pc.and_(pc.equal(table.column("split"), split),
                                    pc.equal(table.column("sub_dataset"), sub_dataset)))
        rows = rows.sort_by("shard")
        names, digests = rows.column("path").to_pylist(), rows.column("sha256").to_pylist()
        expected = self.shard_paths(split, sub_dataset)
        if names != expected or listing_sha256(self.shard_files(split), digests) != \
                self.splits[split].sha256[sub_dataset]:
            raise ContractError(f"shards.parquet does not match dataset.json for {self.sub_datasets[sub_dataset]} "
                                f"{split} (the listing or its digests differ)")
        return digests


# shards.parquet: one row per tar; for val tars, the digests behind the card's ``splits.val.sha256``.
SHARDS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to the dataset's folder: sub-07/val-000003.tar
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("sub_dataset", pa.int32()),  # k
        ("samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),  # null for train tars: only val tars are hashed
    ]
)


def shards_table(split: str, shard: int, samples: int, sizes: Sequence[int],
                 digests: Sequence[str] | None) -> pa.Table:
    """The shards.parquet rows of shard j of ``split``: one per sub-dataset (``digests`` None: not hashed)."""
    names = sub_dataset_names(len(sizes))
    return pa.table(
        {
            "path": [f"{folder}/{shard_file(split, shard)}" for folder in names],
            "split": [split] * len(names),
            "shard": [shard] * len(names),
            "sub_dataset": list(range(len(names))),
            "samples": [samples] * len(names),
            "bytes": list(sizes),
            "sha256": list(digests) if digests is not None else [None] * len(names),
        },
        schema=SHARDS_SCHEMA,
    )
