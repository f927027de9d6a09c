"""train and ensemble-eval read a prepared dataset from object storage: a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, S3_CREDENTIALS, run_cli, s3_client

pytest.importorskip("boto3")
pytest.importorskip("moto")

SHARD = 5
BATCH = 100
BUCKET = "train-data"


def count_samples(tars: list[Path]) -> int:
    total = 0
    for path in tars:
        with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as archive:
            total += sum(name.endswith(".cls") for name in archive.getnames())
    return total


@pytest.fixture(scope="module")
def s3_data(prepared_sample, s3_endpoint) -> str:
    """prepared_sample in the bucket: its card and tables, and sub-dataset SHARD (all that member SHARD reads)."""
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    wanted = f"sub-{SHARD:02d}"
    for path in sorted(prepared_sample.rglob("*")):
        top = path.relative_to(prepared_sample).parts[0]
        if path.is_file() and top != "_work" and (top == wanted or not top.startswith("sub-")):
            client.upload_file(str(path), BUCKET, f"sample-sub36/{path.relative_to(prepared_sample).as_posix()}")
    return f"s3://{BUCKET}/sample-sub36"


@pytest.fixture
def s3_env(s3_endpoint) -> dict[str, str]:
    return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}


def test_train_and_ensemble_eval_from_s3(s3_data, s3_env, prepared_sample, tmp_path):
    runs = tmp_path / "runs"
    run_cli("train", "--data", s3_data, "--shard", str(SHARD), "--config", "sample", "--out", str(runs),
            "--no-progress", "schedule.epochs=1", f"data.batch_size={BATCH}", env=s3_env)

    local = prepared_sample / f"sub-{SHARD:02d}"
    run_dir = runs / f"sub-{SHARD:02d}"
    final = json.loads((run_dir / "final.json").read_text())
    assert final["val_samples"] == count_samples(sorted(local.glob("val-*.tar"))) == 100
    [epoch] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epoch["steps"] == count_samples(sorted(local.glob("train-*.tar"))) // BATCH == 5
    assert epoch["skipped"] == 0 and epoch["val_skipped"] == 0
    assert json.loads((run_dir / "run.json").read_text())["data"] == s3_data

    # ensemble-eval on the S3 copy scores the member as its own validation did.
    out = tmp_path / "report"
    run_cli("ensemble-eval", "--data", s3_data, "--runs", str(runs), "--out", str(out), "--device", "cpu", env=s3_env)
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == s3_data and report["samples"] == final["val_samples"] and report["skipped"] == 0
    [member] = report["members"]
    assert (member["shard"], 100 * member["top1"], 100 * member["top5"]) == (SHARD, final["top1"], final["top5"])
    assert pq.read_table(out / "predictions.parquet").num_rows == final["val_samples"]


def test_storage_reads_the_s3_copy_as_the_local_one(s3_data, s3_env, prepared_sample, monkeypatch):
    from subspectral.train.prepared import read_card, shard_uris
    from subspectral.train.storage import exists, join, read_bytes

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    card = read_card(s3_data)
    assert card == read_card(str(prepared_sample))
    for split in ("train", "val"):
        uris = shard_uris(s3_data, card, SHARD, split)
        paths = shard_uris(str(prepared_sample), card, SHARD, split)
        assert uris == [f"{s3_data}/{Path(path).relative_to(prepared_sample).as_posix()}" for path in paths]
        assert [read_bytes(uri) for uri in uris] == [Path(path).read_bytes() for path in paths]
    assert not exists(join(s3_data, "sub-06", "val-000000.tar"))  # not uploaded
    with pytest.raises(FileNotFoundError):
        read_bytes(join(s3_data, "sub-06", "val-000000.tar"))

    # The endpoint in the URI instead of the environment (pyarrow's endpoint_override query).
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    in_uri = f"{s3_data}?endpoint_override={s3_env['AWS_ENDPOINT_URL'].split('://')[1]}&scheme=http"
    assert join(in_uri, "sub-05", "val-000000.tar") == f"{s3_data}/sub-05/val-000000.tar?{in_uri.split('?')[1]}"
    assert read_card(in_uri) == read_card(str(prepared_sample))


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_or_unreachable_s3_dataset_is_one_line(s3_data, s3_env, tmp_path):
    wrong = s3_data.replace("sample-sub36", "no-such-prefix")
    train = ("train", "--shard", str(SHARD), "--config", "sample", "--out", str(tmp_path / "runs"), "--no-progress")
    unreachable = {**s3_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}  # nothing listens on port 1
    calls = {
        "train": (train + ("--data", wrong), s3_env),
        "ensemble-eval": (("ensemble-eval", "--data", wrong, "--runs", str(tmp_path)), s3_env),
        "unreachable": (train + ("--data", s3_data), unreachable),  # pyarrow retries for some seconds first
    }
    with ThreadPoolExecutor(len(calls)) as pool:  # three CLI start-ups at once: most of their time is waiting
        futures = {name: pool.submit(run_cli, *args, check=False, env=env) for name, (args, env) in calls.items()}
        lines = {name: one_line_error(future.result()) for name, future in futures.items()}
    assert lines["train"] == (f"cli.py train: error: {wrong} is not a complete prepared dataset: {wrong}/dataset.json "
                              "is missing (run 'cli.py prepare' to the end first)")
    assert lines["ensemble-eval"].startswith(f"ensemble-eval: error: {wrong} is not a complete prepared dataset")
    assert lines["unreachable"].startswith(f"cli.py train: error: cannot read {s3_data}: ")
    assert "connect" in lines["unreachable"].lower()
    assert not (tmp_path / "runs").exists()


def test_a_damaged_val_shard_on_s3_counts_the_samples_lost(prepared_sample, s3_endpoint, monkeypatch):
    """The shard's stats file is found beside the dataset on the store too (the URI keeps its query)."""
    from subspectral.train.data import make_loader
    from subspectral.train.prepared import read_card, shard_uris
    from subspectral.train.stream import EvalStream

    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="damaged")
    val = prepared_sample / "sub-00" / "val-000000.tar"
    cut = val.stat().st_size // 2
    with tarfile.open(val) as archive:
        head = sum(m.name.endswith(".jpg") and m.offset_data + m.size <= cut for m in archive)
    client.put_object(Bucket="damaged", Key="d/sub-00/val-000000.tar", Body=val.read_bytes()[:cut])
    for name in ("dataset.json", "stats/val-000000.json"):
        client.upload_file(str(prepared_sample / name), "damaged", f"d/{name}")
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    host = s3_endpoint.split("://", 1)[1]
    data = f"s3://damaged/d?endpoint_override={host}&scheme=http"
    card = read_card(data)
    stream = EvalStream(shard_uris(data, card, 0, "val"), card, batch_size=32, rank=0, world=1)
    batches = list(make_loader(stream, 0, False))
    assert (sum(len(b["labels"]) for b in batches), sum(int(b["skipped"]) for b in batches)) == (head, 100 - head)


