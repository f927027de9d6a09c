"""Run independent tasks serially or as Ray tasks; the only module that knows about Ray.

Both runners share one signature, so the same task function runs in a test, in a debugger, on an
embedded local Ray, or on a cluster (``--ray-address`` / ``RAY_ADDRESS``). Tasks are idempotent
(each writes its own outputs atomically), so Ray may retry them after a worker dies. Both raise a
task's own exception (a ``ValueError``, an ``OSError``), not Ray's wrapper with the remote traceback,
so the command reports it in one line whichever runner ran it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

OBJECT_STORE_BYTES = 256 * 1024**2  # task inputs and results are small; keep Ray's footprint small too
CANCEL_WAIT_SECONDS = 30  # after a failure, for the other tasks to remove their partial files
FORWARDED_ENV = ("SUBSPECTRAL_STORAGE_TIMEOUT",)  # settings the driver's tasks must see on cluster nodes too


class TaskFailed(RuntimeError):
    """A task's worker died (killed for memory, node lost): what Ray says, in one line."""


def run_serial(fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
    for task in tasks:
        yield fn(task)


class RayRunner:
    """Starts (or joins) Ray once; ``map`` yields results as tasks finish, with bounded in-flight work."""

    def __init__(self, num_workers: int, address: str | None) -> None:
        import ray

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            # ray.init installs its own SIGTERM handler (exit 15, no message); keep the CLI's, which unwinds
            # cleanly and tells the user to rerun.
            sigterm_handler = signal.getsignal(signal.SIGTERM)
            if address:
                # Ship the package so workers on other machines import the same code as this driver.
                env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
                ray.init(address=address, runtime_env={"py_modules": [package_for_workers()], "env_vars": env_vars},
                         log_to_driver=True, logging_level="ERROR")
            else:
                ray.init(num_cpus=num_workers, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                         logging_level="ERROR", configure_logging=True)
            if callable(sigterm_handler) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm_handler)
            self._started = True
        self._num_workers = None if address else num_workers

    @property
    def parallelism(self) -> int:
        """Tasks that can run at once; read afresh, since cluster workers may join (or leave) mid-run."""
        cluster_cpus = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        return min(self._num_workers, cluster_cpus) if self._num_workers else cluster_cpus

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        remote = self._ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(fn)
        pending: list[Any] = []
        window = 2 * self.parallelism
        try:
            for task in tasks:
                if len(pending) >= window:
                    window = 2 * self.parallelism
                    done, pending = self._ray.wait(pending, num_returns=1)
                    yield self._result(done[0])
                pending.append(remote.remote(task))
            while pending:
                done, pending = self._ray.wait(pending, num_returns=1)
                yield self._result(done[0])
        except Exception:
            self._cancel(pending, wait=True)  # their atomic outputs remove their partial files
            raise
        except BaseException:  # SIGTERM, Ctrl-C: stop now; a rerun removes what they leave
            self._cancel(pending, wait=False)
            raise

    def _result(self, ref: Any) -> Any:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as error:
            if isinstance(error.cause, Exception):
                raise error.cause from None
            raise TaskFailed(_first_line(error)) from None
        except exceptions.RayError as error:
            raise TaskFailed(f"a worker failed: {_first_line(error)}") from None

    def _cancel(self, refs: list[Any], wait: bool) -> None:
        for ref in refs:
            self._ray.cancel(ref)
        if wait and refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)

    def shutdown(self) -> None:
        if self._started:
            self._ray.shutdown()


def package_for_workers() -> str:
    """A temporary folder ``…/subspectral`` holding what a shard task imports, for Ray's ``py_modules``.

    The package's own files plus its ``pipeline`` and ``schemas`` stages, copied from wherever this
    process imported them: an installed package, an editable install or a checkout, whose stage
    folders live beside ``subspectral/`` rather than in it. Compiled extensions come along (Ray's
    upload of a git checkout would leave git-ignored ``.so`` files out).
    """
    import subspectral.pipeline
    import subspectral.schemas

    import subspectral

    root = tempfile.mkdtemp(prefix="subspectral-ray-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = os.path.join(root, "subspectral")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    os.mkdir(target)
    package_dir = os.path.dirname(subspectral.__file__)
    for name in sorted(os.listdir(package_dir)):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(package_dir, name), target)
    for stage in (subspectral.pipeline, subspectral.schemas):
        shutil.copytree(os.path.dirname(stage.__file__), os.path.join(target, stage.__name__.rsplit(".", 1)[1]),
                        ignore=skip)
    return target


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
