"""The contract's JSON documents (dataset.json, run.json): their JSON Schemas, validation, canonical digests.

Pure: a parsed document in, a verdict or a digest out; reading and writing files is the stages' job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 2  # of the whole contract: card, tables, run record; bump when a field changes meaning


class ContractError(ValueError):
    """A document that is not what the contract says; the message is one line for the user."""


@cache
def json_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in this package, e.g. ``dataset_card.schema.json``."""
    return json.loads(resources.files(__package__).joinpath(name).read_text())


@cache
def _validator(name: str) -> Any:
    import jsonschema

    schema = json_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def check_document(document: Any, schema_name: str, kind: str, where: str) -> None:
    """Refuse ``document`` unless it is a ``kind`` of this contract's version that ``schema_name`` accepts.

    ``kind`` is the document's ``schema`` value; ``where`` names the file in the message.
    """
    import jsonschema

    if not isinstance(document, Mapping) or document.get("schema") != kind:
        raise ContractError(f"{where} is not a {kind} document (its \"schema\" field is not {kind!r})")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ContractError(f"{where} has schema version {version!r}; this subspectral reads version "
                            f"{SCHEMA_VERSION} only: write it again with this version")
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(document))
    if error is not None:
        at = "/".join(str(part) for part in error.absolute_path) or "the top level"
        raise ContractError(f"{where} is not a valid {kind} document: {error.message} (at {at})")


def canonical_sha256(document: Mapping[str, Any]) -> str:
    """SHA-256 of the document as compact JSON with sorted keys: the same content gives the same digest."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def class_table_sha256(classes: Iterable[str]) -> str:
    """SHA-256 of the class names joined by ``\\n`` in index order."""
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()


def listing_sha256(names: Iterable[str], digests: Iterable[str]) -> str:
    """SHA-256 of ``sha256sum``'s output for these files, in this order: ``"<digest>  <name>\\n"`` per file."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in zip(names, digests, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()
