#!/usr/bin/env python3
"""subspectral: spectral sub-dataset training, from corpus to ensemble.

    python cli.py prepare --out data/sample            # embedded sample corpus, --split 36
    python cli.py prepare --src /data/imagenet21k --out s3://bucket/in21k-sub36 --ray-address auto
    python cli.py train --data data/sample --shard 0 --config sample --out runs
    python cli.py ensemble-eval --data data/sample --runs runs

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (Ray, torch) happen inside ``run`` so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from subspectral.train import stopping

# name -> (module, one-line help). Order is the order of the chain.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("subspectral.pipeline.prepare_cli", "split a corpus into N aligned WebDataset sub-datasets"),
    "train": ("subspectral.train.cli", "train one sub-network per sub-dataset"),
    "ensemble-eval": ("subspectral.train.ensemble.cli", "evaluate the ensemble of trained members"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'cli.py COMMAND --help' for the options of each command.",
    )
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


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Batch schedulers pre-empt with SIGTERM: unwind normally (Ray shut down, files closed; every
    # output is written atomically), so rerunning the same command resumes where this one stopped.
    message = f"{signal.Signals(signum).name} received: stopped; rerun the same command to resume"
    stopping.request(message)  # in case the exception below lands where Python drops it
    raise SystemExit(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
