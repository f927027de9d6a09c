"""`cli.py train --backend mindspore` end to end on the prepared sample: learning, layout, resume, both modes,
a mixed torch + MindSpore ensemble, bad input, and a 2-process data-parallel run on the CPU (msrun)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

from conftest import REPO, run_cli  # noqa: E402
from damaged_data import one_sub_dataset, rewrite_members, undecodable_images  # noqa: E402

# resnet18 with the imagenet stem (1/16 of the lowres FLOPs), 10 steps of 50 per epoch; SGD like the seed.
RECIPE = ("--config", "sample", "--no-progress", "data.batch_size=50", "optimizer.name=sgd", "optimizer.lr=0.05",
          "optimizer.weight_decay=0.0001", "schedule.warmup_epochs=0", "train.label_smoothing=0.0")
MS = ("--backend", "mindspore")
TORCH_METRIC_KEYS = {"epoch", "lr", "train_loss", "train_images", "steps", "seconds", "images_per_s", "skipped",
                     "val_loss", "top1", "top5", "val_samples", "val_skipped", "epoch_seconds", "peak_rss_bytes"}


def _train(data: Path, out: Path, shard: int, *extra: str, options: tuple[str, ...] = (),
           check: bool = True) -> subprocess.CompletedProcess:
    """``extra``: overrides and flags after the recipe's; ``options``: flags before the positional overrides."""
    return run_cli("train", *MS, *options, "--data", str(data), "--shard", str(shard), "--out", str(out), *RECIPE,
                   *extra, check=check)


