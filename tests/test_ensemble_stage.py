"""The whole ensemble-eval stage on a fixture whose members' logits are hand-picked.

Members of the test backend "pixels" output the first C values of their input image as logits, so
the fixture's sub-images *are* the members' logits and every fused result can be computed by hand.
Everything else (lockstep reading, fusion, report, Parquet) is the real stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ensemble_fixtures import make_dataset, make_run, make_torch_run, write_shard
from subspectral.train.ensemble import cli as ensemble_cli
from subspectral.train.ensemble.members import FinishedRun, register_loader

C = 4
# Logits by rank (rank 0 = best own val accuracy), per sample; comments give the point of each.
RANKED_LOGITS = [
    [[0, 9, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0]],  # mean-logits 1, mean-probs 0 (saturation), vote 0
    [[3, 0, 0, 0], [0, 2, 0, 0], [0, 2, 0, 0]],  # geo 0: rank 0 outweighs ranks 1+2; the others 1
    [[0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 2]],  # vote tie 1-1-1: highest mean prob (class 2) wins
    [[0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 0]],  # vote tie, equal mean probs: lower index (1)
    [[0, 0, 0, 9], [1, 0, 0, 0], [1, 0, 0, 0]],  # vote 0 (two votes) against 3 everywhere else
    [[1, 2, 3, 4], [4, 3, 2, 1], [0, 0, 5, 0]],
    [[5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # uniform members vote for class 0 (first max)
]
LABELS = [0, 1, 2, 1, 3, 2, 0]
HAND_TOP1 = {
    "mean-logits": [1, 1, 2, 1, 3, 2, 0],
    "mean-probs": [0, 1, 2, 1, 3, 2, 0],
    "geo": [1, 0, 2, 1, 3, 2, 0],
    "vote": [0, 1, 2, 1, 0, 2, 0],
}
# Shard of the member at each rank, with its own val accuracy (final.json top1); sub-03 is missing.
RANK_SHARDS = [1, 2, 0]
OWN_TOP1 = {1: 80.0, 2: 60.0, 0: 50.0}  # percent, as the trainer writes final.json


class PixelMember:
    def __init__(self, run: FinishedRun) -> None:
        self.shard, self.meta = run.shard, run.record.to_json()

    def predict(self, images: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(images).reshape(len(images), -1)[:, :C].float()


register_loader("pixels")(lambda run, device: PixelMember(run))


@pytest.fixture()
def stage(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = np.zeros((4, len(LABELS), 2, 2, 3), dtype=np.uint8)
    for i, ranked in enumerate(RANKED_LOGITS):
        for rank, shard in enumerate(RANK_SHARDS):
            images[shard, i].reshape(-1)[:C] = ranked[rank]
    data, runs = tmp_path / "data", tmp_path / "runs"
    card = make_dataset(data, images, LABELS, num_classes=C, shard_size=3)
    for shard, top1 in OWN_TOP1.items():
        make_run(runs, card, shard, top1, backend="pixels", data=str(data))
    return data, runs, card


def run_stage(data: Path, runs: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    options = ["--data", str(data), "--runs", str(runs), "--device", "cpu", "--batch-size", "4"]
    args = parser.parse_args([*options, *extra])
    return ensemble_cli.run(args)


def reference_ranking(method: str, sample: list[list[int]]) -> list[int]:
    """Classes best first, computed independently: exact fractions for logits, math.exp for probs."""
    geo = [Fraction(3, 10) * Fraction(7, 10) ** i for i in range(len(sample))]
    probs = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in sample]
    if method == "mean-logits":
        scores = [sum(Fraction(row[c]) for row in sample) for c in range(C)]
    elif method == "geo":
        scores = [sum(w * row[c] for w, row in zip(geo, sample, strict=True)) for c in range(C)]
    elif method == "mean-probs":
        scores = [sum(p[c] for p in probs) for c in range(C)]
    else:
        votes = [sum(row.index(max(row)) == c for row in sample) for c in range(C)]
        scores = [(votes[c], sum(p[c] for p in probs)) for c in range(C)]
    return sorted(range(C), key=lambda c: (scores[c], -c), reverse=True)


def test_stage_output_equals_hand_computed_fusion(stage, capsys) -> None:
    data, runs, _ = stage
    assert run_stage(data, runs) == 0
    assert "missing members, not evaluated: sub-03" in capsys.readouterr().err
    table = pq.read_table(runs / "ensemble" / "predictions.parquet").to_pylist()
    assert [row["key"] for row in table] == [f"img_{i:04d}" for i in range(len(LABELS))]
    assert [row["label"] for row in table] == LABELS
    assert [row["shard"] for row in table] == [0, 0, 0, 1, 1, 1, 2]  # shard size 3; batches of 4 cross shards
    for method, top1 in HAND_TOP1.items():
        column = method.replace("-", "_") + "_topk"
        assert [row[column][0] for row in table] == top1, method
        assert [row[column] for row in table] == [reference_ranking(method, s) for s in RANKED_LOGITS], method
    for rank, shard in enumerate(RANK_SHARDS):
        assert [row[f"sub_{shard:02d}_top1"] for row in table] == [
            s[rank].index(max(s[rank])) for s in RANKED_LOGITS
        ]

    report = json.loads((runs / "ensemble" / "report.json").read_text())
    assert [m["shard"] for m in report["members"]] == RANK_SHARDS
    assert report["missing"] == ["sub-03"]
    for method, top1 in HAND_TOP1.items():
        expected = sum(p == y for p, y in zip(top1, LABELS, strict=True)) / len(LABELS)
        assert report["methods"][method]["top1"] == pytest.approx(expected), method
    assert report["methods"]["mean-probs"]["top1"] == 1.0
    assert report["methods"]["geo"]["top1"] == pytest.approx(5 / 7)


def test_report_files_agree_with_predictions(stage) -> None:
    data, runs, _ = stage
    assert run_stage(data, runs, "--out", str(runs / "r")) == 0
    out = runs / "r"
    assert {p.name for p in out.iterdir()} == {
        "report.json", "report.md", "accuracy_vs_members.png", "predictions.parquet"
    }
    assert (out / "accuracy_vs_members.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert report["samples"] == len(rows)
    for method, accuracy in report["methods"].items():
        column = method.replace("-", "_") + "_topk"
        assert accuracy["top1"] == pytest.approx(np.mean([r[column][0] == r["label"] for r in rows]))
        assert accuracy["top5"] == pytest.approx(np.mean([r["label"] in r[column] for r in rows]))
    for member in report["members"]:
        column = f"sub_{member['shard']:02d}_top1"
        assert member["top1"] == pytest.approx(np.mean([r[column] == r["label"] for r in rows]))
    # Accuracy against members, best first: one member is the best member alone.
    for curve in report["accuracy_vs_members"].values():
        assert [p["members"] for p in curve] == [1, 2, 3]
        assert curve[0]["top1"] == report["members"][0]["top1"]
        assert curve[-1]["shards"] == RANK_SHARDS
    markdown = (out / "report.md").read_text()
    assert f"{100 * report['methods']['geo']['top1']:.2f}" in markdown
    assert "sub-03" in markdown


def test_require_all_fails_and_names_the_missing(stage, capsys) -> None:
    data, runs, _ = stage
    assert run_stage(data, runs, "--require-all") == 2
    assert "--require-all" in capsys.readouterr().err
    assert run_stage(data, runs, "--require-all", "--members", "0,1") == 0


def test_a_subset_of_members_is_ranked_and_weighted_among_itself(stage) -> None:
    data, runs, _ = stage
    assert run_stage(data, runs, "--members", "2,0", "--method", "geo", "--out", str(runs / "sub")) == 0
    report = json.loads((runs / "sub" / "report.json").read_text())
    assert [m["shard"] for m in report["members"]] == [2, 0]
    assert list(report["methods"]) == ["geo"]
    rows = pq.read_table(runs / "sub" / "predictions.parquet").to_pylist()
    assert [r["geo_topk"] for r in rows] == [reference_ranking("geo", s[1:]) for s in RANKED_LOGITS]


def test_member_from_another_class_table_is_refused(stage, capsys) -> None:
    data, runs, card = stage
    make_run(runs, card, 1, 80.0, backend="pixels", data=str(data), class_table_sha256="0" * 64)
    assert run_stage(data, runs) == 2
    err = capsys.readouterr().err
    assert "sub-01" in err and "class_table_sha256" in err and "Traceback" not in err


def test_misaligned_shards_stop_the_stage(stage, capsys) -> None:
    data, runs, _ = stage
    images = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    write_shard(data / "sub-02" / "val-000001.tar", ["img_0004", "img_0003", "img_0005"], [3, 1, 2], images)
    assert run_stage(data, runs) == 2
    assert "misaligned sub-datasets" in capsys.readouterr().err
    assert not list((runs / "ensemble").glob("predictions*"))


@pytest.mark.parametrize("prefetch", ["0", "2"])
def test_a_shard_cut_short_after_a_written_batch_is_one_line_and_leaves_no_predictions(stage, capsys, prefetch) -> None:
    data, runs, _ = stage
    shard = data / "sub-02" / "val-000002.tar"  # the last sample, img_0006: the first batch of 4 is written before
    shard.write_bytes(shard.read_bytes()[:1600])  # cut inside img_0006.npy
    assert run_stage(data, runs, "--prefetch", prefetch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"ensemble-eval: error: sub-02: corrupt shard {shard}: "
                                            "tar member 'img_0006.npy' is truncated")
    assert not list((runs / "ensemble").glob("predictions*"))


def test_a_negative_prefetch_is_refused(stage, capsys) -> None:
    data, runs, _ = stage
    assert run_stage(data, runs, "--prefetch", "-1") == 2
    assert capsys.readouterr().err.strip() == "ensemble-eval: error: --prefetch must be 0 or more"


def test_empty_val_split_is_one_clear_error(stage, capsys) -> None:
    data, runs, card = stage
    card["splits"]["val"] = {**card["splits"]["val"], "shards": 0, "samples": 0}
    (data / "dataset.json").write_text(json.dumps(card))
    assert run_stage(data, runs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no val split" in err[0] and "--val-per-class N" in err[0]


def test_corrupt_checkpoint_is_one_clear_error(stage, capsys) -> None:
    data, runs, card = stage
    path = make_run(runs, card, 1, 80.0, backend="torch", data=str(data))
    (path / "final.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert run_stage(data, runs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ensemble-eval: error:") and "corrupt or unusable checkpoint" in err[-1]


def test_help_lists_every_option() -> None:
    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    text = parser.format_help()
    for option in ("--data", "--runs", "--members", "--method", "--p", "--baseline", "--ten-crop", "--out",
                   "--require-all", "--device", "--batch-size", "--prefetch"):
        assert option in text
    assert "87.5%" in text


BASELINE_HOT = [(y + i % 2) % C for i, y in enumerate(LABELS)]  # right on even samples, wrong on odd ones


@pytest.fixture()
def baseline_run(stage, tmp_path: Path) -> Path:
    """A split-1 dataset of the same keys and classes whose only member's logits are its pixels.

    Both pixels of a row are equal, so horizontal flips (10-crop) leave the logits unchanged; logits
    are then [v0, v1, v2, v0] of pixel (0, 0), and "class 3" reads as a tie of 0 and 3, i.e. 0."""
    data, runs, card = stage
    images = np.zeros((1, len(LABELS), 2, 2, 3), dtype=np.uint8)
    for i, hot in enumerate(BASELINE_HOT):
        images[0, i, 0, :, hot % 3] = 7
    split1 = tmp_path / "split1"
    baseline_card = make_dataset(split1, images, LABELS, num_classes=C, shard_size=4)
    return make_run(tmp_path / "runs1", baseline_card, 0, 57.0, backend="pixels", data=str(split1))


@pytest.mark.parametrize("ten_crop", [False, True])
def test_baseline_is_evaluated_on_its_own_dataset_with_the_same_keys(stage, baseline_run, ten_crop) -> None:
    data, runs, _ = stage
    extra = ["--baseline", str(baseline_run)] + (["--ten-crop"] if ten_crop else [])
    assert run_stage(data, runs, *extra) == 0
    rows = pq.read_table(runs / "ensemble" / "predictions.parquet").to_pylist()
    expected = [hot if hot < 3 else 0 for hot in BASELINE_HOT]
    assert [r["baseline_topk"][0] for r in rows] == expected
    report = json.loads((runs / "ensemble" / "report.json").read_text())
    hits = sum(e == y for e, y in zip(expected, LABELS, strict=True))
    assert report["baseline"]["top1"] == pytest.approx(hits / len(LABELS))
    assert report["baseline"]["ten_crop"] is ten_crop
    assert "baseline split 1" in (runs / "ensemble" / "report.md").read_text()


def test_baseline_with_other_keys_is_misaligned(stage, baseline_run, capsys) -> None:
    data, runs, _ = stage
    split1 = Path(json.loads((baseline_run / "run.json").read_text())["data"])
    images = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    write_shard(split1 / "sub-00" / "val-000001.tar", ["img_0004", "img_0005", "other"], [3, 2, 0], images)
    assert run_stage(data, runs, "--baseline", str(baseline_run)) == 2
    assert "misaligned" in capsys.readouterr().err


def test_baseline_must_come_from_a_split_1_dataset(stage, capsys) -> None:
    data, runs, card = stage
    baseline = make_run(runs.parent / "other", card, 0, 50.0, backend="pixels", data=str(data))
    assert run_stage(data, runs, "--baseline", str(baseline)) == 2
    assert "with split 4, not 1" in capsys.readouterr().err


# final.json cost fields per shard, as the trainer writes them (sub-03 is missing from the stage).
COSTS = {shard: {"parameters": 1000 + shard, "parameter_bytes": 4 * (1000 + shard), "train_seconds": 60.0 * (shard + 1),
                 "peak_rss_bytes": 2**20 * (100 + 10 * shard)} for shard in OWN_TOP1}


def _add_costs(run_dir: Path, cost: dict) -> None:
    final = json.loads((run_dir / "final.json").read_text())
    (run_dir / "final.json").write_text(json.dumps({**final, **cost}))


def test_report_carries_accuracy_size_and_training_time_side_by_side(stage, baseline_run) -> None:
    data, runs, _ = stage
    for shard, cost in COSTS.items():
        _add_costs(runs / f"sub-{shard:02d}", cost)
    _add_costs(baseline_run, {"parameters": 4000, "parameter_bytes": 16000, "train_seconds": 7200.0,
                              "peak_rss_bytes": 300 * 2**20})
    assert run_stage(data, runs, "--baseline", str(baseline_run), "--ten-crop") == 0
    report = json.loads((runs / "ensemble" / "report.json").read_text())
    for row in report["members"]:
        cost = COSTS[row["shard"]]
        assert (row["parameters"], row["train_seconds"], row["peak_rss_bytes"]) == (
            cost["parameters"], cost["train_seconds"], cost["peak_rss_bytes"])
        assert row["size_mb"] == cost["parameter_bytes"] / 2**20
    ensemble, mean = report["cost"]["ensemble"], report["cost"]["mean_member"]
    assert ensemble["parameters"] == sum(c["parameters"] for c in COSTS.values())
    assert ensemble["train_seconds"] == 60 + 120 + 180  # serial: one machine trains them in turn
    assert ensemble["train_seconds_max"] == 180  # parallel: one machine per member
    assert ensemble["peak_rss_bytes"] == 2**20 * 120  # the largest member
    assert mean["train_seconds"] == pytest.approx(120) and mean["parameters"] == pytest.approx(1001)
    assert report["cost"]["baseline"] == {"parameters": 4000, "size_mb": 16000 / 2**20, "train_seconds": 7200.0,
                                          "peak_rss_bytes": 300 * 2**20}
    # 10-crop and the single crop both, each recomputable from predictions.parquet.
    rows = pq.read_table(runs / "ensemble" / "predictions.parquet").to_pylist()
    for column, accuracy in (("baseline_topk", report["baseline"]), ("baseline_one_crop_topk",
                                                                      report["baseline"]["one_crop"])):
        assert accuracy["top1"] == pytest.approx(sum(r[column][0] == r["label"] for r in rows) / len(rows))
    markdown = (runs / "ensemble" / "report.md").read_text()
    assert "| baseline split 1 | 57.00 |" in markdown and "| baseline split 1 (10-crop) |" in markdown
    assert "| baseline split 1 (10-crop) | 42.86 | 4,000 | 0.02 | 2.00 h | 300 MiB |" in markdown
    assert "| member sub-02 | " in markdown and "| 1,002 | 0.00 | 3.0 min | 120 MiB |" in markdown
    assert "| **ensemble: geo (p = 0.3)**, 3 members | **71.43** | 1,001 × 3 | 0.00 × 3 " \
           "| 6.0 min serial, 3.0 min parallel | 120 MiB |" in markdown


def test_runs_without_cost_fields_report_none(stage) -> None:
    data, runs, _ = stage  # final.json as written before the trainer recorded costs: top1 and top5 only
    assert run_stage(data, runs) == 0
    report = json.loads((runs / "ensemble" / "report.json").read_text())
    assert report["cost"]["ensemble"] == {"parameters": None, "size_mb": None, "train_seconds": None,
                                          "peak_rss_bytes": None, "train_seconds_max": None}
    assert report["cost"]["baseline"] is None
    assert "| mean member | 52.38 | — | — | — | — |" in (runs / "ensemble" / "report.md").read_text()


class _Evil:
    """Unpickling this runs a command: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("role", ["member", "baseline"])
