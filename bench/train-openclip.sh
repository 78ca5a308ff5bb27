#!/usr/bin/env bash
# Training samples/s with 2 CPU workers: ferroclip (`ferroclip train --workers 2`) against
# OpenCLIP's own trainer (`open_clip_train.main` under torchrun, 2 ranks, gloo), same model shape
# (configs/bench-openclip-shape.toml), global batch 256, optimizer, schedule and data.
#   bash bench/train-openclip.sh [rows=12800] [epochs=4]
# rows: synthetic samples made (about 5% go to val); epochs: OpenCLIP epochs over the train split.
# ferroclip runs the same number of steps (epochs x train rows / 256). Output in bench/out/train/.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-12800}; epochs=${2:-4}
batch=256; per_rank=$((batch / 2))
out=bench/out/train; data=$out/data; csvdir=$out/csv
cfg_src=configs/bench-openclip-shape.toml
py=$(bash bench/setup-python.sh)
venv=$(dirname "$(dirname "$py")")
# open_clip_train's imports beyond setup-python.sh (OpenCLIP's [training] extra, the parts used here)
"$py" -c "import open_clip_train.main" 2>/dev/null \
  || "$venv/bin/pip" install --quiet pandas braceexpand "webdataset>=0.2.5,<=0.2.86" >&2

if [[ ! -x target/release/ferroclip || ! -x target/release/ferroclip-worker ]]; then
  cargo build --release -p ferroclip -p ferroclip-worker
fi
bin=target/release

mkdir -p "$out"
stamp="$out/data-$rows.done"
if [[ ! -f $stamp ]]; then
  rm -rf "$data" "$csvdir" "$out"/data-*.done
  "$bin/ferroclip" shards synth --out "$data" --rows "$rows" --seed 0 --image-size 32 \
    --rows-per-row-group 256 --val-fraction 0.05 --no-progress
  "$py" bench/export_csv.py "$data" "$csvdir" --split train
  touch "$stamp"
fi
train_rows=$(($(wc -l < "$csvdir/train.csv") - 1))
steps_per_epoch=$((train_rows / batch))  # DistributedSampler + drop_last: full batches only
steps=$((steps_per_epoch * epochs))
(( steps >= 2 )) || { echo "need at least 2 steps: raise rows or epochs" >&2; exit 1; }
echo "data: $train_rows train rows, $steps_per_epoch steps/epoch, $epochs epochs = $steps steps of $batch"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# (a) OpenCLIP under torchrun. torchrun sets OMP_NUM_THREADS=1 per rank: 2 ranks = 2 cores, the
# same as ferroclip's default (cores / workers) threads per worker.
rm -rf "$out/openclip-logs"; rm -f "$out/openclip-steps.txt"
t0=$(date +%s.%N)
"$venv/bin/torchrun" --standalone --nproc_per_node 2 bench/openclip_train_wrapper.py \
  --ferroclip-config "$cfg_src" --step-times "$out/openclip-steps.txt" \
  --train-data "$csvdir/train.csv" --dataset-type csv \
  --csv-img-key filepath --csv-caption-key title --csv-separator , \
  --batch-size "$per_rank" --epochs "$epochs" --workers 1 \
  --lr 5e-4 --wd 0.2 --beta1 0.9 --beta2 0.98 --eps 1e-6 --warmup 20 --grad-clip-norm 1.0 \
  --precision fp32 --local-loss --gather-with-grad --device cpu --dist-backend gloo \
  --save-frequency 0 --report-to none --log-every-n-steps 20 --seed 0 \
  --openclip-logs "$out/openclip-logs" --name bench > "$out/openclip.log" 2>&1 \
  || { tail -n 40 "$out/openclip.log" >&2; exit 1; }
openclip_wall=$(echo "$(date +%s.%N) - $t0" | bc)
echo "load between: $(cut -d' ' -f1-3 /proc/loadavg)"

# (b) ferroclip: the same config with this run's steps, data and run dir.
cfg="$out/ferroclip.toml"
sed -e "s|^steps = .*|steps = $steps|" -e "s|^root = .*|root = \"$data\"|" \
  -e "s|^dir = .*|dir = \"$out/ferroclip-run\"|" "$cfg_src" > "$cfg"
rm -rf "$out/ferroclip-run" "$out/ferroclip-steps.json"
: > "$out/ferroclip.log"
"$py" bench/train_report.py poll "$out/ferroclip.log" "$out/ferroclip-steps.json" > /dev/null &
poller=$!
t0=$(date +%s.%N)
"$bin/ferroclip" train --config "$cfg" --workers 2 > "$out/ferroclip.log" 2>&1 \
  || { kill "$poller" 2>/dev/null; tail -n 40 "$out/ferroclip.log" >&2; exit 1; }
ferro_wall=$(echo "$(date +%s.%N) - $t0" | bc)
wait "$poller"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

ckpt=$(ls -d "$out"/ferroclip-run/checkpoints/step-* | sort | tail -n 1)
"$py" bench/train_report.py params "$ckpt" "$cfg_src"
grep -h "Train Epoch" "$out/openclip-logs/bench/out.log" | tail -n 1 || true
grep -h "loss/" "$out/ferroclip.log" | tail -n 2 || true
"$py" bench/train_report.py report "$out/openclip-steps.txt" "$out/ferroclip-steps.json" \
  --batch "$batch" --openclip-wall "$openclip_wall" --ferroclip-wall "$ferro_wall"
