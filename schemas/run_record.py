"""A member's run record (run.json) as a typed, validated value: model, head, input constants, data identity.

Both training backends write it (``RunRecord.for_member``); ``ensemble-eval`` and any evaluator read it
with ``RunRecord.from_json``, which refuses another schema version or a malformed record with one line.
The data identity says which data the member saw: the card's digest and seed, its sub-dataset, and
the digest of that sub-dataset's val shards (``DatasetCard.splits``), so a member is never evaluated
on data other than the data it was validated on, none of which it trained on. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .card import DatasetCard
from .documents import SCHEMA_VERSION, check_document

RUN_KIND = "subspectral-run"
RUN_SCHEMA_FILE = "run_record.schema.json"


@dataclass(frozen=True)
class InputConstants:
    """Stored sample values -> network input: ``(x * scale - mean) / std`` per channel (docs/training.md)."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the registry name, a torchvision builder: resnet18, …
    stem: str  # imagenet | lowres
    head: str  # linear | ebv
    ebv_dim: int | None
    ebv_tau: float
    ebv_seed: int
    ebv_threshold: float
    input: InputConstants


@dataclass(frozen=True)
class DataIdentity:
    """Which data a member trained on: enough to refuse any other data, wherever it is stored."""

    card_sha256: str  # the card it trained with (a copy of the dataset elsewhere has the same card)
    seed: int
    sub_dataset: str  # sub-KK
    val_sha256: str  # the card's splits.val.sha256[k]: the val shards it was validated on

    @classmethod
    def of(cls, card: DatasetCard, shard: int) -> DataIdentity:
        return cls(card.sha256, card.seed, card.sub_datasets[shard], card.splits["val"].sha256[shard])


# Fields a member shares with the card of the data it can be evaluated on, checked in this order.
CARD_FIELDS = ("class_table_sha256", "num_classes", "split", "transform", "size", "format", "sample_dtype")


@dataclass(frozen=True)
class RunRecord:
    """run.json; field names are the JSON keys (docs/training.md, "Run folder")."""

    backend: str
    recipe: str
    shard: int
    data: str  # the prepared dataset: an absolute path or an object-store URI
    dataset: DataIdentity
    class_table_sha256: str
    num_classes: int
    split: int
    size: int
    transform: str
    format: str
    dct_scale: int | None
    sample_shape: tuple[int, int, int]
    sample_dtype: str
    model: ModelSpec
    mindspore: Mapping[str, Any] | None = None  # --backend mindspore: version, device target, mode, AMP level

    @classmethod
    def for_member(cls, card: DatasetCard, shard: int, data: str, *, backend: str, recipe: str,
                   model: ModelSpec, mindspore: Mapping[str, Any] | None = None) -> RunRecord:
        """The record of member ``shard`` trained on ``card``'s data at ``data`` (absolute path or URI)."""
        return cls(backend=backend, recipe=recipe, shard=shard, data=data, dataset=DataIdentity.of(card, shard),
                   class_table_sha256=card.class_table_sha256, num_classes=card.num_classes, split=card.split,
                   size=card.size, transform=card.transform, format=card.format, dct_scale=card.dct_scale,
                   sample_shape=card.sample_shape, sample_dtype=card.sample_dtype, model=model, mindspore=mindspore)

    @classmethod
    def from_json(cls, document: Any, where: str = "run.json") -> RunRecord:
        """The record of a parsed run.json; ContractError (one line) unless it is valid for this version."""
        check_document(document, RUN_SCHEMA_FILE, RUN_KIND, where)
        fields = {k: v for k, v in document.items() if k not in ("schema", "schema_version")}
        model = dict(fields["model"])
        constants = model.pop("input")
        return cls(**{
            **fields,
            "dataset": DataIdentity(**fields["dataset"]),
            "sample_shape": tuple(fields["sample_shape"]),
            "model": ModelSpec(**model, input=InputConstants(constants["scale"], tuple(constants["mean"]),
                                                              tuple(constants["std"]))),
        })

    def to_json(self) -> dict[str, Any]:
        model = self.model
        document = {
            "schema": RUN_KIND,
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "recipe": self.recipe,
            "shard": self.shard,
            "data": self.data,
            "dataset": {"card_sha256": self.dataset.card_sha256, "seed": self.dataset.seed,
                        "sub_dataset": self.dataset.sub_dataset, "val_sha256": self.dataset.val_sha256},
            **{name: getattr(self, name) for name in CARD_FIELDS},
            "dct_scale": self.dct_scale,
            "sample_shape": list(self.sample_shape),
            "model": {"name": model.name, "stem": model.stem, "head": model.head, "ebv_dim": model.ebv_dim,
                      "ebv_tau": model.ebv_tau, "ebv_seed": model.ebv_seed, "ebv_threshold": model.ebv_threshold,
                      "input": {"scale": model.input.scale, "mean": list(model.input.mean),
                                "std": list(model.input.std)}},
        }
        if self.mindspore is not None:
            document["mindspore"] = dict(self.mindspore)
        return document

    def data_difference(self, card: DatasetCard, data: str = "the data") -> str | None:
        """How ``card``'s data (called ``data``) differs from the data this member trained on; None if the same.

        Card fields first (they name the cause), then the identity of sub-dataset k's shards.
        """
        for name in CARD_FIELDS:
            trained, wanted = getattr(self, name), getattr(card, name)
            if trained != wanted:
                return f"was trained with {name}={trained!r} but {data} has {name}={wanted!r}"
        if self.shard >= card.split:
            return f"is member {self.shard}, but {data} has {card.split} sub-datasets"
        # The val shards decide: the same val images as the member was validated on are none it trained on.
        # Another --seed, another preparation, another corpus all change them; a copy elsewhere does not.
        mine, here = self.dataset, DataIdentity.of(card, self.shard)
        if mine.val_sha256 == here.val_sha256:
            return None
        cause = (f"prepared with --seed {mine.seed} then, --seed {here.seed} now" if mine.seed != here.seed
                 else "prepared again, from other sources or with other options")
        return (f"was trained on other data than {data}: the val shards of {mine.sub_dataset} differ from those "
                f"it was validated on (card {mine.card_sha256[:12]} then, {here.card_sha256[:12]} now; {cause})")
