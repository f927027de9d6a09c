"""The data contract between the stages, typed and versioned; every stage imports it (docs/format.md).

``card`` (dataset.json as ``DatasetCard``: sample shape and dtype, sub-datasets, shard names and
digests; shards.parquet) · ``run_record`` (a member's run.json as ``RunRecord``: model, input
constants, data identity) · ``reasons`` (``RejectReason``) · ``tables`` (Arrow schemas of the other
tables) · ``documents`` (JSON Schema validation, digests, ``SCHEMA_VERSION``). Bump ``SCHEMA_VERSION``
when a field changes meaning; a document of another version is refused with one line.
"""

from .card import SHARDS_SCHEMA, DatasetCard, shard_file, shard_name, shards_table, sub_dataset_names
from .documents import SCHEMA_VERSION, ContractError, class_table_sha256, json_schema, listing_sha256
from .reasons import RejectReason
from .run_record import DataIdentity, InputConstants, ModelSpec, RunRecord
from .tables import (
    CLASSES_SCHEMA,
    INPUTS_SCHEMA,
    MANIFEST_SCHEMA,
    PLAN_SCHEMA,
    REJECTS_SCHEMA,
    STATUS_SCHEMA,
)

__all__ = [
    "CLASSES_SCHEMA",
    "INPUTS_SCHEMA",
    "MANIFEST_SCHEMA",
    "PLAN_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "SHARDS_SCHEMA",
    "STATUS_SCHEMA",
    "ContractError",
    "DataIdentity",
    "DatasetCard",
    "InputConstants",
    "ModelSpec",
    "RejectReason",
    "RunRecord",
    "class_table_sha256",
    "json_schema",
    "listing_sha256",
    "shard_file",
    "shard_name",
    "shards_table",
    "sub_dataset_names",
]
