"""``train.compile=true``: torch.compile of the training model, run for real through `cli.py train` on the CPU.

The suite compiles with ``train.compile_backend=aot_eager``: Dynamo captures the member's forward and
AOTAutograd traces the joint forward/backward graph, as with the default backend, but no kernels are
generated (~3 s). Inductor, the default, generates and builds C++ kernels: measured here, 41 s for
resnet18's forward and backward on 2 quiet cores and up to 90 s when other jobs share them, too slow
for the suite. ``SUBSPECTRAL_COMPILE_BACKEND=inductor pytest tests/test_train_compile.py`` runs these tests
with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from subspectral.schemas import RunRecord
from subspectral.train.checkpoint import load_trained_model
from subspectral.train.models import model_from_run

BACKEND = os.environ.get("SUBSPECTRAL_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(scope="module")
def compiled_run(prepared_sample, tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("compiled")
    result = run_cli("train", "--data", str(prepared_sample), "--shard", "3", "--config", "sample", "--out", str(runs),
                     "--no-progress", "schedule.epochs=1", "data.batch_size=100", "train.compile=true",
                     f"train.compile_backend={BACKEND}", env={"TORCH_LOGS": "dynamo"})
    return runs / "sub-03", result.stderr


def test_compiled_model_trains_as_one_graph(compiled_run):
    run_dir, log = compiled_run
    # Dynamo traced the member's forward once (no graph break, no recompilation) and handed it to the backend.
    assert log.count("torchdynamo start tracing forward") == 1, log[-3000:]
    assert f"done compiler function {BACKEND}" in log
    final = json.loads((run_dir / "final.json").read_text())
    assert final["val_samples"] == 100 and math.isfinite(final["val_loss"])
    line = json.loads((run_dir / "metrics.jsonl").read_text())
    assert line["steps"] == 5 and math.isfinite(line["train_loss"])


def test_checkpoints_of_a_compiled_run_load_into_a_plain_model(compiled_run):
    run_dir, _ = compiled_run
    for name in ("last.pt", "best.pt", "final.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert not [key for key in checkpoint["model"] if "_orig_mod" in key], name
        record = RunRecord.from_json(checkpoint["meta"])
        model_from_run(record.model, record.num_classes).load_state_dict(checkpoint["model"])  # strict: every key
    final, meta = load_trained_model(run_dir)
    last, _ = load_trained_model(run_dir, "last")
    assert meta["shard"] == 3 and not final.training
    assert final.state_dict().keys() == last.state_dict().keys()
    for key, value in final.state_dict().items():  # no EMA: the final weights are the last epoch's
        assert torch.equal(value, last.state_dict()[key]), key
    with torch.no_grad():
        assert final(torch.zeros(2, 56, 56, 3, dtype=torch.uint8)).shape == (2, 10)
