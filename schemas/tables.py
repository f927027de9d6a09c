"""Arrow schemas of every table `cli.py prepare` writes or passes between its steps.

``reason`` columns hold ``RejectReason`` values (``schemas.reasons``); shards.parquet's schema lives
with the card it backs (``schemas.card.SHARDS_SCHEMA``).
"""

from __future__ import annotations

import pyarrow as pa

# Listing → planning (in memory; also kept in OUT/_work for resume). Compact, because the driver holds one
# row per input (13 M for ImageNet-21K): folders, tars, classes and splits are dictionary-encoded, and a
# file's URI is its folder's plus its name (pipeline.listing.source_uris rebuilds it where needed).
INPUTS_SCHEMA = pa.schema(
    [
        ("parent", pa.dictionary(pa.int32(), pa.string())),  # URI of the file's folder, or of the tar holding it
        ("entry", pa.string()),  # the file's name in that folder, or the member's name in the tar
        ("offset", pa.int64()),  # byte offset of a tar member's data; -1 for a file
        ("size", pa.int64()),  # bytes; -1 when unknown (list files)
        ("class", pa.dictionary(pa.int32(), pa.string())),
        ("split", pa.dictionary(pa.int32(), pa.string())),  # null unless the source fixes it
    ]
)

# Planning → shard tasks: every input's key, split, shard and position, decided before fan-out.
PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("class", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("position", pa.int32()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)

# Shard task → finalisation: what happened to each planned input.
STATUS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),  # "written" | "rejected"
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("class", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int32()),
        ("position", pa.int32()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])

CLASSES_SCHEMA = pa.schema(
    [("index", pa.int32()), ("name", pa.string()), ("train", pa.int64()), ("val", pa.int64())]
)

