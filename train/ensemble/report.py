"""Outputs of ``cli.py ensemble-eval``: report.json, report.md, accuracy_vs_members.png and
predictions.parquet (streamed: one row group per batch, so the val set is never held in memory).

Accuracies measured here are fractions in report.json and percentages in report.md; a member's own
val accuracy (``val_top1_own``) is copied from its final.json, where the trainer writes percent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from subspectral.train.ensemble.fusion import Hits, Tally


def column_name(method: str) -> str:
    """Parquet column of a method's ranked classes (``mean-logits`` → ``mean_logits_topk``)."""
    return f"{method.replace('-', '_')}_topk"


def member_column(folder_name: str) -> str:
    """Parquet column of a member's top-1 (``sub-03`` → ``sub_03_top1``)."""
    return f"{folder_name.replace('-', '_')}_top1"


class PredictionWriter:
    """predictions.parquet: key, label, shard, each method's top-k, each member's top-1 [, baseline views]."""

    def __init__(self, path: Path, methods: Sequence[str], member_folders: Sequence[str],
                 baseline_views: Sequence[str] = (), shard_of: Callable[[np.ndarray], np.ndarray] = np.asarray):
        """``baseline_views``: the baseline's columns (``baseline``, ``baseline_one_crop``); ``shard_of`` maps
        shard indices in the worker's own shard list to the dataset's."""
        fields = [pa.field("key", pa.string()), pa.field("label", pa.int32()), pa.field("shard", pa.int32())]
        fields += [pa.field(column_name(m), pa.list_(pa.int32())) for m in methods]
        fields += [pa.field(member_column(f), pa.int32()) for f in member_folders]
        fields += [pa.field(column_name(view), pa.list_(pa.int32())) for view in baseline_views]
        self.baseline_views = list(baseline_views)
        self.methods = list(methods)
        self.shard_of = shard_of
        self.member_folders = list(member_folders)
        self.schema = pa.schema(fields)
        self._writer = pq.ParquetWriter(path, self.schema)

    def write(
        self,
        keys: Sequence[str],
        labels: np.ndarray,
        shards: np.ndarray,
        ranked: dict[str, np.ndarray],
        member_top1: np.ndarray,
    ) -> None:
        """``ranked[method]`` is ``[B, k]`` (and ``ranked[view]`` for each baseline view); ``member_top1``
        is ``[M, B]`` in the order of ``member_folders``."""
        columns: dict[str, Any] = {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "shard": pa.array(self.shard_of(shards).astype(np.int32)),
        }
        for method in self.methods + self.baseline_views:
            top_k = ranked[method].astype(np.int32)
            offsets = np.arange(0, top_k.size + 1, top_k.shape[1], dtype=np.int32)
            columns[column_name(method)] = pa.ListArray.from_arrays(offsets, top_k.ravel())
        for folder, top1 in zip(self.member_folders, member_top1, strict=True):
            columns[member_column(folder)] = pa.array(top1.astype(np.int32))
        self._writer.write_table(pa.table(columns, schema=self.schema))

    def close(self) -> None:
        self._writer.close()


def merge_prediction_parts(parts: Sequence[Path], path: Path) -> None:
    """One predictions.parquet from the workers' parts, in shard order (each val shard is evaluated
    by exactly one worker and keeps its sample order; the sort is stable), then the parts removed."""
    table = pa.concat_tables([pq.read_table(part) for part in parts])
    pq.write_table(table.take(table["shard"].to_numpy().argsort(kind="stable")), path)
    for part in parts:
        part.unlink()


def _accuracy(hits: Hits, samples: int) -> dict[str, float]:
    return {"top1": hits.top1 / samples, "top5": hits.topk / samples}


COST_FIELDS = ("parameters", "size_mb", "train_seconds", "peak_rss_bytes")


def member_cost(final: dict[str, Any]) -> dict[str, Any]:
    """A member's size and training cost from its final.json (None where a run predates the field).

    ``size_mb`` is the float32 weights in MB of 2**20 bytes, the unit of the seed's "ResNet-34 83.15 MB"
    (21.8 M parameters); ``train_seconds`` covers training and validation of every epoch."""
    size = final.get("parameter_bytes")
    return {"parameters": final.get("parameters"), "size_mb": None if size is None else size / 2**20,
            "train_seconds": final.get("train_seconds"), "peak_rss_bytes": final.get("peak_rss_bytes")}