@pytest.fixture
def store_stalling_on_train_shards(s3_endpoint):
    """A proxy to the S3 endpoint that answers everything but reads of the train tars (GET; their HEAD is
    answered), which it never answers: a store that hangs mid-training. Its URL, and the stalled requests."""
    host, port = s3_endpoint.split("://", 1)[1].split(":")
    stalled: list[str] = []
    closing = threading.Event()

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as pyarrow's client expects

        def forward(self) -> None:
            if self.command == "GET" and re.search(r"/sub-\d+/train-\d+\.tar", self.path):
                stalled.append(self.path)
                closing.wait()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            upstream = http.client.HTTPConnection(host, int(port), timeout=30)
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload) if self.command != "HEAD"
                                                   else response.getheader("Content-Length", "0")))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            upstream.close()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", stalled
    closing.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_stops_training_at_once_while_a_read_hangs(s3_data, store_stalling_on_train_shards, tmp_path,
                                                                   signum):
    """The trainer reads its shards in the main process (data.workers=0): blocked in a request to a store that
    stopped answering, the first signal waits for the storage timeout; the second exits at once."""
    url, stalled = store_stalling_on_train_shards
    env = {**os.environ, "PYTHONPATH": str(REPO), **S3_CREDENTIALS, "AWS_ENDPOINT_URL": url,
           "SUBSPECTRAL_STORAGE_TIMEOUT": "600"}
    command = [sys.executable, str(REPO / "cli.py"), "train", "--data", s3_data, "--shard", str(SHARD), "--config",
               "sample", "--out", str(tmp_path / "runs"), "--no-progress", "data.workers=0"]
    process = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not stalled:  # the card, tables and model are done: training waits for its first shard
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(signum)
        time.sleep(0.5)
        assert process.poll() is None  # the first signal waits for the blocked read
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr
    assert f"{name} received again: exiting now; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs" / f"sub-{SHARD:02d}" / "final.json").exists()


def test_a_store_that_stops_answering_mid_training_fails_in_one_line(s3_data, store_stalling_on_train_shards,
                                                                     tmp_path):
    """The DataLoader workers' reads have the storage layer's timeout: one line, not a hang."""
    url, stalled = store_stalling_on_train_shards
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": url, "SUBSPECTRAL_STORAGE_TIMEOUT": "1"}
    result = run_cli("train", "--data", s3_data, "--shard", str(SHARD), "--config", "sample", "--out",
                     str(tmp_path / "runs"), "--no-progress", "data.workers=2", env=env, check=False, timeout=300)
    line = one_line_error(result)
    assert line.startswith(f"cli.py train: error: cannot read {s3_data}/sub-{SHARD:02d}/train-"), line
    assert "Timeout was reached" in line and stalled
    assert not (tmp_path / "runs" / f"sub-{SHARD:02d}" / "final.json").exists()
