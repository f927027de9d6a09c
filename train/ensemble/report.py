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
    """predictions.parquet: key, label, shard, each method's top-k, each member's top-1 [, baseline]."""

    def __init__(self, path: Path, methods: Sequence[str], member_folders: Sequence[str], baseline: bool,
                 shard_of: Callable[[np.ndarray], np.ndarray] = np.asarray):
        """``shard_of`` maps shard indices in the worker's own shard list to the dataset's."""
        fields = [pa.field("key", pa.string()), pa.field("label", pa.int32()), pa.field("shard", pa.int32())]
        fields += [pa.field(column_name(m), pa.list_(pa.int32())) for m in methods]
        fields += [pa.field(member_column(f), pa.int32()) for f in member_folders]
        if baseline:
            fields.append(pa.field(column_name("baseline"), pa.list_(pa.int32())))
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
        """``ranked[method]`` is ``[B, k]`` (and ``ranked["baseline"]`` if any); ``member_top1`` is
        ``[M, B]`` in the order of ``member_folders``."""
        columns: dict[str, Any] = {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "shard": pa.array(self.shard_of(shards).astype(np.int32)),
        }
        with_baseline = column_name("baseline") in self.schema.names
        for method in self.methods + (["baseline"] if with_baseline else []):
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


def build_report(
    tally: Tally,
    members: Sequence[dict[str, Any]],
    baseline: tuple[dict[str, Any], Hits] | None,
    context: dict[str, Any],
) -> dict[str, Any]:
    """The report.json content.

    ``members`` (rank order) carry shard, folder, path, backend and val_top1_own (final.json's top1,
    as the trainer wrote it: percent); ``baseline`` is (its description, its hits); ``context``
    names the data, runs and options and is stored as given.
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
        "baseline": None if baseline is None else {**baseline[0], **_accuracy(baseline[1], samples)},
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
        lines.append(
            f"| baseline split 1{' (10-crop)' if base['ten_crop'] else ''} | | {_percent(base['top1'])} "
            f"| {_percent(base['top5'])} |"
        )
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
    return "\n".join(lines) + "\n"


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
