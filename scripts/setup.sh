#!/usr/bin/env bash
# Creates .venv with the project and its pinned dependencies. Idempotent.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if [ -n "$extra" ]; then spec=".[$extra]"; else spec="."; fi
$py -m pip install -q -e "$spec"
# pillow-simd must come last: torchvision depends on "pillow", so installing it (or re-running
# pip on this project) puts Pillow's files back over pillow-simd. Build it with AVX2 when the
# CPU has it; on failure keep plain Pillow, which the code also supports (the summary says which).
if ! $py -c 'import PIL,sys; sys.exit(0 if ".post" in PIL.__version__ else 1)' 2>/dev/null; then
  flags=""
  grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"
  # Both own the same PIL/ files: remove both, then reinstall pillow-simd's files for sure.
  $py -m pip uninstall -q -y pillow pillow-simd
  if ! CC="cc $flags" $py -m pip install -q --no-binary pillow-simd --no-deps --force-reinstall \
      pillow-simd==12.1.1.post0; then
    echo "setup: pillow-simd failed to build; falling back to Pillow" >&2
    $py -m pip install -q pillow
  fi
fi
$py -c 'import PIL; print("setup: PIL", PIL.__version__, "(pillow-simd)" if ".post" in PIL.__version__ else "(Pillow)")'
