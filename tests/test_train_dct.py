"""A dct dataset with N = 81 stores its bands as int32 (docs/format.md): the card says so and training reads it.

Before the card stated the dtype, readers guessed int16 for every dct dataset, so N = 81 and N = 100
samples never decoded and training spun over "skipped" samples forever.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from corpora import image_folder
from subspectral.train.data import make_loader
from subspectral.train.prepared import read_card, shard_uris
from subspectral.train.stream import EvalStream

SPLIT = 81


@pytest.fixture(scope="module")
def dct81(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dct81")
    image_folder(root / "corpus")
    out = root / "data"
    run_cli("prepare", "--src", str(root / "corpus"), "--out", str(out), "--split", str(SPLIT), "--size", "4",
            "--transform", "dct", "--format", "npy", "--val-per-class", "2", "--shard-size", "16",
            "--executor", "serial")
    return out


def test_the_card_states_int32_bands_and_every_val_sample_decodes(dct81):
    card = read_card(str(dct81))
    assert (card.split, card.sample_shape, card.sample_dtype, card.dct_scale) == (SPLIT, (4, 4, 3), "int32", 16)
    for member in (0, 40, SPLIT - 1):
        stream = EvalStream(shard_uris(str(dct81), card, member, "val"), card, batch_size=4, rank=0, world=1)
        batches = list(make_loader(stream, 0, False))
        assert sum(int(b["skipped"]) for b in batches) == 0
        assert sum(len(b["labels"]) for b in batches) == card.splits["val"].samples == 6
        assert {b["images"].numpy().dtype for b in batches} == {np.dtype(np.int32)}


def test_a_member_of_the_n81_dct_dataset_trains(dct81, tmp_path):
    run_cli("train", "--data", str(dct81), "--shard", "80", "--config", "sample", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu", "schedule.epochs=1", "data.batch_size=4", timeout=300)
    final = json.loads((tmp_path / "sub-80" / "final.json").read_text())
    metrics = json.loads((tmp_path / "sub-80" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["val_samples"] == 6 and metrics["skipped"] == 0 and metrics["steps"] == 3
    record = json.loads((tmp_path / "sub-80" / "run.json").read_text())
    assert record["sample_dtype"] == "int32" and record["model"]["input"]["scale"] == pytest.approx(1 / (255 * 9 * 16))
