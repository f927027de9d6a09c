#!/usr/bin/env bash
# Per-member training throughput at the seed ImageNet-21K recipe (imagenet21k-sub36: resnet34, low-res
# stem, batch 512, AMP, channels_last) on one GPU, through the real `cli.py prepare` and `cli.py train`.
# The sizing table of docs/cluster.md uses the steady-state epochs (2 and 3) of this run.
#   deploy/sizing/member_throughput.sh [WORKDIR]        (needs a CUDA GPU; ~3 min on an H100)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PY:-.venv/bin/python}
work=${1:-$(mktemp -d)}
$py deploy/sizing/photo_corpus.py "$work/corpus" --classes 100 --per-class 1010
$py cli.py prepare --src "$work/corpus" --out "$work/data" --split 4 --size 56 --resize-mode squash \
    --val-per-class 10 --shard-size 5000
for workers in 8 14; do
  $py cli.py train --data "$work/data" --shard 0 --config imagenet21k-sub36 --out "$work/runs-w$workers" \
      --epochs 3 --device cuda --no-progress "data.workers=$workers"
  echo "data.workers=$workers:"; cat "$work/runs-w$workers/sub-00/metrics.jsonl"
done
