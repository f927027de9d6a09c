"""`cli.py prepare` against hostile input, faults and careless users, as a user meets them: real files, links,
FIFOs and devices, real processes and signals, a real full disk (tmpfs), a store that never answers.

The rule for every case: bad input gets one clear line and a non-zero exit, loses nothing, and is
never silently written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, S3_CREDENTIALS, fill_disk, mounted_tmpfs, run_cli
from corpora import GOOD_PER_CLASS, add_link_quirks, image_folder, jpeg

SMALL = ("--split", "4", "--size", "16", "--shard-size", "4", "--executor", "serial")  # 18 images: 5 shards


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def partial_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".*.partial")]


def error_lines(stderr: str) -> list[str]:
    """What the command said to the user on stderr (Ray's own start-up notices aside)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("202", "(raylet)"))]


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str, exit_code: int = 2) -> str:
    """Exit 2 (refused input) or 1 (a fault: a retry may help), and one line on stderr holding ``fragments``."""
    assert result.returncode == exit_code, result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def rejects_by_path(out: Path, root: Path) -> dict[str, str]:
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    return {row["source"].split(str(root) + "/", 1)[1]: row["reason"] for row in rows}


# ------------------------------------------------------------------ inputs: links, loops, FIFOs, devices

def test_links_loops_fifos_and_devices_are_each_written_once_or_rejected(tmp_path):
    root = image_folder(tmp_path / "corpus")
    expected = add_link_quirks(root, tmp_path / "outside")
    out = tmp_path / "out"
    # Most of this corpus is quirks: more than the default --max-reject-fraction of it is rejected.
    result = run_cli("prepare", "--src", str(root), "--out", str(out), *SMALL, "--max-reject-fraction", "1",
                     timeout=300)
    assert f"{3 * GOOD_PER_CLASS} written + {len(expected)} rejected" in result.stdout, result.stdout
    assert rejects_by_path(out, root) == expected
    manifest = pq.read_table(out / "manifest.parquet")
    assert sorted(manifest.column("source").to_pylist()) == sorted(str(p) for p in root.glob("n00*/n00*_*.JPEG"))


def prepare_list(tmp_path: Path, extra: list[str], *options: str) -> dict[str, tuple[str, str]]:
    """Prepare a list of the good corpus plus ``extra`` paths (class n001); the rejects by file name."""
    root = image_folder(tmp_path / "corpus")
    rows = [f"{p},{p.parent.name}" for p in sorted(root.glob("*/*.JPEG"))] + [f"{path},n001" for path in extra]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = run_cli("prepare", "--src", str(tmp_path / "list.csv"), "--out", str(out), *options, *SMALL, timeout=300)
    assert f"{3 * GOOD_PER_CLASS} written + {len(extra)} rejected" in result.stdout
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    return {Path(r["source"]).name: (r["reason"], r["detail"]) for r in rejects}


def test_a_list_naming_a_fifo_or_a_device_gets_them_rejected_unopened(tmp_path):
    os.mkfifo(tmp_path / "pipe.JPEG")  # opened, it waits for a writer forever; /dev/zero, read, never ends
    assert prepare_list(tmp_path, [str(tmp_path / "pipe.JPEG"), "/dev/zero"]) == {
        "pipe.JPEG": ("not_a_file", "a FIFO: never opened"), "zero": ("not_a_file", "a character device: never opened")}


def test_a_file_over_max_file_mb_is_rejected_unread(tmp_path):
    (tmp_path / "huge.JPEG").write_bytes(jpeg(1) + bytes(2 << 20))  # a JPEG with 2 MiB of junk after it
    assert prepare_list(tmp_path, [str(tmp_path / "huge.JPEG")], "--max-file-mb", "1") == {
        "huge.JPEG": ("too_large", f"{len(jpeg(1)) + (2 << 20)} bytes, over the limit of 1048576 (--max-file-mb)")}


@pytest.mark.parametrize(("args", "message"), [
    (("--size", "100000"), "resizes every image to 600000x600000 = 360000000000 pixels, over the limit"),
    (("--size", "100000", "--dry-run"), "over the limit of 89478485 pixels per image"),
    (("--split", "4096"), "--split 4096: at most 1024 sub-datasets"),
    (("--max-file-mb", "0"), "--max-file-mb must be positive"),
])
def test_sizes_past_any_sensible_bound_are_refused_before_any_work(tmp_path, args, message):
    root = image_folder(tmp_path / "corpus")
    result = run_cli("prepare", "--src", str(root), "--out", str(tmp_path / "out"), *args, check=False)
    assert_one_line(result, message)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ errors under Ray: one line, as with serial

@pytest.mark.slow
@pytest.mark.parametrize(("content", "message"), [
    (b"file,label\nx.jpg,a\n", "needs a 'path' (or 'uri') column and a 'label' column"),
    (jpeg(4), "not a CSV list of images"),  # binary bytes in a .csv: the parser's message quotes them
], ids=["missing-columns", "binary"])
def test_a_worker_error_under_ray_is_one_line(tmp_path, content, message):
    (tmp_path / "list.csv").write_bytes(content)
    result = run_cli("prepare", "--src", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"),
                     "--num-workers", "1", check=False, timeout=300)
    line = assert_one_line(result, f"list file {tmp_path / 'list.csv'}: ", message)
    assert "\x1b[" not in result.stderr and line.isprintable()