@pytest.fixture(scope="module")
def graph_run(prepared_sample, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ms-runs")
    _train(prepared_sample, runs, 0, "schedule.epochs=2")
    return runs / "sub-00"


def test_graph_mode_learns_above_chance_in_the_torch_run_layout(graph_run):
    final = json.loads((graph_run / "final.json").read_text())
    assert final["val_samples"] == 100 and final["epochs"] == 2
    assert final["top1"] >= 30  # 10 classes: chance is 10 %
    run = json.loads((graph_run / "run.json").read_text())
    assert run["backend"] == "mindspore" and run["mindspore"]["mode"] == "graph" and run["shard"] == 0
    lines = [json.loads(line) for line in (graph_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert set(lines[-1]) == TORCH_METRIC_KEYS and lines[-1]["steps"] == 10
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # The cost fields of the torch backend, counted the same way.
    from subspectral.train.models import create_model

    torch_twin = create_model(run["model"]["name"], 10, stem=run["model"]["stem"])
    assert final["parameters"] == sum(p.numel() for p in torch_twin.parameters())
    assert final["parameter_bytes"] == 4 * final["parameters"]
    assert final["train_seconds"] == sum(line["epoch_seconds"] for line in lines)
    assert final["peak_rss_bytes"] == max(line["peak_rss_bytes"] for line in lines)
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "final.ckpt", "tb"):
        assert (graph_run / name).exists(), name
    assert not [p for p in graph_run.iterdir() if p.name.startswith(".")]  # no temporary checkpoint left


def test_final_safetensors_of_a_trained_member_loads_into_torchvision(graph_run):
    import torchvision
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = graph_run / "final.safetensors"
    with safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["subspectral.run"]) == json.loads((graph_run / "run.json").read_text())
    net = torchvision.models.resnet18(num_classes=10)  # the sample recipe: resnet18, imagenet stem
    net.load_state_dict(load_file(path))  # strict


def test_pynative_mode_trains(prepared_sample, tmp_path):
    _train(prepared_sample, tmp_path, 2, "schedule.epochs=1", options=("--mode", "pynative"))
    final = json.loads((tmp_path / "sub-02" / "final.json").read_text())
    run = json.loads((tmp_path / "sub-02" / "run.json").read_text())
    assert run["mindspore"]["mode"] == "pynative" and final["val_samples"] == 100
    assert final["top1"] > 10


def test_killed_run_resumes_to_the_uninterrupted_result(prepared_sample, graph_run, tmp_path):
    command = [sys.executable, str(REPO / "cli.py"), "train", *MS, "--data", str(prepared_sample), "--shard", "0",
               "--out", str(tmp_path), *RECIPE, "schedule.epochs=2"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "sub-00"
    deadline = time.monotonic() + 300
    while not (run_dir / "last.ckpt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # after epoch 1's checkpoint, during epoch 2
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "rerun the same command to resume" in stderr
    assert not (run_dir / "final.json").exists()
    again = _train(prepared_sample, tmp_path, 0, "schedule.epochs=2", check=False)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    _train(prepared_sample, tmp_path, 0, "schedule.epochs=2", "--resume")
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (graph_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in resumed] == [1, 2]
    # Same data order, augmentation and optimizer state: epoch 2 replays the uninterrupted run's epoch 2.
    assert resumed[1]["train_loss"] == pytest.approx(straight[1]["train_loss"], rel=1e-3)
    assert resumed[1]["top1"] == pytest.approx(straight[1]["top1"], abs=2.0)


def test_mixed_backend_ensemble(prepared_sample, graph_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(graph_run, runs / "sub-00")
    run_cli("train", "--data", str(prepared_sample), "--shard", "1", "--out", str(runs), *RECIPE,
            "schedule.epochs=1", "data.workers=0")  # the torch trainer is ~2.7x faster so on 2 cores
    run_cli("ensemble-eval", "--data", str(prepared_sample), "--runs", str(runs), "--members", "0,1")
    report = json.loads((runs / "ensemble" / "report.json").read_text())
    assert sorted(m["backend"] for m in report["members"]) == ["mindspore", "torch"]
    assert report["samples"] == 100
    ms_row = next(m for m in report["members"] if m["backend"] == "mindspore")
    own = json.loads((graph_run / "final.json").read_text())["top1"]
    assert 100 * ms_row["top1"] == pytest.approx(own, abs=1.0)  # the loader reproduces the trainer's accuracy


def _fails_with(text: str, *args: str) -> None:
    result = run_cli("train", *MS, *args, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cli.py train: error:")]
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_bad_input_fails_with_one_clear_line_before_training(prepared_sample, tmp_path):
    data = str(prepared_sample)
    _fails_with("unknown recipe key 'optimizer.lrr'", "--data", data, "--out", str(tmp_path), "optimizer.lrr=1")
    _fails_with("shard 36 is out of range", "--data", data, "--shard", "36", "--out", str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in prepared_sample.iterdir():
        if entry.name != "sub-03":
            (broken / entry.name).symlink_to(entry)
    _fails_with("sub-dataset 3 is missing", "--data", str(broken), "--shard", "3", "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_data_parallel_run_with_msrun(prepared_sample, tmp_path):
    msrun = shutil.which("msrun", path=str(Path(sys.executable).parent)) or shutil.which("msrun")
    # msrun is a console script of the mindspore package this module already required: never skip.
    assert msrun is not None, "msrun is missing beside this Python: a broken mindspore install"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [msrun, "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(_free_port()),
               "--log_dir", str(tmp_path / "logs"), "--join", "True", str(REPO / "cli.py"), "train", *MS,
               "--data", str(prepared_sample), "--shard", "4", "--out", str(tmp_path), *RECIPE, "schedule.epochs=1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert result.returncode == 0, logs
    line = json.loads((tmp_path / "sub-04" / "metrics.jsonl").read_text().splitlines()[0])
    # Each of the 2 ranks ran the 10 steps of 25 samples; the all-reduced counts cover the whole epoch.
    assert line["steps"] == 10 and line["train_images"] == 500 and line["val_samples"] == 100


def test_the_shared_checks_refuse_what_the_torch_backend_refuses(prepared_sample, graph_run, tmp_path):
    """Bad values, a resume with another recipe, unsupported keys, data with no usable sample, a NaN loss."""
    data = str(prepared_sample)
    _fails_with("data.batch_size must be >= 1, got -32", "--data", data, "--out", str(tmp_path), "data.batch_size=-32")
    _fails_with("optimizer.lr must be a finite number", "--data", data, "--out", str(tmp_path), "optimizer.lr=nan")
    _fails_with("train.accumulate_steps (gradient accumulation) is not supported by the mindspore backend",
                "--data", data, "--out", str(tmp_path), "train.accumulate_steps=2")
    resumable = tmp_path / "resumable"
    shutil.copytree(graph_run, resumable / "sub-00")
    (resumable / "sub-00" / "final.json").unlink()
    again = _train(prepared_sample, resumable, 0, "schedule.epochs=2", "optimizer.lr=0.1", "--resume", check=False)
    assert again.returncode == 2
    assert "optimizer.lr is 0.05 in the checkpoint, 0.1 now" in again.stderr.strip().splitlines()[-1]

    junk = one_sub_dataset(prepared_sample, tmp_path / "junk")
    rewrite_members(junk / "sub-00" / "train-000000.tar", undecodable_images)
    _fails_with("no usable sample in shard", "--data", str(junk), "--out", str(tmp_path / "r1"), "data.workers=2",
                "schedule.epochs=1")
    small = one_sub_dataset(prepared_sample, tmp_path / "small")
    _fails_with("the training loss is nan at step 4: stopped before any checkpoint", "--data", str(small),
                "--out", str(tmp_path / "r2"), "--no-progress", "schedule.epochs=1", "data.batch_size=32",
                "optimizer.name=sgd", "optimizer.lr=1e30", "schedule.warmup_epochs=0", "schedule.min_lr=0")
