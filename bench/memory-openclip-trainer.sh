#!/usr/bin/env bash
# Peak memory and step time of OpenCLIP's own trainer process (`open_clip_train.main`, one CPU
# process, fp32) at one model and per-rank batch with none / --grad-checkpointing /
# --accum-freq 4 / both: the trainer rows that go next to bench/memory.sh's (README-memory.md).
# OpenCLIP's --batch-size is the micro-batch under --accum-freq, so the accumulating rows pass
# BATCH/4 with --accum-freq 4: every row takes optimizer steps of BATCH samples.
#   bash bench/memory-openclip-trainer.sh [model=ViT-B-16] [batch=32] [steps=3] [threads=2]
# Prints one JSON line per row: label, steps, step_s (median seconds between optimizer steps
# after the first), peak_rss_mib (/usr/bin/time -v of the trainer process).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-ViT-B-16}; batch=${2:-32}; steps=${3:-3}; threads=${4:-2}
out=bench/out/memory-trainer; data=$out/data; csvdir=$out/csv
py=$(bash bench/setup-python.sh)
venv=$(dirname "$(dirname "$py")")
"$py" -c "import open_clip_train.main" 2>/dev/null \
  || "$venv/bin/pip" install --quiet pandas braceexpand "webdataset>=0.2.5,<=0.2.86" >&2
ferroclip=${FERROCLIP:-target/release/ferroclip}
[[ -x $ferroclip ]] || cargo build --release -p ferroclip
rows=$((batch * steps))
mkdir -p "$out"
if [[ ! -f $out/data-$rows.done ]]; then
  rm -rf "$data" "$csvdir" "$out"/data-*.done
  # val-fraction 0: every row trains; one epoch = `steps` optimizer steps of `batch`.
  "$ferroclip" shards synth --out "$data" --rows "$rows" --seed 0 --image-size 64 \
    --rows-per-row-group 64 --val-fraction 0 --no-progress
  "$py" bench/export_csv.py "$data" "$csvdir" --split train
  touch "$out/data-$rows.done"
fi
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
row() {
  local label=$1 per_step=$2; shift 2
  local times=$out/steps-$RANDOM.txt err; err=$(mktemp)
  rm -rf "$out/logs"
  OMP_NUM_THREADS=$threads /usr/bin/time -v "$py" -c '
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
out = open(sys.argv[1], "a", buffering=1)
register_optimizer_step_post_hook(lambda *_: out.write(f"{time.time():.6f}\n"))
from open_clip_train.main import main
main(sys.argv[2:])
' "$times" --model "$model" --train-data "$csvdir/train.csv" --dataset-type csv \
    --csv-img-key filepath --csv-caption-key title --csv-separator , \
    --batch-size "$per_step" --epochs 1 --workers 1 --precision fp32 --device cpu \
    --lr 5e-4 --wd 0.2 --warmup 1 --save-frequency 0 --report-to none --seed 0 \
    --logs "$out/logs" --name "row" "$@" > "$out/trainer.log" 2>"$err" \
    || { tail -n 30 "$err" "$out/trainer.log" >&2; exit 1; }
  local kib; kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$err")
  "$py" - "$times" "$label" "$((kib / 1024))" <<'PY'
import json, statistics, sys
t = [float(x) for x in open(sys.argv[1])]
gaps = [b - a for a, b in zip(t, t[1:])]
print(json.dumps({"impl": "OpenCLIP trainer", "label": sys.argv[2], "steps": len(t),
                  "step_s": round(statistics.median(gaps), 3) if gaps else None,
                  "peak_rss_mib": int(sys.argv[3])}))
PY
  rm -f "$times" "$err"
}
row none "$batch"
row checkpointing "$batch" --grad-checkpointing
row "accum 4" $((batch / 4)) --accum-freq 4
row both $((batch / 4)) --accum-freq 4 --grad-checkpointing
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
