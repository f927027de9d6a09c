"""The installed package and its Python API, used as a library would be: from another folder, in-process.

The script runs in a folder that holds a ``train.py`` and a ``pipeline.py`` of its own (as every
timm/torchvision-style project has), which must never be imported in place of the package's stages;
the API must install no signal handler and print nothing (its messages go to logging).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from corpora import image_folder

SCRIPT = r"""
import json, logging, signal, sys
records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
logging.getLogger("subspectral").addHandler(handler)
logging.getLogger("subspectral").setLevel(logging.INFO)

import subspectral
data = subspectral.prepare(sys.argv[2], src=sys.argv[1], split=4, size=16, val_per_class=2, shard_size=50,
                           executor="serial")
member = subspectral.train_member(data.out, shard=3, out=sys.argv[3], config="sample", epochs=1, device="cpu",
                                  overrides=["model.stem=lowres", "data.batch_size=6", "data.workers=0"])
ensemble = subspectral.ensemble_eval(data.out, sys.argv[3], members=[0, 3], device="cpu", batch_size=4)
try:
    subspectral.ensemble_eval(data.out, sys.argv[3] + "/none", device="cpu")
    refused = None
except ValueError as error:
    refused = str(error)
print(json.dumps({
    "version": subspectral.__version__,
    "stages": [__import__(m, fromlist=["x"]).__file__ for m in ("subspectral.pipeline", "subspectral.train")],
    "foreign": [name for name in ("train", "pipeline", "schemas", "cli") if name in sys.modules],
    "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    "out": data.out, "written": data.card["counts"]["written"], "split": data.card["split"],
    "run_dir": str(member.run_dir), "epochs": member.final["epochs"], "logged": records,
    "ensemble": {"type": type(ensemble).__name__, "report": ensemble.report, "out": str(ensemble.out),
                 "files": [str(p) for p in (ensemble.report_json, ensemble.report_md, ensemble.plot,
                                            ensemble.predictions)],
                 "methods": ensemble.methods},
    "refused": refused, "val_samples": data.card["splits"]["val"]["samples"],
}))
"""


def test_api_from_a_folder_with_its_own_train_and_pipeline_modules(tmp_path: Path) -> None:
    corpus = image_folder(tmp_path / "corpus")
    work = tmp_path / "project"
    work.mkdir()
    for name in ("train.py", "pipeline.py", "schemas.py", "cli.py"):
        (work / name).write_text("raise SystemExit('the project imported a module of the folder it ran in')\n")
    (work / "use_api.py").write_text(SCRIPT)
    result = subprocess.run([sys.executable, "use_api.py", str(corpus), str(tmp_path / "data"), str(tmp_path / "runs")],
                            cwd=work, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"the API printed to stdout: {result.stdout[:2000]}"
    report = json.loads(lines[0])
    assert report["foreign"] == []
    assert all(Path(path).is_relative_to(REPO) for path in report["stages"])
    assert report["sigterm_default"]
    assert (report["written"], report["split"], report["epochs"]) == (18, 4, 1)
    assert Path(report["out"], "dataset.json").is_file()
    assert Path(report["run_dir"]) == tmp_path / "runs" / "sub-03" and Path(report["run_dir"], "final.json").is_file()
    assert any("18 images" in line and "4 sub-datasets" in line for line in report["logged"])  # prepare's plan line
    assert any(line.startswith("[sub-03") for line in report["logged"])  # the epoch's summary line

    # ensemble_eval: the report and the files it wrote, the missing member logged (not printed).
    ensemble = report["ensemble"]
    assert ensemble["type"] == "EnsembleResult" and Path(ensemble["out"]) == tmp_path / "runs" / "ensemble"
    assert [Path(p).name for p in ensemble["files"]] == ["report.json", "report.md", "accuracy_vs_members.png",
                                                         "predictions.parquet"]
    assert all(Path(p).is_file() and Path(p).parent == Path(ensemble["out"]) for p in ensemble["files"])
    assert json.loads(Path(ensemble["files"][0]).read_text()) == ensemble["report"]
    assert [m["shard"] for m in ensemble["report"]["members"]] == [3] and ensemble["report"]["missing"] == ["sub-00"]
    assert ensemble["report"]["samples"] == report["val_samples"] > 0
    assert ensemble["methods"] == ensemble["report"]["methods"]
    assert "ensemble-eval: missing members, not evaluated: sub-00" in report["logged"]
    assert "missing members" not in result.stderr
    assert report["refused"] is not None and "no such folder" in report["refused"] and "\n" not in report["refused"]


def test_version_and_module_entry_points() -> None:
    import subspectral

    for command in ([sys.executable, "-m", "subspectral", "--version"], [sys.executable, str(REPO / "cli.py"),
                                                                          "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, cwd="/")
        assert result.stdout.strip() == f"subspectral {subspectral.__version__}"
