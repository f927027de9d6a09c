"""WebDataset shards as input (issue 12, item 6): written by webdataset's own TarWriter, or laid out as
img2dataset writes them. Before, each shard was taken for a class tar: the shard's name became the class."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import run_cli
from corpora import jpeg
from subspectral.pipeline.listing import list_unit, plan_units
from subspectral.pipeline.storage import location

LABELS = [2, 0, 1, 2, 1, 0, 10, 2]  # 10 sorts after 2: labels are ordered as numbers


def tarwriter_shards(root: Path) -> dict[str, tuple[int, bytes]]:
    """Two shards written by webdataset.TarWriter: KEY.jpg + KEY.cls; returns key → (label, image bytes)."""
    root.mkdir(parents=True)
    samples = {}
    for shard in range(2):
        with wds.TarWriter(str(root / f"shard-{shard:06d}.tar")) as writer:
            for i in range(4):
                index = 4 * shard + i
                key = f"sample{index:04d}"
                samples[key] = (LABELS[index], jpeg(700 + index, 96, 80))
                writer.write({"__key__": key, "jpg": samples[key][1], "cls": LABELS[index]})
    return samples


def img2dataset_shards(root: Path) -> dict[str, tuple[str, bytes]]:
    """img2dataset's output: NNNNN.tar of KEY.jpg, KEY.json (url, caption, status, ... and a label column kept with
    --save_additional_columns), KEY.txt (caption), beside NNNNN.parquet and NNNNN_stats.json."""
    root.mkdir(parents=True)
    samples = {}
    with tarfile.open(root / "00000.tar", "w") as archive:
        for i, label in enumerate(["cat", "dog", "cat", "bird", "dog"]):
            key = f"{i:09d}"
            image = jpeg(800 + i, 90, 70)
            samples[key] = (label, image)
            meta = {"url": f"https://example.com/{i}.jpg", "caption": f"a {label}", "key": key, "status": "success",
                    "error_message": None, "width": 90, "height": 70, "label": label}
            for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps(meta).encode()),
                               (f"{key}.txt", f"a {label}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    (root / "00000.parquet").write_bytes(b"PAR1")
    (root / "00000_stats.json").write_text("{}")
    return samples


def test_tarwriter_shards_are_detected_and_listed_in_place(tmp_path):
    samples = tarwriter_shards(tmp_path / "shards")
    units, rejects = plan_units([location(tmp_path / "shards").uri], "auto")
    assert [unit.kind for unit in units] == ["shard", "shard"] and rejects.num_rows == 0
    rows = [row for unit in units for row in list_unit(unit).inputs.to_pylist()]
    assert sorted(row["entry"] for row in rows) == sorted(f"{key}.jpg" for key in samples)
    for row in rows:
        label, image = samples[row["entry"].split(".")[0]]
        assert row["class"] == str(label)
        data = Path(row["parent"]).read_bytes()[row["offset"]: row["offset"] + row["size"]]
        assert data == image


def test_prepare_reads_tarwriter_shards_with_their_labels(tmp_path):
    samples = tarwriter_shards(tmp_path / "shards")
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(tmp_path / "shards"), "--out", str(out), "--split", "4", "--size", "24",
                     "--shard-size", "100", "--min-side", "16", "--executor", "serial")
    assert "8 written + 0 rejected = 8 inputs" in result.stdout
    classes = pq.read_table(out / "classes.parquet").column("name").to_pylist()
    assert classes == ["0", "1", "2", "10"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    for row in manifest:
        assert classes[row["label"]] == row["class"] == str(samples[row["key"]][0])
        assert row["member"] == f"{row['key']}.jpg" and row["source"].endswith(".tar")
    written = list(wds.WebDataset(str(out / "sub-00" / "train-000000.tar"), shardshuffle=False))
    assert {s["__key__"]: int(s["cls"]) for s in written} == {r["key"]: r["label"] for r in manifest}


def test_img2dataset_layout_with_a_label_field(tmp_path):
    samples = img2dataset_shards(tmp_path / "laion")
    out = tmp_path / "out"
    common = ("prepare", "--src", str(tmp_path / "laion"), "--out", str(out), "--split", "4", "--size", "24",
              "--shard-size", "100", "--min-side", "16", "--executor", "serial")
    refused = run_cli(*common, check=False)
    assert refused.returncode == 2
    assert "no .cls member" in refused.stderr and "--label-field" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    result = run_cli(*common, "--label-field", "label")
    assert "5 written + 2 rejected = 7 inputs" in result.stdout  # the .parquet and _stats.json beside the tar
    assert pq.read_table(out / "classes.parquet").column("name").to_pylist() == ["bird", "cat", "dog"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {row["key"]: row["class"] for row in manifest} == {key: label for key, (label, _) in samples.items()}
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert sorted(Path(r["source"]).name for r in rejects) == ["00000.parquet", "00000_stats.json"]


@pytest.mark.parametrize("bad", ["missing", "list"])
def test_a_sample_without_a_usable_label_is_rejected(tmp_path, bad):
    root = tmp_path / "shards"
    root.mkdir()
    with wds.TarWriter(str(root / "a.tar")) as writer:
        writer.write({"__key__": "good", "jpg": jpeg(1), "json": {"label": "x"}})
        writer.write({"__key__": "bad", "jpg": jpeg(2), "json": {} if bad == "missing" else {"label": [1, 2]}})
    units, _ = plan_units([location(root).uri], "webdataset", label_field="label")
    listed = list_unit(units[0])
    assert listed.inputs.column("entry").to_pylist() == ["good.jpg"]
    assert [(r["reason"], r["source"].rsplit("#", 1)[1]) for r in listed.rejects.to_pylist()] == [("no_label",
                                                                                                   "bad.jpg")]
