"""`cli.py train` end to end on the prepared embedded sample: accuracy, run layout, EBV, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fails_with_one_line, run_cli
from safetensors.torch import load_file
from subspectral.train.checkpoint import load_trained_model, save_torch
from subspectral.train.data import make_loader
from subspectral.train.prepared import read_card, shard_uris
from subspectral.train.run import same_file_as
from subspectral.train.stream import EvalStream

QUICK = ("--no-progress", "schedule.epochs=1", "data.batch_size=100")  # one 5-step epoch


@pytest.fixture(scope="module")
def sample_run(prepared_sample, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    run_cli("train", "--data", str(prepared_sample), "--shard", "5", "--config", "sample", "--out", str(runs),
            "--no-progress")
    return runs / "sub-05"


def test_sample_recipe_learns_well_above_chance(sample_run):
    final = json.loads((sample_run / "final.json").read_text())
    assert final["val_samples"] == 100
    assert final["top1"] >= 60  # 10 classes: chance is 10 %


def test_run_folder_follows_the_layout(sample_run, prepared_sample):
    for name in ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt", "final.pt", "final.json"):
        assert (sample_run / name).is_file(), name
    assert list((sample_run / "tb").glob("events.out.tfevents.*"))
    card = read_card(str(prepared_sample))
    run = json.loads((sample_run / "run.json").read_text())
    assert run["backend"] == "torch" and run["shard"] == 5 and run["recipe"] == "sample"
    assert (run["class_table_sha256"], run["num_classes"], run["split"]) == (
        card.class_table_sha256, 10, 36)
    assert run["model"]["name"] == "resnet18" and run["model"]["input"]["scale"] == pytest.approx(1 / 255)
    lines = [json.loads(line) for line in (sample_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    assert {"train_loss", "lr", "top1", "top5", "images_per_s", "seconds"} <= set(lines[-1])
    last = torch.load(sample_run / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "epoch", "rng", "meta"} <= set(last)
    assert last["meta"] == run
    best = torch.load(sample_run / "best.pt", weights_only=True)
    validated = [line for line in lines if "top1" in line]
    best_line = max(validated, key=lambda line: line["top1"])  # the first of equal maxima, as the trainer keeps
    assert best["epoch"] + 1 == best_line["epoch"] and best["best_top1"] == best_line["top1"]


def test_final_json_records_size_training_time_and_peak_memory(sample_run):
    final = json.loads((sample_run / "final.json").read_text())
    model, _ = load_trained_model(sample_run)
    assert final["parameters"] == sum(p.numel() for p in model.parameters()) == 11_181_642  # resnet18, 10 classes
    assert final["parameter_bytes"] == 4 * final["parameters"]
    lines = [json.loads(line) for line in (sample_run / "metrics.jsonl").read_text().splitlines()]
    assert all(line["epoch_seconds"] >= line["seconds"] > 0 for line in lines)  # training, then validation
    assert final["train_seconds"] == sum(line["epoch_seconds"] for line in lines)
    # The resident set of the training process: torch alone takes well over 100 MB; bounded by the machine.
    assert final["peak_rss_bytes"] == max(line["peak_rss_bytes"] for line in lines)
    assert 100 * 2**20 < final["peak_rss_bytes"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_best_is_a_link_that_keeps_its_content_when_last_moves_on(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_torch({"epoch": 1}, last)
    same_file_as(last, best)
    assert last.stat().st_ino == best.stat().st_ino  # no second copy on disk
    save_torch({"epoch": 2}, last)
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert torch.load(last, weights_only=True) == {"epoch": 2}


def test_final_weights_reproduce_final_json(sample_run, prepared_sample):
    model, meta = load_trained_model(sample_run)
    card = read_card(str(prepared_sample))
    stream = EvalStream(shard_uris(str(prepared_sample), card, meta["shard"], "val"), card, batch_size=64,
                        rank=0, world=1)
    hits = total = 0
    with torch.no_grad():
        for batch in make_loader(stream, 0, False):
            hits += int((model(batch["images"]).argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert 100 * hits / total == pytest.approx(json.loads((sample_run / "final.json").read_text())["top1"])


def test_final_safetensors_is_the_plain_torchvision_network(sample_run):
    """What the trainer wrote loads strictly into torchvision's resnet18 and computes the member's logits."""
    import torchvision

    model, meta = load_trained_model(sample_run)
    net = torchvision.models.resnet18(num_classes=meta["num_classes"])
    net.load_state_dict(load_file(sample_run / "final.safetensors"))  # strict
    images = torch.randint(0, 256, (3, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(model.input_norm(images)), model(images))


def test_ebv_run_saves_the_basis_it_trained_with(prepared_sample, tmp_path):
    run_cli("train", "--data", str(prepared_sample), "--shard", "1", "--out", str(tmp_path), *QUICK,
            "model.head=ebv", "model.ebv_dim=16", "train.ema_decay=0.9")
    run_dir = tmp_path / "sub-01"
    saved = load_file(run_dir / "ebv_basis.safetensors")["basis"]
    assert saved.shape == (10, 16)
    assert torch.equal(torch.load(run_dir / "final.pt", weights_only=True)["model"]["net.fc.basis"], saved)
    assert torch.equal(torch.load(run_dir / "last.pt", weights_only=True)["model"]["net.fc.basis"], saved)
    assert torch.equal(load_file(run_dir / "final.safetensors")["ebv_basis"], saved)  # the basis travels with it
    model, meta = load_trained_model(run_dir)
    assert meta["model"]["head"] == "ebv" and meta["model"]["ebv_dim"] == 16
    assert json.loads((run_dir / "final.json").read_text())["ema"] is True


def test_list_recipes():
    out = run_cli("train", "--list-recipes").stdout
    for name in ("imagenet1k", "imagenet21k-sub36", "imagenet21k-sub36-cosine", "resnet50-ebv", "resnext50", "sample"):
        assert name in out


@pytest.fixture(scope="module")
def short_run(prepared_sample, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("short")
    run_cli("train", "--data", str(prepared_sample), "--shard", "2", "--out", str(runs), *QUICK,
            "schedule.epochs=2", "train.val_every=5")
    (runs / "sub-02" / "final.json").unlink()  # as if killed before the end: resumable
    return runs


def _fails_with(message: str, *args: str) -> None:
    fails_with_one_line("train", message, *args)


def test_bad_input_fails_with_one_clear_line(prepared_sample, short_run, tmp_path):
    data = str(prepared_sample)
    _fails_with("not a complete prepared dataset", "--data", str(tmp_path), "--shard", "0")
    _fails_with("shard 36 is out of range", "--data", data, "--shard", "36", "--out", str(tmp_path))
    _fails_with("unknown recipe key 'optimizer.lrr'", "--data", data, "optimizer.lrr=0.1")
    _fails_with("unknown recipe 'nope'", "--data", data, "--config", "nope")
    runs = str(short_run)
    _fails_with("already holds a run; pass --resume", "--data", data, "--shard", "2", "--out", runs, *QUICK)
    _fails_with("model is", "--data", data, "--shard", "2", "--out", runs, "--resume", *QUICK,
                "model.name=resnet34")
    moved = tmp_path / "moved"
    shutil.copytree(short_run / "sub-02", moved / "sub-03")
    _fails_with("shard is 2 there, 3 here", "--data", data, "--shard", "3", "--out", str(moved), "--resume", *QUICK)
    other_table = tmp_path / "other-table"
    other_table.mkdir()
    card = json.loads((prepared_sample / "dataset.json").read_text())
    (other_table / "dataset.json").write_text(json.dumps({**card, "class_table_sha256": "0" * 64}))
    (other_table / "sub-02").symlink_to(prepared_sample / "sub-02")
    _fails_with("class_table_sha256 is", "--data", str(other_table), "--shard", "2", "--out", runs, "--resume",
                *QUICK)
    _fails_with("sub-dataset 3 is missing", "--data", str(other_table), "--shard", "3", "--out", runs)
    broken = tmp_path / "broken"
    (broken / "sub-02").mkdir(parents=True)
    (broken / "sub-02" / "last.pt").write_bytes(b"not a checkpoint")
    _fails_with("last.pt is not a checkpoint written by cli.py train", "--data", data, "--shard", "2", "--out",
                str(broken), "--resume")
