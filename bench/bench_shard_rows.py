"""Driver CPU per shard task built (``Plan.shard_rows``) as the plan grows: rows x shards or rows alone?

Plans a synthetic list file (``bench_scale.write_list``: 19,167 classes, the 21K-P filters) and builds the
rows of the first shards twice per round, with ``take_rows`` as shipped and with Arrow's ``Table.take`` on the
same (chunked) input table, alternating. Prints the medians in ms per shard; CPU time of this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).with_name("bench_scale.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_of(rows: int, shard_size: int, work: Path):
    from subspectral.pipeline import plan as plan_module
    from subspectral.pipeline.distributor import run_serial
    from subspectral.pipeline.listing import plan_units
    from subspectral.pipeline.prepare import _listing
    from subspectral.pipeline.prepare_cli import add_arguments, options_from_args

    scale = _bench_scale()
    listing = scale.write_list(work / f"list-{rows}.csv", rows)
    minimum, val = scale.filters(rows)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--src", str(listing), "--out", str(work / "out"), "--min-per-class",
                                                   str(minimum), "--val-per-class", str(val),
                                                   "--shard-size", str(shard_size)]))
    units, top_rejects = plan_units(list(options.sources), options.layout)
    inputs, _ = _listing(options, units, top_rejects, None, run_serial)
    return plan_module.make_plan(inputs, options.plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000000,3000000,6000000")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=10, help="shards built per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subspectral-bench" / "shard-rows")
    args = parser.parse_args()
    from subspectral.pipeline import plan as plan_module

    shipped = plan_module.take_rows
    variants = {"take_rows": shipped, "Table.take": lambda table, rows: table.take(pa.array(rows))}
    args.work.mkdir(parents=True, exist_ok=True)
    print("rows | input chunks | shards | take_rows ms/shard | Table.take ms/shard | ratio")
    for rows in map(int, args.sizes.split(",")):
        plan = plan_of(rows, args.shard_size, args.work)
        shards = plan.shards(args.shard_size)[: args.shards]
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name in sorted(variants, reverse=bool(round_ % 2)):
                plan_module.take_rows = variants[name]
                started = time.process_time()
                for shard in shards:
                    plan.shard_rows(shard, args.shard_size)
                timings[name].append(1000 * (time.process_time() - started) / len(shards))
        plan_module.take_rows = shipped
        new, old = (statistics.median(timings[name]) for name in variants)
        chunks = plan.inputs.column("entry").num_chunks
        print(f"{rows:,} | {chunks} | {len(plan.shards(args.shard_size)):,} | {new:.1f} | {old:.1f} | {old / new:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
