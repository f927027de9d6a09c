"""Evaluate the ensemble of trained members on the aligned val sub-datasets.

    python cli.py ensemble-eval --data data/sample --runs runs
    python cli.py ensemble-eval --data DATA --runs RUNS --members 0,1,3 --method geo --p 0.3
    python cli.py ensemble-eval --data DATA --runs RUNS --baseline RUNS_SPLIT1/sub-00 --ten-crop

Member k (RUNS/sub-KK, finished when final.json exists) sees sub-image k of every val image; the
N val sub-datasets are read in lockstep and the members' outputs fused per image by mean of logits,
mean of probabilities, geo (rank i by own val accuracy gets p·(1−p)^i) and majority vote.
Writes report.json, report.md, accuracy_vs_members.png and predictions.parquet to --out
(default RUNS/ensemble) and prints the table. Missing members are listed and the rest evaluated
(--require-all refuses instead); members trained on other data are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy modules are imported inside run() only, so --help stays instant
    import numpy as np
    import torch
    from subspectral.schemas import DatasetCard
    from subspectral.train.distributed import DistInfo
    from subspectral.train.ensemble.fusion import Hits, Tally
    from subspectral.train.ensemble.lockstep import Lockstep, LockstepBatch, Stream
    from subspectral.train.ensemble.members import FinishedRun, Member
    from subspectral.train.ensemble.report import PredictionWriter

METHOD_CHOICES = ("mean-logits", "mean-probs", "geo", "vote", "all")
TEN_CROP_FRACTION = 0.875


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="prepared dataset (folder or URI) the members were trained on")
    parser.add_argument("--runs", required=True, type=Path, help="runs folder holding sub-KK/ member runs")
    parser.add_argument("--members", default=None,
                        help="comma-separated shard indices to ensemble, e.g. 0,1,3 (default: all N)")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="all",
                        help="fusion rule to report (default: all of them)")
    parser.add_argument("--p", type=float, default=0.3, help="geo: rank i gets p*(1-p)^i (default: 0.3)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="run folder of a member trained on the --split 1 dataset of the same classes")
    parser.add_argument("--ten-crop", action="store_true",
                        help=f"10-crop testing for the baseline: crops of {100 * TEN_CROP_FRACTION:g}%% of "
                             "each side, corners + centre and their flips, resized back")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RUNS/ensemble)")
    parser.add_argument("--require-all", action="store_true", help="fail when a selected member is missing")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--fuse", type=int, default=1, metavar="K",
                        help="run torch members of one architecture K at a time as one grouped network, one "
                             "forward pass per batch, meant for a GPU (default: 1, each member on its own: "
                             "fusing is slower on a CPU and not yet measured on a GPU)")
    parser.add_argument("--prefetch", type=int, default=2,
                        help="batches read and decoded ahead in a background thread while the members run "
                             "(0: read in turn with the forward passes; default: 2)")


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation wrote: the report (report.json's content) and the files in ``out``."""

    report: dict[str, Any]
    out: Path

    @property
    def files(self) -> dict[str, Path]:
        """report.json, report.md, accuracy_vs_members.png and predictions.parquet by name."""
        return {name: self.out / name for name in REPORT_FILES}


REPORT_FILES = ("report.json", "report.md", "accuracy_vs_members.png", "predictions.parquet")


@dataclass
class Baseline:
    """The split-1 model: its member, its val stream and how it is tested."""

    member: Member
    stream: Stream
    ten_crop: bool
    info: dict[str, Any]

    @property
    def views(self) -> tuple[str, ...]:
        """Its columns and accuracies: ``baseline`` as tested (10-crop with --ten-crop), and the single
        crop beside a 10-crop test, so the report compares both."""
        return ("baseline", "baseline_one_crop") if self.ten_crop else ("baseline",)


def parse_members(text: str | None, split: int) -> list[int]:
    from subspectral.train.ensemble.members import MemberError

    if text is None:
        return list(range(split))
    try:
        shards = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise MemberError(f"--members must be comma-separated integers, got {text!r}") from error
    bad = [k for k in shards if not 0 <= k < split]
    if bad or not shards or len(set(shards)) != len(shards):
        raise MemberError(f"--members {text!r}: need distinct shard indices in 0..{split - 1}")
    return shards


