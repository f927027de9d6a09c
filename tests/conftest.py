"""Shared fixtures: real images, a real Ray, the embedded sample corpus, a real S3 server, a store that never
answers, a small real disk (tmpfs), and a runner for the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# For the moto server and its clients (any keys work); no metadata lookups, no real AWS.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                  "AWS_EC2_METADATA_DISABLED": "true"}


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, structured RGB image (gradients, a disc, texture) of the given size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < (0.2 * min(width, height)) ** 2
    image = np.stack([x / width * 200 + 30, y / height * 180 + 40, 120 + 60 * np.sin(x / 9 + y / 13)], axis=-1)
    image[disc] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, fmt: str = "JPEG", **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def run_cli(
    *args: str, check: bool = True, env: dict | None = None, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``python cli.py ARGS`` in ``cwd`` as a user would; returns the completed process (stdout/stderr as text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"cli.py {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def fails_with_one_line(command: str, message: str, *args: str) -> None:
    """``cli.py COMMAND ARGS`` exits 2 with one line on stderr, no traceback, and the line holds ``message``."""
    result = run_cli(command, *args, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0], lines[0]


def kill_when_written(path: Path, *args: str, timeout: float = 300) -> None:
    """Start ``cli.py ARGS`` and SIGKILL it the moment ``path`` exists (a real kill, mid-run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole test session (prepare joins it instead of starting its own)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded sample corpus, generated once into the test session's temp dir."""
    from subspectral.pipeline.sample import sample_corpus

    return sample_corpus(tmp_path_factory.mktemp("sample-cache"))


@pytest.fixture(scope="session")
def prepared_sample(sample_root, tmp_path_factory) -> Path:
    """The embedded sample prepared once by the CLI for the trainer tests: 36 sub-datasets,
    10 val images per class, 128-sample shards (so train shards divide unevenly: 128+128+128+116)."""
    out = tmp_path_factory.mktemp("prepared-sample") / "data"
    run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--split", "36", "--val-per-class", "10",
            "--shard-size", "128", "--executor", "serial")
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server, in memory) for the whole session: its http:// URL.

    Give the CLI ``{**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}``; use a bucket name of your own.
    """
    server, url = _start_moto(subprocess.DEVNULL)
    yield url
    server.terminate()
    server.wait(timeout=10)


class RequestLog:
    """The HTTP requests a moto server logged (werkzeug writes one line per request), counted since a mark."""

    LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (/[^ ?]*)\S* HTTP/')  # werkzeug colours some

    def __init__(self, path: Path, url: str) -> None:
        self.path, self.url, self._mark = path, url, 0

    def mark(self) -> None:
        self._mark = self._size()

    def since_mark(self) -> list[tuple[str, str]]:
        """(method, path) of every request since ``mark()``, once the server has logged them all."""
        time.sleep(0.3)  # werkzeug logs after it has answered
        with open(self.path, encoding="utf-8", errors="replace") as log:
            log.seek(self._mark)
            return [(m.group(1), m.group(2)) for m in self.LINE.finditer(log.read())]

    def _size(self) -> int:
        time.sleep(0.3)
        return self.path.stat().st_size


@pytest.fixture(scope="session")
def s3_request_log(tmp_path_factory):
    """A second moto server whose request log the tests read: a request counter for budgets of GETs."""
    pytest.importorskip("moto")
    path = tmp_path_factory.mktemp("moto") / "requests.log"
    with open(path, "wb") as log:
        server, url = _start_moto(log)
    yield RequestLog(path, url)
    server.terminate()
    server.wait(timeout=10)


def _start_moto(log) -> tuple[subprocess.Popen, str]:
    pytest.importorskip("moto")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start on port {port} (exit code {server.poll()})") from None
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def s3_client(endpoint: str):
    """A boto3 S3 client for the ``s3_endpoint`` server."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


# What torchrun sets: a test of another launcher starts its processes without them.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT")


def run_as_srun_tasks(command: list[str], ntasks: int, env: dict | None = None,
                      timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start ``command`` as srun starts the ``ntasks`` tasks of a job step on one node: the same command,
    each with only Slurm's variables to tell it its place (no torchrun, no MASTER_*), all at once.

    The job id is chosen so that the rendezvous port train/distributed.py derives from it
    (15000 + its last four digits) is free on loopback.
    """
    from subspectral.train.distributed import SLURM_BASE_PORT

    for port in range(SLURM_BASE_PORT + os.getpid() % 5000, SLURM_BASE_PORT + 10000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("SLURM_", "TORCHELASTIC_")) and key not in LAUNCHER_VARIABLES}
    base.update({"PYTHONPATH": str(REPO), **(env or {}), "SLURM_JOB_ID": str(port - SLURM_BASE_PORT),
                 "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_STEP_NODELIST": "localhost", "SLURM_NODEID": "0"})
    tasks = [subprocess.Popen(command, cwd=REPO, env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(ntasks)]
    results = []
    try:
        for task in tasks:
            stdout, stderr = task.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(task.args, task.returncode, stdout, stderr))
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
                task.wait()
    return results


@pytest.fixture
def stalled_endpoint() -> Iterator[tuple[str, list[socket.socket]]]:
    """An http:// endpoint that accepts connections and never answers (a hung object store), and the list
    of connections it accepted so far."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the server socket closed: the test is over
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for connection in accepted:
        connection.close()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs) at ``path``: a disk that fills. Needs root with CAP_SYS_ADMIN;
    the test is skipped where mounting is impossible, and fails instead under ``SUBSPECTRAL_REQUIRE_TMPFS=1``
    (set by .ci/run: CI runs as root, so a skip there would hide a lost capability)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True, check=False)
    if mount.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mount.stderr.strip()}"
        if os.environ.get("SUBSPECTRAL_REQUIRE_TMPFS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill_disk(path: Path) -> Path:
    """Write a file at ``path`` until its filesystem is full; returns it (delete it to free the space)."""
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as ballast:
        with contextlib.suppress(OSError):
            while True:
                ballast.write(block)
        with contextlib.suppress(OSError):  # the last few KB
            while True:
                ballast.write(block[:4096])
    return path


def call_within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, failing the test if it has not returned after ``seconds`` (it is left blocked in a daemon
    thread: a call that hangs, on a FIFO say, cannot be interrupted)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
