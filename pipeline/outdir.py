"""The output folder's bookkeeping: one writer at a time, the options it holds, which shards are intact.

* ``output_lock``: a local ``--out`` is locked (``flock`` on ``OUT/_work/lock``) for the whole run; a
  second ``prepare`` on it is refused with one line. The lock goes with the process, kill -9 included.
  Object stores have no lock primitive here: one ``prepare`` per ``--out`` (docs/format.md).
* ``claim``: the options that change output bytes are recorded in ``OUT/_work/params.json``; a rerun
  with other ones is refused, unless the earlier run finished no shard (a typo in ``--src``, say).
  Once ``dataset.json`` exists, the card holds the same options, so ``_work/`` may be deleted.
* ``verify_shards``: a shard counts as finished only when its stats file, its status table and its
  N tars, each of the size the stats record, are all there.
* ``remove_partials``: the hidden ``.NAME.partial`` files a killed or failed run leaves.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import posixpath
import socket
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs

from .storage import Location, exists, is_partial, is_remote, read_json, write_json


@contextlib.contextmanager
def output_lock(out: Location, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``OUT/_work/lock`` (local folders) until the block ends; refuse if another run holds it."""
    if is_remote(out.uri):
        yield
        return
    path = os.path.join(out.uri, "_work", "lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"{out.uri} is being written by another prepare ({holder}); wait for it to end, "
                             "or use another --out") from None
        except OSError as error:  # a filesystem without locks (some network filesystems)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log(f"prepare: warning: cannot lock {path} ({error.strerror}): make sure no other prepare writes there")
        if held:
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        yield
    finally:
        if held:  # who held it is not part of the output, which stays byte-identical run after run
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def claim(out: Location, params: dict, card_parameters: Callable[[dict], dict], log: Callable[[str], None]) -> None:
    """Record ``params`` as ``out``'s options, or check them against those it already holds."""
    marker = out.join("_work", "params.json")
    card_at = out.join("dataset.json")
    if exists(marker):
        previous = read_json(marker)
    elif exists(card_at):  # complete, and _work/ deleted since: the card records the same options
        previous = card_parameters(read_json(card_at))
    else:
        write_json(marker, params)
        return
    if previous == params:
        return
    changed = "; ".join(differences(previous, params))
    if exists(card_at) or finished_shards(out):
        raise ValueError(f"{out.uri} was prepared with other options ({changed}); "
                         "use another --out, or delete it to start over")
    log(f"prepare: {out.uri} holds the options of an earlier run that finished no shard ({changed}); "
        "replacing them")
    _remove_tree(out.join("_work"), keep=("lock",))
    write_json(marker, params)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return changed


def verify_shards(out: Location, shards: list[str], sub_datasets: list[str],
                  with_status: bool = True) -> tuple[set[str], dict[str, str]]:
    """Which of ``shards`` (names such as ``train-000003``) are finished, and what is wrong with those that
    have a stats file but are not. ``with_status``: the shard's status table in _work/ counts too (it is
    needed until the dataset is complete). Lists each folder once; reads the stats of shards that have one."""
    stats = _file_sizes(out.join("stats"))
    statuses = _file_sizes(out.join("_work", "status")) if with_status else {}
    tars = [_file_sizes(out.join(name)) for name in sub_datasets]
    finished: set[str] = set()
    damaged: dict[str, str] = {}
    for shard in shards:
        if f"{shard}.json" not in stats:
            continue
        recorded = read_json(out.join("stats", f"{shard}.json"))["bytes"]
        problem = f"_work/status/{shard}.parquet is missing" if with_status and f"{shard}.parquet" not in statuses \
            else None
        for name, sizes, size in zip(sub_datasets, tars, recorded, strict=True):
            found = sizes.get(f"{shard}.tar")
            if found != size:
                problem = (f"{name}/{shard}.tar is missing" if found is None else
                           f"{name}/{shard}.tar has {found} bytes, {size} recorded")
                break
        if problem:
            damaged[shard] = problem
        else:
            finished.add(shard)
    return finished, damaged


def finished_shards(out: Location) -> set[str]:
    """Names of the shards with a stats file (finished, as far as a listing can tell)."""
    return {name[: -len(".json")] for name in _file_sizes(out.join("stats")) if name.endswith(".json")}


def remove_partials(out: Location) -> int:
    """Delete every ``.NAME.partial`` under ``out``; returns how many. Only while holding the lock."""
    filesystem, path = out.resolve()
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    removed = 0
    for info in infos:
        if info.type == pafs.FileType.File and is_partial(posixpath.basename(info.path)):
            with contextlib.suppress(FileNotFoundError):
                filesystem.delete_file(info.path)
                removed += 1
    return removed


def _file_sizes(folder: Location) -> dict[str, int]:
    filesystem, path = folder.resolve()
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {posixpath.basename(i.path): i.size for i in infos if i.type == pafs.FileType.File}


def _remove_tree(folder: Location, keep: tuple[str, ...]) -> None:
    filesystem, path = folder.resolve()
    for info in filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if posixpath.basename(info.path) in keep:
            continue
        if info.type == pafs.FileType.Directory:
            filesystem.delete_dir(info.path)
        else:
            filesystem.delete_file(info.path)