@pytest.mark.slow
def test_an_unreadable_class_folder_under_ray_is_one_line(tmp_path):
    root = image_folder(tmp_path / "corpus")
    # Root reads any folder: drop the capabilities that let it, so that permissions apply as to a user.
    as_user = [] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if as_user and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no folder is unreadable")
    (root / "n002").chmod(0)
    try:
        result = subprocess.run([*as_user, sys.executable, str(REPO / "cli.py"), "prepare", "--src", str(root), "--out",
                                 str(tmp_path / "out"), "--num-workers", "1"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, check=False)
    finally:
        (root / "n002").chmod(0o755)
    assert_one_line(result, f"{root / 'n002'}: cannot list this folder (Permission denied); fix its permissions")


def test_an_image_given_as_src_is_refused_in_one_line(tmp_path):
    (tmp_path / "photo.JPEG").write_bytes(jpeg(5))
    result = run_cli("prepare", "--src", str(tmp_path / "photo.JPEG"), "--out", str(tmp_path / "out"), check=False)
    assert_one_line(result, "is an image; give the folder that holds the class folders")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ resume: the tars, not only the stats files

def test_question_marks_in_local_paths_are_part_of_the_paths(tmp_path):
    root = image_folder(tmp_path / "corpus?v=2", classes=("cat?dup", "cat"))
    result = run_cli("prepare", "--src", str(root), "--out", str(tmp_path / "oq?x=1"), *SMALL)
    assert f"{2 * GOOD_PER_CLASS} written" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus?v=2", "oq?x=1"]
    classes = pq.read_table(tmp_path / "oq?x=1" / "classes.parquet").column("name").to_pylist()
    assert classes == ["cat", "cat?dup"]


def test_a_rerun_writes_again_the_tars_that_are_missing_or_damaged(tmp_path):
    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ("prepare", "--src", str(root), "--out", str(out), *SMALL)
    run_cli(*args)
    complete = tree_bytes(out)

    (out / "sub-02" / "train-000001.tar").unlink()
    (out / "dataset.json").unlink()
    rerun = run_cli(*args)
    assert "sub-02/train-000001.tar is missing: writing shard train-000001 again" in rerun.stdout
    assert "1 shard(s) to write" in rerun.stdout
    assert tree_bytes(out) == complete

    with open(out / "sub-00" / "train-000003.tar", "r+b") as tar:  # cut short; the card still says complete
        tar.truncate(4096)
    repaired = run_cli(*args)
    assert "is damaged: sub-00/train-000003.tar has 4096 bytes" in repaired.stdout
    assert tree_bytes(out) == complete


def test_damage_that_cannot_be_repaired_is_said_in_one_line(tmp_path):
    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    run_cli("prepare", "--src", str(root), "--out", str(out), *SMALL)
    shutil.rmtree(out / "_work")
    (out / "sub-01" / "train-000000.tar").unlink()
    result = run_cli("prepare", "--src", str(root), "--out", str(out), *SMALL, check=False)
    assert_one_line(result, "sub-01/train-000000.tar is missing, and its _work/ folder, needed to rewrite it, was "
                            "deleted; delete the dataset and prepare it again")


# ------------------------------------------------------------------ claiming --out: typos, _work/ deleted

def test_a_failed_first_run_does_not_block_the_corrected_command(tmp_path):
    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    typo = run_cli("prepare", "--src", str(tmp_path / "corpsu"), "--out", str(out), *SMALL, check=False)
    assert_one_line(typo, "no such file or folder")
    assert not out.exists()
    rows = [f"{p},{p.parent.name}" for p in root.glob("*/*.JPEG")]
    (tmp_path / "list.csv").write_text("file,label\n" + "\n".join(rows))
    bad_list = run_cli("prepare", "--src", str(tmp_path / "list.csv"), "--out", str(out), *SMALL, check=False)
    assert_one_line(bad_list, "needs a 'path'")  # found by listing, after --out was claimed
    fixed = run_cli("prepare", "--src", str(root), "--out", str(out), *SMALL)
    assert "holds the options of an earlier run that finished no shard" in fixed.stdout
    assert f"{3 * GOOD_PER_CLASS} written + 0 rejected" in fixed.stdout


def test_work_folder_deleted_after_completion_as_the_docs_allow(tmp_path):
    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ("prepare", "--src", str(root), "--out", str(out), *SMALL)
    run_cli(*args)
    shutil.rmtree(out / "_work")
    complete = tree_bytes(out)
    again = run_cli(*args)
    assert "already complete" in again.stdout
    assert {k: v for k, v in tree_bytes(out).items() if not k.startswith("_work/")} == complete
    changed = run_cli(*args, "--quality", "80", check=False)
    assert_one_line(changed, "was prepared with other options (spec.quality: 95 then, 80 now)")


# ------------------------------------------------------------------ one writer per --out

def test_a_second_prepare_on_the_same_out_is_refused_and_the_first_completes(sample_root, tmp_path):
    out = tmp_path / "out"
    # --size 112: the first run takes long enough (many seconds) for the second to start while it runs.
    args = ["prepare", "--src", str(sample_root), "--out", str(out), "--size", "112", "--shard-size", "50",
            "--executor", "serial"]
    first = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_work" / "params.json").exists():  # written once the lock is held
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = run_cli(*args, check=False)
        still_running = first.poll() is None
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert still_running, "the first run ended before the second one started: nothing was tested"
    assert_one_line(second, f"{out} is being written by another prepare (pid {first.pid} on ", "wait for it to end")
    assert first.returncode == 0, stderr
    assert "600 written + 0 rejected = 600 inputs" in stdout
    assert (out / "_work" / "lock").read_bytes() == b""


# ------------------------------------------------------------------ a full disk

def test_a_disk_too_small_is_refused_before_writing_shards(tmp_path):
    root = image_folder(tmp_path / "corpus")
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        result = run_cli("prepare", "--src", str(root), "--out", str(disk / "out"), "--executor", "serial",
                         check=False)
        assert_one_line(result, f"not enough space for {disk / 'out'}: about ", "MB needed for 1 shard(s), ",
                        "MB free; free some space or use another --out", exit_code=1)
        assert not list((disk / "out").glob("sub-*")) and not partial_files(disk)


@pytest.fixture(scope="module")
def sample_uninterrupted(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_cli("prepare", "--src", str(sample_root), "--out", str(out), "--shard-size", "20", "--executor", "serial")
    return out


@pytest.mark.slow
def test_a_disk_that_fills_during_a_ray_run(sample_root, sample_uninterrupted, tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "256m") as disk:
        out = disk / "out"
        args = ["prepare", "--src", str(sample_root), "--out", str(out), "--shard-size", "20", "--num-workers", "2"]
        process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, text=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while not list((out / "stats").glob("*.json")):
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()
                time.sleep(0.02)
            ballast = fill_disk(disk / "ballast")
            _, stderr = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
        assert not (out / "dataset.json").exists(), "the run ended before the disk filled: nothing was tested"
        assert_one_line(subprocess.CompletedProcess(args, process.returncode, "", stderr),
                        f"no space left on the device of {out}", "MB more needed", "free; free some space and "
                        "rerun the same command to resume", exit_code=1)
        assert not partial_files(disk)

        ballast.unlink()
        run_cli(*args, timeout=600)
        assert tree_bytes(out) == tree_bytes(sample_uninterrupted)


# ------------------------------------------------------------------ a store that never answers, and signals

STALLED_SOURCE = ("prepare", "--src", "s3://corpus/in", "--executor", "serial")


def test_a_store_that_never_answers_fails_in_one_line(stalled_endpoint, tmp_path):
    url, _ = stalled_endpoint
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": url, "SUBSPECTRAL_STORAGE_TIMEOUT": "1"}
    # pyarrow's default client retried for ~100 s, and SIGTERM waited as long.
    result = run_cli(*STALLED_SOURCE, "--out", str(tmp_path / "out"), env=env, check=False, timeout=90)
    assert_one_line(result, "--src s3://corpus/in: ", "Timeout was reached", exit_code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_exits_at_once_while_blocked_in_storage(stalled_endpoint, tmp_path, signum):
    url, accepted = stalled_endpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), **S3_CREDENTIALS, "AWS_ENDPOINT_URL": url,
           "SUBSPECTRAL_STORAGE_TIMEOUT": "600"}  # the first signal would wait for the request's timeout
    process = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *STALLED_SOURCE, "--out", str(tmp_path / "o")],
                               cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not accepted:  # blocked in its first request
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signum)
        time.sleep(0.5)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert f"{name} received again: exiting now; rerun the same command to resume" in stderr


# ------------------------------------------------------------------ the sample corpus, as the README uses it

def test_the_sample_corpus_gets_a_val_split_by_default(sample_root, tmp_path):
    result = run_cli("prepare", "--out", str(tmp_path / "out"), "--dry-run",
                     env={"SUBSPECTRAL_CACHE": str(sample_root.parent)})
    assert "images: train 400, val 200" in result.stdout
    given = run_cli("prepare", "--src", str(sample_root), "--out", str(tmp_path / "out"), "--dry-run")
    assert "images: train 600, val 0" in given.stdout  # a corpus of one's own: as asked (--val-per-class 0)


def test_card_parameters_are_the_options_that_wrote_the_card(tmp_path):
    from subspectral.pipeline.prepare import card_parameters

    root = image_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    run_cli("prepare", "--src", str(root), "--out", str(out), *SMALL, "--quality", "90", "--min-side", "20",
            "--max-file-mb", "3", "--val-per-class", "2", "--seed", "4")
    card = json.loads((out / "dataset.json").read_text())
    assert card_parameters(card) == json.loads((out / "_work" / "params.json").read_text())