def resolve_device(name: str | None) -> torch.device:
    import torch
    from subspectral.train.ensemble.members import MemberError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise MemberError(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemberError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_baseline(path: Path, card: DatasetCard, ten_crop: bool, device: torch.device) -> Baseline:
    """The split-1 member, checked against the ensemble's classes, with its own dataset's val stream."""
    from subspectral.train.ensemble.lockstep import Stream
    from subspectral.train.ensemble.members import MemberError, check_compatible, load_member, read_run
    from subspectral.train.ensemble.report import member_cost
    from subspectral.train.prepared import read_card, read_shard_table, shard_digests, shard_uris
    from subspectral.train.storage import absolute_uri

    run = read_run(path)
    data = run.record.data  # recorded as an absolute path or a URI: valid from any directory
    baseline_card = read_card(data)
    if baseline_card.split != 1:
        raise MemberError(f"--baseline {path} was trained on {data} with split {baseline_card.split}, not 1")
    if baseline_card.class_table_sha256 != card.class_table_sha256:
        raise MemberError(f"--baseline {path}: {data} has another class table than the ensemble's data")
    check_compatible(run, baseline_card, data)
    stream = Stream(f"baseline {data}", shard_uris(data, baseline_card, 0, "val"), baseline_card.sample_shape,
                    baseline_card.dtype, shard_digests(data, baseline_card, read_shard_table(data), 0, "val"))
    info = {"path": absolute_uri(str(path)), "data": data, "ten_crop": ten_crop,
            "crop_fraction": TEN_CROP_FRACTION if ten_crop else None, "val_top1_own": run.val_top1,
            **member_cost(run.final)}
    return Baseline(load_member(run, device), stream, ten_crop, info)


def baseline_logits(baseline: Baseline, images: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Logits per view of ``baseline.views``."""
    import torch
    from subspectral.train.ensemble.fusion import ten_crop

    one_crop = baseline.member.predict(images)
    if not baseline.ten_crop:
        return {"baseline": one_crop}
    views = ten_crop(torch.from_numpy(images).to(device), TEN_CROP_FRACTION)
    return {"baseline": torch.stack([baseline.member.predict(view) for view in views]).mean(dim=0),
            "baseline_one_crop": one_crop}


def check_labels(keys: list[str], labels: np.ndarray, num_classes: int) -> None:
    """A label outside the card's classes means the shards are not the card's: refused, as the trainer does."""
    import numpy as np
    from subspectral.train.storage import DataError

    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise DataError(f"val sample {keys[first]!r} has label {int(labels[first])}, outside the {num_classes} "
                        f"classes of the dataset card (0..{num_classes - 1})")


def evaluate(members: list[Member], batches: Iterable[LockstepBatch], tally: Tally, writer: PredictionWriter,
             baseline: Baseline | None, device: torch.device, progress: Any, num_classes: int,
             predict: Callable[[list[np.ndarray]], Iterable[torch.Tensor]] | None = None) -> dict[str, Hits]:
    """Run every batch through the members (rank order), tally it and stream its predictions.

    Each member's logits are fused as soon as they are computed (``BatchFusion``), so one member's
    ``[B, C]`` logits are held at a time, not all M. ``batches`` hold the members' streams in order,
    then the baseline's; returns the baseline's Hits per view (empty without a baseline). ``progress`` is a tqdm bar.
    ``predict(images)``: the members' logits in rank order (train/fused_predict.py runs members fused,
    holding one group's logits at a time); by default each member's own ``predict``.
    """
    import torch
    from subspectral.train.ensemble.fusion import BatchFusion, Hits, top_k_classes

    baseline_hits = {view: Hits() for view in baseline.views} if baseline is not None else {}
    for batch in batches:
        check_labels(batch.keys, batch.labels, num_classes)
        labels = torch.from_numpy(batch.labels).to(device)
        fusion = BatchFusion(tally, labels)
        if predict is None:
            outputs = (member.predict(images) for member, images in zip(members, batch.images, strict=False))
        else:
            outputs = predict(batch.images)
        for logits in outputs:
            fusion.add(logits)
        ranked = fusion.finish()
        if baseline is not None:
            for view, logits in baseline_logits(baseline, batch.images[-1], device).items():
                ranked[view] = top_k_classes(logits, tally.k)
                baseline_hits[view].add(ranked[view], labels)
        on_host = {name: value.cpu().numpy() for name, value in ranked.items()}
        writer.write(batch.keys, batch.labels, batch.shards, on_host, on_host["members"][:, :, 0])
        progress.update(len(batch.keys))
    return baseline_hits


def select_runs(
    args: argparse.Namespace, card: DatasetCard, notify: Callable[[str], None] | None = None
) -> tuple[list[FinishedRun], list[int]]:
    """The finished, compatible runs among --members, best own val accuracy first; and the missing
    (``notify`` gets the line naming them, as soon as they are known)."""
    from subspectral.train.ensemble.fusion import rank_members
    from subspectral.train.ensemble.members import MemberError, check_compatible, discover_runs

    if not args.runs.is_dir():
        raise MemberError(f"--runs {args.runs}: no such folder")
    folders = card.sub_datasets
    runs, missing = discover_runs(args.runs, folders, parse_members(args.members, card.split))
    if missing:
        listed = ", ".join(folders[k] for k in missing)
        if args.require_all:
            raise MemberError(f"--require-all: no finished run (final.json) in {args.runs} for {listed}")
        if notify is not None:
            notify(f"ensemble-eval: missing members, not evaluated: {listed}")
    if not runs:
        raise MemberError(f"no finished member run (sub-KK/final.json) in {args.runs}")
    for run in runs:
        check_compatible(run, card, args.data)
    return [runs[i] for i in rank_members([r.val_top1 for r in runs], [r.shard for r in runs])], missing


def reduce_over_workers(
    tally: Tally, lockstep: Lockstep, baseline_hits: dict[str, Hits], device: torch.device
) -> None:
    """Sum every counter over the torchrun workers (exact: integers in float64), in place."""
    from subspectral.train.distributed import all_reduce_sum

    extra = [lockstep.skipped] + [count for hits in baseline_hits.values() for count in (hits.top1, hits.topk)]
    counts = tally.counts()
    summed = [round(v) for v in all_reduce_sum([float(c) for c in counts + extra], device)]
    tally.set_counts(summed[: len(counts)])
    lockstep.skipped = summed[len(counts)]
    for index, hits in enumerate(baseline_hits.values()):
        hits.top1, hits.topk = summed[len(counts) + 1 + 2 * index : len(counts) + 3 + 2 * index]


def _evaluate(args: argparse.Namespace, card: DatasetCard, device: torch.device, workers: DistInfo,
              notify: Callable[[str], None] | None, progress_bar: bool) -> Evaluation | None:
    """One worker's part of the evaluation; the main worker merges, writes the report and returns
    it (the other workers return None).

    With torchrun, worker r evaluates val shards r, r+W, r+2W, … of every stream and writes its
    own predictions part; counters are summed with an all-reduce and the parts merged in shard order,
    so the result equals a single-process run.
    """
    import torch
    from subspectral.train.distributed import barrier
    from subspectral.train.ensemble.fusion import METHODS, Tally
    from subspectral.train.ensemble.lockstep import Lockstep, Stream, prefetch
    from subspectral.train.ensemble.members import load_member
    from subspectral.train.ensemble.report import (
        PredictionWriter,
        build_report,
        member_cost,
        merge_prediction_parts,
        write_reports,
    )
    from subspectral.train.fused_predict import MemberPredictor
    from subspectral.train.prepared import read_shard_table, shard_digests, shard_uris
    from subspectral.train.storage import DataError, absolute_uri
    from tqdm import tqdm

    started = time.perf_counter()
    data = absolute_uri(args.data)
    folders = card.sub_datasets
    runs, missing = select_runs(args, card, notify if workers.is_main else None)
    members = [load_member(run, device) for run in runs]
    predict = MemberPredictor(members, device, args.fuse)  # train/fused_predict.py
    baseline = None if args.baseline is None else load_baseline(args.baseline, card, args.ten_crop, device)
    shard_table = read_shard_table(data)
    streams = [
        Stream(folders[r.shard], shard_uris(data, card, r.shard, "val"), card.sample_shape, card.dtype,
               shard_digests(data, card, shard_table, r.shard, "val"))
        for r in runs
    ] + ([baseline.stream] if baseline else [])
    lockstep = Lockstep([s.part(workers.rank, workers.world) for s in streams], args.batch_size)

    methods = METHODS if args.method == "all" else (args.method,)
    tally = Tally(num_members=len(members), methods=methods, p=args.p, k=min(5, card.num_classes))
    out = args.out or args.runs / "ensemble"
    out.mkdir(parents=True, exist_ok=True)
    part = out / (f"predictions.part{workers.rank:03d}.parquet" if workers.enabled else "predictions.part")
    writer = PredictionWriter(part, methods, [folders[r.shard] for r in runs], baseline.views if baseline else (),
                              shard_of=lambda local: workers.rank + workers.world * local)
    total = card.splits["val"].samples
    progress = tqdm(total=total, unit="img", desc="ensemble-eval",
                    disable=None if workers.is_main and progress_bar else True)
    try:
        # closing(): a failure in a member stops the reading thread at once, not when collected.
        with progress, torch.inference_mode(), contextlib.closing(prefetch(lockstep, args.prefetch)) as batches:
            baseline_hits = evaluate(members, batches, tally, writer, baseline, device, progress,
                                     card.num_classes, predict)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)  # no half-written predictions left behind
        raise
    writer.close()
    if workers.enabled:
        reduce_over_workers(tally, lockstep, baseline_hits, device)
        barrier()
        if not workers.is_main:
            return None
    if tally.samples == 0:
        raise DataError(f"{data}: no readable val sample ({lockstep.skipped} skipped)")
    if workers.enabled:
        merge_prediction_parts([out / f"predictions.part{r:03d}.parquet" for r in range(workers.world)],
                               out / "predictions.parquet")
    else:
        part.replace(out / "predictions.parquet")

    seconds = time.perf_counter() - started
    context = {
        "data": data,
        "runs": absolute_uri(str(args.runs)),
        "card_sha256": card.sha256,
        "split": card.split,
        "num_classes": card.num_classes,
        "transform": card.transform,
        "format": card.format,
        "class_table_sha256": card.class_table_sha256,
        "p": args.p,
        "missing": [folders[k] for k in missing],
        "skipped": lockstep.skipped,
        "device": str(device),
        "workers": workers.world,
        "seconds": round(seconds, 3),
    }
    member_info = [
        {"shard": r.shard, "folder": folders[r.shard], "path": absolute_uri(str(r.path)), "backend": r.backend,
         "val_top1_own": r.val_top1, **member_cost(r.final)}
        for r in runs
    ]
    baseline_result = None if baseline is None else (baseline.info, baseline_hits)
    report = build_report(tally, member_info, baseline_result, context)
    write_reports(report, out)
    return Evaluation(report, out)


def evaluate_ensemble(args: argparse.Namespace, notify: Callable[[str], None] | None = None,
                      progress_bar: bool = True) -> Evaluation | None:
    """The evaluation ``args`` (this command's options) describe; prints nothing itself. Checks that
    need no member, then the device and (under torchrun) the process group; None on the workers
    other than the main one. Bad input raises ``ValueError`` (``DataError``, ``MemberError``,
    ``MisalignedError``) with a one-line message; storage failures ``OSError``."""
    import torch
    from subspectral.train.distributed import init_distributed, shutdown
    from subspectral.train.ensemble.members import MemberError
    from subspectral.train.prepared import has_split, read_card
    from subspectral.train.storage import DataError

    card = read_card(args.data)
    if not has_split(card, "val") or not card.splits["val"].samples:
        raise DataError(f"{args.data} has no val split, and ensemble-eval evaluates the members on it: prepare "
                        "the dataset with --val-per-class N (N val images per class, e.g. 10), then train on it")
    if args.batch_size < 1:
        raise MemberError("--batch-size must be at least 1")
    if args.fuse < 1:
        raise MemberError("--fuse must be at least 1 (1: each member on its own)")
    if args.prefetch < 0:
        raise MemberError("--prefetch must be 0 or more")
    if not 0.0 < args.p < 1.0:
        raise MemberError(f"--p must lie strictly between 0 and 1, got {args.p}")
    if args.ten_crop and args.baseline is None:
        raise MemberError("--ten-crop tests the --baseline model: give --baseline RUN_DIR too")
    device = resolve_device(args.device)
    workers = init_distributed(device.type)
    if workers.enabled and device.type == "cuda":
        device = torch.device("cuda", workers.local_rank)
    try:
        return _evaluate(args, card, device, workers, notify, progress_bar)
    finally:
        shutdown()


def run(args: argparse.Namespace) -> int:
    from subspectral.train.ensemble.lockstep import MisalignedError
    from subspectral.train.ensemble.members import MemberError
    from subspectral.train.ensemble.report import render_markdown
    from subspectral.train.storage import DataError

    try:
        evaluation = evaluate_ensemble(args, notify=lambda line: print(line, file=sys.stderr))
    except (DataError, MemberError, MisalignedError) as error:
        print(f"ensemble-eval: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a store that cannot be reached or read: endpoint, network, credentials
        print(f"ensemble-eval: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if evaluation is not None:  # the main worker
        report = evaluation.report
        print(render_markdown(report))
        print(f"ensemble-eval: {report['samples']} images, {len(report['members'])} members in "
              f"{report['seconds']:.1f}s on {report['device']} ({report['workers']} worker(s)); wrote "
              f"{evaluation.out}/report.json, report.md, accuracy_vs_members.png, predictions.parquet")
    return 0
