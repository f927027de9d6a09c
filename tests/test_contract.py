"""The typed contract (subspectral.schemas): cards and run records validated and versioned, one set of reject
reasons, the documentation equal to the schemas, and no stage reading around the contract."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from subspectral.schemas import (
    CLASSES_SCHEMA,
    MANIFEST_SCHEMA,
    REJECTS_SCHEMA,
    SHARDS_SCHEMA,
    ContractError,
    DatasetCard,
    RejectReason,
    RunRecord,
    json_schema,
)
from subspectral.train.prepared import read_card
from subspectral.train.storage import DataError


def _section(path: Path, title: str) -> str:
    """The text of the markdown section ``## title`` (up to the next ``## ``)."""
    text = path.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _table_column(section: str) -> list[str]:
    """The backticked names in the first column of the markdown table in ``section``."""
    return re.findall(r"^\| `([a-z_0-9]+)` \|", section, flags=re.MULTILINE)


def _card_document(prepared_sample: Path) -> dict:
    return json.loads((prepared_sample / "dataset.json").read_text())


def test_the_card_round_trips_and_states_what_readers_use(prepared_sample):
    document = _card_document(prepared_sample)
    card = DatasetCard.from_json(document)
    assert card.to_json() == document
    assert (card.sample_shape, card.sample_dtype, card.sub_datasets[7]) == ((56, 56, 3), "uint8", "sub-07")
    assert card.shard_paths("train", 7) == [f"sub-07/train-{j:06d}.tar" for j in range(4)]
    assert DatasetCard.from_json(json.loads(json.dumps(document))).sha256 == card.sha256


def test_a_card_of_another_version_is_refused_in_one_line(prepared_sample, tmp_path):
    old = {**_card_document(prepared_sample), "schema_version": 1}
    for name in ("sample_shape", "sample_dtype"):
        del old[name]
    data = tmp_path / "old"
    shutil.copytree(prepared_sample, data, ignore=shutil.ignore_patterns("sub-[1-3]*", "sub-0[1-9]"))
    (data / "dataset.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match="has schema version 1; this subspectral reads version 2 only"):
        read_card(str(data))
    result = run_cli("train", "--data", str(data), "--shard", "0", "--out", str(tmp_path / "runs"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "schema version 1" in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda card: card.pop("sample_dtype"), "'sample_dtype' is a required property"),
    (lambda card: card.update(sample_dtype="float64"), "'float64' is not one of"),
    (lambda card: card["splits"]["val"]["sha256"].pop(), "splits.val.sha256 has 35 digests for 36 sub-datasets"),
    (lambda card: card.update(size=28), "sample_shape [56, 56, 3] is not [size, size, 3]"),
    (lambda card: card.update(extra=1), "Additional properties are not allowed ('extra' was unexpected)"),
])
def test_an_invalid_card_is_refused_naming_the_problem(prepared_sample, change, message):
    document = _card_document(prepared_sample)
    change(document)
    with pytest.raises(ContractError) as error:
        DatasetCard.from_json(document, "OUT/dataset.json")
    assert message in str(error.value) and str(error.value).startswith("OUT/dataset.json")
    assert "\n" not in str(error.value)


def test_a_run_record_without_the_contract_is_refused(prepared_sample):
    with pytest.raises(ContractError, match="is not a subspectral-run document"):
        RunRecord.from_json({"backend": "torch", "shard": 0, "data": "d"})


def test_reject_reasons_are_one_enum_in_the_code_the_card_schema_and_the_docs():
    values = [reason.value for reason in RejectReason]
    assert json_schema("dataset_card.schema.json")["$defs"]["reject_reason"]["enum"] == values
    rejects = _section(REPO / "docs" / "format.md", "Tables").split("* `rejects.parquet`")[1].split("\n* ")[0]
    documented = re.findall(r"`([a-z_]+)`", rejects.split("Reasons", 1)[1].split("Inputs listed")[0])
    assert documented == values


def test_pipeline_holds_no_reject_reason_as_a_string_literal():
    values = {reason.value for reason in RejectReason}
    found = []
    for path in sorted((REPO / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text())
        # "truncated" in str(error) searches a library's message: a substring, not a reason
        searched = {id(node.left) for node in ast.walk(tree)
                    if isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in values and id(node) not in searched:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not found, f"use schemas.RejectReason instead of: {found}"


def test_train_reads_nothing_of_pipeline_but_its_uri_layer():
    imports = []
    for path in sorted((REPO / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            imports += [(path.relative_to(REPO).as_posix(), name) for name in names if "pipeline" in name]
    assert set(imports) <= {("train/storage.py", "subspectral.pipeline"),
                            ("train/storage.py", "subspectral.pipeline.storage")}, imports


@pytest.mark.parametrize(("table", "schema"), [
    ("classes.parquet", CLASSES_SCHEMA),
    ("manifest.parquet", MANIFEST_SCHEMA),
    ("rejects.parquet", REJECTS_SCHEMA),
    ("shards.parquet", SHARDS_SCHEMA),
])
def test_format_md_lists_exactly_the_columns_of_each_table(table, schema):
    section = _section(REPO / "docs" / "format.md", "Tables")
    bullet = section.split(f"* `{table}`:", 1)[1].split("\n* ", 1)[0]
    documented = re.findall(r"([a-z_0-9]+): (int32|int64|string|float32|float64|bool)\b", " ".join(bullet.split()))
    assert documented == [(field.name, str(field.type)) for field in schema]


def test_format_md_documents_exactly_the_card_fields():
    section = _section(REPO / "docs" / "format.md", "Dataset card (`dataset.json`)")
    assert _table_column(section) == list(json_schema("dataset_card.schema.json")["properties"])


def test_training_md_documents_exactly_the_run_record_fields():
    section = _section(REPO / "docs" / "training.md", "Run record (`run.json`)")
    assert _table_column(section) == list(json_schema("run_record.schema.json")["properties"])
