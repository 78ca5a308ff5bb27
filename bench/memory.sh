#!/usr/bin/env bash
# Peak memory (peak RSS from /usr/bin/time -v) and step time of one preset on CPU with activation
# checkpointing and GradCache micro-batches on and off, ferroclip and PyTorch eager / OpenCLIP's
# model (bench/step_torch.py: --grad-checkpointing, --accum-freq), one process per row, run one
# after another. The last ferroclip rows take a 4x larger batch with both on.
#   [WARMUP=1] [PYTHON=.venv-bench/bin/python] bash bench/memory.sh [preset=ViT-B-16] [batch=16] [steps=2] [threads=2] [bin=target/release/ferroclip-worker]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-ViT-B-16}; batch=${2:-16}; steps=${3:-2}; threads=${4:-2}
bin=${5:-target/release/ferroclip-worker}
py=${PYTHON:-.venv-bench/bin/python}
micro=$((batch / 4))
[ -x "$bin" ] || cargo build --release -p ferroclip-worker --bin ferroclip-worker

# One row: label, then the command. Prints the command's JSON line with peak_rss_mib added.
row() {
  local label=$1; shift
  local err; err=$(mktemp)
  local json
  json=$(/usr/bin/time -v "$@" 2>"$err" | tail -n 1)
  local kib; kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$err")
  rm -f "$err"
  echo "${json%\}}, \"label\": \"$label\", \"peak_rss_mib\": $((kib / 1024))}"
}

common=(--preset "$preset" --steps "$steps" --warmup "${WARMUP:-1}" --threads "$threads")
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
row none "$bin" bench-step "${common[@]}" --batch "$batch"
row checkpointing "$bin" bench-step "${common[@]}" --batch "$batch" --grad-checkpointing
row micro-batches "$bin" bench-step "${common[@]}" --batch "$batch" --micro-batch "$micro"
row both "$bin" bench-step "${common[@]}" --batch "$batch" --grad-checkpointing --micro-batch "$micro"
row "both, 4x batch" "$bin" bench-step "${common[@]}" --batch $((4 * batch)) --grad-checkpointing --micro-batch "$micro"
if [ -x "$py" ]; then
  row none "$py" bench/step_torch.py "${common[@]}" --batch "$batch"
  row checkpointing "$py" bench/step_torch.py "${common[@]}" --batch "$batch" --grad-checkpointing
  row micro-batches "$py" bench/step_torch.py "${common[@]}" --batch "$batch" --accum-freq 4
  row both "$py" bench/step_torch.py "${common[@]}" --batch "$batch" --grad-checkpointing --accum-freq 4
fi
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
