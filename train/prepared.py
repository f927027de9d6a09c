"""What `train` and `ensemble-eval` read of a prepared dataset: its card, its shards' URIs and digests.

Everything comes from the contract (``subspectral.schemas``): the card is validated by
``DatasetCard.from_json``, shard paths and digests come from the card and shards.parquet, so no
reader here re-types a field, a file name or a default. Each failure is one ``DataError`` line.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from subspectral.schemas import ContractError, DatasetCard
from subspectral.train.storage import DataError, exists, join, read_bytes, read_json


def read_card(data_uri: str) -> DatasetCard:
    """The dataset card; refuses an incomplete dataset, another schema version or an invalid card, in one line."""
    card_uri = join(data_uri, "dataset.json")
    if not exists(card_uri):
        raise DataError(f"{data_uri} is not a complete prepared dataset: {card_uri} is missing "
                        "(run 'cli.py prepare' to the end first)")
    try:
        return DatasetCard.from_json(read_json(card_uri), card_uri)
    except ContractError as exc:
        raise DataError(str(exc)) from exc
    except ValueError as exc:
        raise DataError(f"{card_uri} is not valid JSON: {exc}") from exc


def _check_member(card: DatasetCard, member: int) -> None:
    if not 0 <= member < card.split:
        raise DataError(f"shard {member} is out of range: this dataset has {card.split} sub-datasets "
                        f"(0..{card.split - 1})")


def has_split(card: DatasetCard, split: str) -> bool:
    """Whether the dataset holds samples of ``split`` (a dataset prepared with --val-per-class 0 has no val)."""
    return split in card.splits and card.splits[split].shards > 0


def shard_uris(data_uri: str, card: DatasetCard, member: int, split: str) -> list[str]:
    """URIs of sub-dataset ``member``'s shards of ``split``, in order; the first must exist."""
    _check_member(card, member)
    if not has_split(card, split):
        raise DataError(f"the dataset has no {split!r} samples (prepare it with --val-per-class N for a val split)")
    uris = [join(data_uri, path) for path in card.shard_paths(split, member)]
    if not exists(uris[0]):
        raise DataError(f"sub-dataset {member} is missing: {uris[0]} does not exist")
    return uris


def read_shard_table(data_uri: str) -> pa.Table:
    """shards.parquet: every tar's SHA-256 (read once, then ``shard_digests`` per sub-dataset)."""
    table_uri = join(data_uri, "shards.parquet")
    try:
        return pq.read_table(io.BytesIO(read_bytes(table_uri)))
    except FileNotFoundError as exc:
        raise DataError(f"{table_uri} is missing: the shards of {data_uri} cannot be verified") from exc
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{table_uri} is unreadable: {' '.join(str(exc).split())}") from exc


def shard_digests(data_uri: str, card: DatasetCard, table: pa.Table, member: int, split: str) -> list[str]:
    """SHA-256 of each of sub-dataset ``member``'s shards of ``split``, from ``table`` checked against the card."""
    _check_member(card, member)
    try:
        return card.shard_digests(table, split, member)
    except (ContractError, KeyError) as exc:
        raise DataError(f"{data_uri}: {exc}") from exc
