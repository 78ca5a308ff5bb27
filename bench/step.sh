#!/usr/bin/env bash
# Step time of a preset on CPU: ferroclip (Rust + libtorch) vs PyTorch eager (OpenCLIP's CLIP),
# same shape, batch, threads and machine, run back to back (twice, alternating, to see noise).
#   bash bench/step.sh [preset=tiny] [batch=64] [steps=10] [threads=2]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-tiny}; batch=${2:-64}; steps=${3:-10}; threads=${4:-2}
py=.venv-bench/bin/python
bin=target/release/ferroclip-worker
[ -x "$bin" ] || cargo build --release -p ferroclip-worker --bin ferroclip-worker
for round in 1 2; do
  "$bin" bench-step --preset "$preset" --batch "$batch" --steps "$steps" --threads "$threads"
  "$py" bench/step_torch.py --preset "$preset" --batch "$batch" --steps "$steps" --threads "$threads"
done
