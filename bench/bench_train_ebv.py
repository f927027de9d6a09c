"""EBV basis generation time and the max |cos| reached, e.g. at ImageNet-21K scale on the CPU.

    python bench/bench_train_ebv.py                          # C = 10,450, d = 1,000, CPU
    python bench/bench_train_ebv.py --classes 1000 --dim 1000 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from subspectral.train.ebv import generate_ebv, max_abs_cos, reachable_threshold, welch_bound  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10_450)
    parser.add_argument("--dim", type=int, default=1_000)
    parser.add_argument("--threshold", type=float, default=0.002)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    basis, worst, steps = generate_ebv(args.classes, args.dim, threshold=args.threshold, max_steps=args.max_steps,
                                       device=args.device)
    seconds = time.perf_counter() - start
    print(f"C={args.classes} d={args.dim} on {args.device} ({torch.get_num_threads()} threads): {seconds:.1f} s, "
          f"{steps} steps, max |cos| {max_abs_cos(basis):.4f} (reported {worst:.4f}); threshold asked "
          f"{args.threshold}, used {reachable_threshold(args.classes, args.dim, args.threshold):.4f}; "
          f"Welch bound {welch_bound(args.classes, args.dim):.4f}")


if __name__ == "__main__":
    main()