def _combine(rows: Sequence[dict[str, Any]], how: Callable[[list[float]], float]) -> dict[str, Any]:
    """``how`` over the members' cost fields; None when any member lacks one."""
    out = {}
    for key in COST_FIELDS:
        values = [row[key] for row in rows]
        out[key] = None if not values or None in values else how(values)
    return out


def ensemble_cost(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cost of the ensemble: parameters and size summed; training time summed (one machine trains the
    members in turn) and its max (one machine per member); peak memory of the largest member."""
    summed = _combine(members, sum)
    largest = _combine(members, max)
    return {**summed, "train_seconds_max": largest["train_seconds"], "peak_rss_bytes": largest["peak_rss_bytes"]}


def build_report(
    tally: Tally,
    members: Sequence[dict[str, Any]],
    baseline: tuple[dict[str, Any], dict[str, Hits]] | None,
    context: dict[str, Any],
) -> dict[str, Any]:
    """The report.json content.

    ``members`` (rank order) carry shard, folder, path, backend, val_top1_own (final.json's top1,
    as the trainer wrote it: percent) and their ``member_cost``; ``baseline`` is (its description with
    its ``member_cost``, its hits per view: ``baseline`` as tested, ``baseline_one_crop`` besides 10-crop);
    ``context`` names the data, runs and options and is stored as given.
    """
    samples = tally.samples
    member_rows = [
        {**info, "rank": rank, **_accuracy(hits, samples)}
        for rank, (info, hits) in enumerate(zip(members, tally.members, strict=True))
    ]
    curve = {
        method: [
            {"members": n + 1, "shards": [m["shard"] for m in members[: n + 1]], **_accuracy(hits, samples)}
            for n, hits in enumerate(tally.curve[method])
        ]
        for method in tally.methods
    }
    baseline_row = None
    if baseline is not None:
        info, hits = baseline
        tested = _accuracy(hits["baseline"], samples)
        one_crop = _accuracy(hits["baseline_one_crop"], samples) if "baseline_one_crop" in hits else tested
        baseline_row = {**info, **tested, "one_crop": one_crop}
    costs = [{key: row[key] for key in COST_FIELDS} for row in member_rows]
    return {
        **context,
        "samples": samples,
        "top_k": tally.k,
        "members": member_rows,
        "mean_member": {
            key: float(np.mean([row[key] for row in member_rows])) for key in ("top1", "top5")
        },
        "methods": {method: _accuracy(tally.fused(method), samples) for method in tally.methods},
        "accuracy_vs_members": curve,
        "baseline": baseline_row,
        "cost": {
            "mean_member": _combine(costs, lambda values: float(np.mean(values))),
            "ensemble": ensemble_cost(costs),
            "baseline": None if baseline is None else {key: baseline[0].get(key) for key in COST_FIELDS},
        },
    }


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A table a person reads: members, mean member, each method, baseline; then the curve."""
    k = report["top_k"]
    lines = [
        "# Ensemble evaluation",
        "",
        f"Data `{report['data']}` (split {report['split']}, {report['num_classes']} classes, "
        f"{report['samples']} val samples); runs `{report['runs']}`.",
        "",
        f"| model | own val top-1 | top-1 % | top-{k} % |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["members"]:
        lines.append(
            f"| member {row['folder']} (rank {row['rank']}) | {row['val_top1_own']:.2f} "
            f"| {_percent(row['top1'])} | {_percent(row['top5'])} |"
        )
    mean = report["mean_member"]
    lines.append(f"| mean member | | {_percent(mean['top1'])} | {_percent(mean['top5'])} |")
    for method, acc in report["methods"].items():
        label = f"geo (p = {report['p']})" if method == "geo" else method
        top1, top5 = _percent(acc["top1"]), _percent(acc["top5"])
        lines.append(f"| **ensemble: {label}** | | **{top1}** | **{top5}** |")
    if report["baseline"] is not None:
        base = report["baseline"]
        one = base["one_crop"]
        lines.append(f"| baseline split 1 | {base['val_top1_own']:.2f} | {_percent(one['top1'])} "
                     f"| {_percent(one['top5'])} |")
        if base["ten_crop"]:
            lines.append(f"| baseline split 1 (10-crop) | | {_percent(base['top1'])} | {_percent(base['top5'])} |")
    if report["missing"]:
        lines += ["", f"Missing members (not evaluated): {', '.join(report['missing'])}."]
    methods = list(report["accuracy_vs_members"])
    lines += [
        "",
        "## Top-1 % against the number of members (best own val accuracy first)",
        "",
        "| members | " + " | ".join(methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for n in range(len(report["members"])):
        cells = [_percent(report["accuracy_vs_members"][m][n]["top1"]) for m in methods]
        lines.append(f"| {n + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + cost_table(report)) + "\n"


def _count(value: float | None, times: int = 1) -> str:
    if value is None:
        return "—"
    text = f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,.0f}"
    return text + (f" × {times}" if times > 1 else "")


def _mb(value: float | None, times: int = 1) -> str:
    return "—" if value is None else f"{value:.2f}" + (f" × {times}" if times > 1 else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _memory(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f} MiB"


def cost_table(report: dict[str, Any]) -> list[str]:
    """The seed's comparison: accuracy, model size and training time side by side, per model."""
    lines = [
        "## Accuracy, size and training time",
        "",
        "Size: float32 weights in MB of 2^20 bytes. Training time: training and validation of every epoch, as "
        "the trainer measured it; for the ensemble summed over members (trained in turn on one machine) and "
        "the longest member (one machine each). Peak memory: resident set of the training process.",
        "",
        "| model | top-1 % | parameters | size MB | training time | peak memory |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cost = report["cost"]
    if report["baseline"] is not None:
        base, base_cost = report["baseline"], cost["baseline"]
        views = [("baseline split 1", base["one_crop"])]
        if base["ten_crop"]:
            views.append(("baseline split 1 (10-crop)", base))
        for label, accuracy in views:
            lines.append(f"| {label} | {_percent(accuracy['top1'])} | {_count(base_cost['parameters'])} "
                         f"| {_mb(base_cost['size_mb'])} | {_duration(base_cost['train_seconds'])} "
                         f"| {_memory(base_cost['peak_rss_bytes'])} |")
    for row in report["members"]:
        lines.append(f"| member {row['folder']} | {_percent(row['top1'])} | {_count(row['parameters'])} "
                     f"| {_mb(row['size_mb'])} | {_duration(row['train_seconds'])} "
                     f"| {_memory(row['peak_rss_bytes'])} |")
    mean = cost["mean_member"]
    lines.append(f"| mean member | {_percent(report['mean_member']['top1'])} | {_count(mean['parameters'])} "
                 f"| {_mb(mean['size_mb'])} | {_duration(mean['train_seconds'])} "
                 f"| {_memory(mean['peak_rss_bytes'])} |")
    ensemble, count = cost["ensemble"], len(report["members"])
    per_member = {key: None if ensemble[key] is None else ensemble[key] / count for key in ("parameters", "size_mb")}
    time_text = f"{_duration(ensemble['train_seconds'])} serial, {_duration(ensemble['train_seconds_max'])} parallel"
    for method, accuracy in report["methods"].items():
        label = f"geo (p = {report['p']})" if method == "geo" else method
        lines.append(f"| **ensemble: {label}**, {count} members | **{_percent(accuracy['top1'])}** "
                     f"| {_count(per_member['parameters'], count)} | {_mb(per_member['size_mb'], count)} "
                     f"| {time_text} | {_memory(ensemble['peak_rss_bytes'])} |")
    return lines


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """accuracy_vs_members.png: top-1 per method against members added best first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, points in report["accuracy_vs_members"].items():
        axes.plot([p["members"] for p in points], [100 * p["top1"] for p in points], marker="o", label=method)
    axes.axhline(100 * report["mean_member"]["top1"], color="grey", linestyle=":", label="mean member")
    if report["baseline"] is not None:
        baseline_top1 = 100 * report["baseline"]["top1"]
        axes.axhline(baseline_top1, color="black", linestyle="--", label="baseline (split 1)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("members (best own val accuracy first)")
    axes.set_ylabel("top-1 %")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_reports(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md and accuracy_vs_members.png in ``out``."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot_curve(report, out / "accuracy_vs_members.png")