def test_a_malicious_checkpoint_is_refused_without_suggesting_the_unsafe_load(stage, baseline_run, tmp_path,
                                                                            capsys, role) -> None:
    data, runs, card = stage
    marker = tmp_path / "evil-pickle-ran"
    if role == "member":
        path = make_torch_run(runs, card, 1, 80.0, data=str(data))
        extra: list[str] = []
    else:
        split1 = json.loads((baseline_run / "run.json").read_text())["data"]
        path = make_torch_run(tmp_path / "runs-torch1", json.loads((Path(split1) / "dataset.json").read_text()), 0,
                              57.0, data=split1)
        extra = ["--baseline", str(path)]
    torch.save({"model": _Evil(marker), "meta": {}}, path / "final.pt")
    assert run_stage(data, runs, "--members", "0,1,2", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ensemble-eval: error: ")
    assert "final.pt is not a checkpoint written by cli.py train" in err[0] and "weights_only" not in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("label", [C + 38, -1])
def test_a_val_label_outside_the_classes_is_one_clear_error(stage, capsys, label) -> None:
    data, runs, card = stage
    images = np.zeros((4, len(LABELS), 2, 2, 3), dtype=np.uint8)
    card = make_dataset(data, images, [*LABELS[:5], label, LABELS[6]], num_classes=C, shard_size=3)  # sample 5
    for shard, top1 in OWN_TOP1.items():  # members of this dataset: the label, not the data identity, is wrong
        make_run(runs, card, shard, top1, backend="pixels", data=str(data))
    assert run_stage(data, runs, "--members", "0,1,2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ensemble-eval: error: val sample 'img_0005' has label {label}, outside the {C} classes of the "
                   f"dataset card (0..{C - 1})"]
    assert not list((runs / "ensemble").glob("predictions*"))
