"""final.safetensors, whatever the backend: the member's network under torchvision's own names.

Both backends write it next to their own final weights (docs/training.md, "Using a member outside
subspectral"): the tensors of the network without the ``net.`` prefix and without input
normalisation, run.json in the metadata. An EBV head's projection takes the name of the linear layer
it replaced and its basis becomes the tensor ``ebv_basis``, so the rest loads into the torchvision
model built with ``num_classes=d``. Framework-free: names and metadata only.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

PORTABLE_FILE = "final.safetensors"
RUN_KEY = "subspectral.run"  # metadata: run.json as JSON text
BASIS_KEY = "ebv_basis"  # the C x d basis of an EBV member


def portable_name(name: str, ebv_heads: Collection[str]) -> str:
    """The torchvision name of tensor ``name`` of the network (``ebv_heads``: the EBV heads' module paths)."""
    head, _, leaf = name.rpartition(".")
    if head in ebv_heads and leaf == "basis":
        return BASIS_KEY
    if head.endswith(".proj") and head[: -len(".proj")] in ebv_heads:
        return f"{head[: -len('.proj')]}.{leaf}"
    return name


def metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (strings only): the tensor format and run.json."""
    return {"format": "pt", RUN_KEY: json.dumps(meta, sort_keys=True)}
