#!/usr/bin/env bash
# The Python side of the benchmarks (baselines): torch 2.11, torchvision, Pillow, pyarrow, OpenCLIP.
# Creates .venv-bench/ (git-ignored) once; prints the python to use.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${FERROCLIP_BENCH_VENV:-$root/.venv-bench}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch, torchvision, PIL, pyarrow, open_clip" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==2.11.0" "torchvision==0.26.0" pillow pyarrow "open-clip-torch==3.3.0" >&2
fi
echo "$venv/bin/python"
