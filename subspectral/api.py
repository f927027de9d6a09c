"""The Python API: the three commands as functions that return result objects.

    import logging, subspectral
    logging.basicConfig(level=logging.INFO)                       # to see the messages
    data = subspectral.prepare("data/sample-sub36", shard_size=100)  # the embedded sample corpus
    member = subspectral.train_member(data.out, shard=7, config="sample", out="runs", epochs=4, device="cpu")
    ensemble = subspectral.ensemble_eval(data.out, "runs", members=[7], device="cpu")

Each function takes the command's options as keyword arguments, named as on the command line with
``_`` for ``-`` (``--val-per-class 20`` is ``val_per_class=20``), with the same defaults: the
defaults come from the command's own argument definitions, so the two cannot drift apart. Unlike the
command line, the functions install no signal handler, configure no logging and print nothing:
messages go to the ``subspectral`` logger, and a bad input raises ``ValueError`` (storage failures:
``OSError``) with the one-line message the command would print.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("subspectral")


def _options(module_name: str, required: dict[str, Any], given: dict[str, Any]) -> argparse.Namespace:
    """The command's parsed defaults, with ``required`` and ``given`` set: one source of defaults."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'help'}))}")
    args = parser.parse_args([arg for name, value in required.items() for arg in (f"--{name}", str(value))])
    for name, value in {**required, **given}.items():
        setattr(args, name, value)
    return args


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` made: the dataset's URI and its card (dataset.json); for a dry run, the plan."""

    out: str
    card: dict[str, Any]
    summary: dict[str, Any]  # the card plus run timings; the planned counts for a dry run


def prepare(out: str | Path, src: str | Path | list[str | Path] | None = None, **options: Any) -> PrepareResult:
    """``cli.py prepare``: ``src`` (a path or URI, a list of them, or None for the embedded sample) into ``out``."""
    from subspectral.pipeline.distributor import default_workers
    from subspectral.pipeline.prepare import prepare as run_prepare
    from subspectral.pipeline.prepare_cli import options_from_args

    sources = None if src is None else [str(s) for s in (src if isinstance(src, (list, tuple)) else [src])]
    args = _options("subspectral.pipeline.prepare_cli", {"out": str(out)}, {**options, "src": sources})
    prepared = options_from_args(args)
    workers = args.num_workers or default_workers()
    summary = run_prepare(prepared, num_workers=workers, ray_address=args.ray_address, dry_run=args.dry_run,
                          executor=args.executor, log=log.info)
    card = {} if args.dry_run else {k: v for k, v in summary.items() if k != "run"}
    return PrepareResult(prepared.out, card, summary)


@dataclass(frozen=True)
class TrainResult:
    """One trained member: its run folder and its final.json content."""

    shard: int
    run_dir: Path
    final: dict[str, Any]


def train_member(data: str | Path, shard: int = 0, **options: Any) -> TrainResult:
    """``cli.py train --shard K``: member ``shard`` of the prepared dataset ``data``.

    ``config`` is a recipe name or YAML path, ``overrides`` a list of ``section.key=value`` strings.
    """
    from subspectral.train.cli import backend
    from subspectral.train.config import apply_overrides, load_recipe
    from subspectral.train.run import TrainOptions
    from subspectral.train.storage import join

    overrides = list(options.pop("overrides", []))
    options.setdefault("no_progress", not options.pop("progress", False))
    args = _options("subspectral.train.cli", {"data": str(data)}, {**options, "shard": str(int(shard))})
    recipe = apply_overrides(load_recipe(args.config), overrides)
    if args.epochs is not None:
        apply_overrides(recipe, [f"schedule.epochs={args.epochs}"])
    request = TrainOptions(data=args.data, out=Path(args.out), resume=args.resume, progress=not args.no_progress,
                           device=args.device, device_target=args.device_target, mode=args.mode)
    done = backend(args.backend)(request, recipe, args.shard)
    final = done.results[int(shard)]
    return TrainResult(int(shard), Path(join(str(request.out), _run_folder(args.data, int(shard)))), final)


def _run_folder(data: str, shard: int) -> str:
    """Member ``shard``'s folder name in a runs folder (the card's sub-dataset name)."""
    from subspectral.train.prepared import read_card

    return read_card(data).sub_datasets[shard]


@dataclass(frozen=True)
class EnsembleResult:
    """What ``ensemble_eval`` wrote: report.json's content and the paths of the four outputs."""

    report: dict[str, Any]  # docs/ensemble.md, "Outputs"
    out: Path  # the report folder
    report_json: Path
    report_md: Path
    plot: Path  # accuracy_vs_members.png
    predictions: Path  # predictions.parquet

    @property
    def methods(self) -> dict[str, dict[str, float]]:
        """``{method: {"top1", "top5"}}`` of the whole ensemble, as fractions."""
        return self.report["methods"]


def ensemble_eval(data: str | Path, runs: str | Path, **options: Any) -> EnsembleResult | None:
    """``cli.py ensemble-eval``: the ensemble of the finished members in ``runs`` on ``data``'s val split.

    ``members`` is a list of shard indices (or the command's ``"0,1,3"``); ``out`` defaults to
    ``runs/ensemble``. The missing-members line goes to the log. Launched by torchrun, each worker
    calls it and only the main worker gets the result (the others get None).
    """
    from subspectral.train.ensemble.cli import evaluate_ensemble

    members = options.get("members")
    if isinstance(members, (list, tuple)):
        options["members"] = ",".join(str(int(k)) for k in members)
    for name in ("out", "baseline"):
        if options.get(name) is not None:
            options[name] = Path(options[name])
    args = _options("subspectral.train.ensemble.cli", {"data": str(data), "runs": Path(runs)}, options)
    evaluation = evaluate_ensemble(args, notify=log.warning, progress_bar=False)
    if evaluation is None:
        return None
    files = evaluation.files
    return EnsembleResult(evaluation.report, evaluation.out, files["report.json"], files["report.md"],
                          files["accuracy_vs_members.png"], files["predictions.parquet"])
