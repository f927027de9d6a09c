"""subspectral: spectral sub-dataset training, from corpus to ensemble.

    subspectral prepare --out data/sample            # embedded sample corpus, --split 36
    subspectral prepare --src /data/imagenet21k --out s3://bucket/in21k-sub36 --ray-address auto
    subspectral train --data data/sample --shard 0 --config sample --out runs
    subspectral ensemble-eval --data data/sample --runs runs

``subspectral``, ``python -m subspectral`` and ``python cli.py`` (from a checkout) are this command.
Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (Ray, torch) happen inside ``run`` so ``--help`` is instant.
The command line is the only place that installs signal handlers, configures logging and prints;
the Python API (``subspectral.prepare`` & co.) does none of that.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading

from subspectral import __version__
from subspectral.train import stopping

# name -> (module, one-line help). Order is the order of the chain.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("subspectral.pipeline.prepare_cli", "split a corpus into N aligned WebDataset sub-datasets"),
    "train": ("subspectral.train.cli", "train one sub-network per sub-dataset"),
    "ensemble-eval": ("subspectral.train.ensemble.cli", "evaluate the ensemble of trained members"),
}


def program_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "subspectral"
    return "python -m subspectral" if name == "__main__.py" else name


def build_parser() -> argparse.ArgumentParser:
    prog = program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run '{prog} COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"subspectral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Batch schedulers pre-empt with SIGTERM, users press Ctrl-C: unwind normally (Ray shut down, files
    # closed; every output is written atomically), so rerunning the same command resumes where this one stopped.
    message = f"{signal.Signals(signum).name} received: stopped; rerun the same command to resume"
    stopping.request(message)  # in case the exception below lands where Python drops it
    raise SystemExit(message)


class _ConsoleHandler(logging.Handler):
    """Information to the current sys.stdout, warnings and errors to the current sys.stderr, as plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy for a handler that fails
            self.handleError(record)


def configure_logging() -> None:
    """Show the package's log records (the library itself configures no handler)."""
    logger = logging.getLogger("subspectral")
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _handle_stop_signals() -> None:
    """SIGTERM and SIGINT stop the command cleanly; a second one stops it at once.

    Python runs a signal handler only between bytecodes, so while the main thread is blocked in a
    C call (a storage request to a store that does not answer, until its timeout) the first signal
    waits. A thread that reads the signal wakeup fd sees every signal as it arrives: at the second,
    it exits without unwinding (outputs are atomic: a rerun removes what is left and resumes).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_on_sigterm)
    if _watching:  # main() again in this process (a test): the watcher runs already
        signal.set_wakeup_fd(_watching[0], warn_on_full_buffer=False)
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    _watching[:] = [sender.fileno()]
    # A forked child (a DataLoader worker) inherits the wakeup fd: its signals must not count here.
    os.register_at_fork(after_in_child=_forget_wakeup_fd)
    threading.Thread(target=_exit_on_second_signal, args=(receiver, sender), name="second-signal",
                     daemon=True).start()


def _forget_wakeup_fd() -> None:
    with contextlib.suppress(ValueError):  # forked from a thread other than the main one: cannot be undone
        signal.set_wakeup_fd(-1)


_watching: list[int] = []


def _exit_on_second_signal(receiver: socket.socket, sender: socket.socket) -> None:
    """Runs for the life of the process; ``sender`` is the wakeup fd, kept open by being an argument."""
    received = 0
    while data := receiver.recv(64):
        for signum in data:
            if signum in STOP_SIGNALS:
                received += 1
                if received >= 2:
                    name = signal.Signals(signum).name
                    os.write(2, f"{name} received again: exiting now; rerun the same command to resume\n".encode())
                    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    _handle_stop_signals()
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
