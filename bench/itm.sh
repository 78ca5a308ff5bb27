#!/usr/bin/env bash
# ITM on the synthetic shapes (bench/README-itm.md): trains tiny-fusion with InfoNCE + ITM and,
# as the reference, tiny with InfoNCE alone (same data, steps, batch, schedule); evaluates both
# on the val split, the ITM model with `--itm-rerank K`; then the step time of the two objectives
# on random data (`bench-step`).
#   bash bench/itm.sh [rows=12800] [steps=300] [batch=128] [k=16] [threads=2]
# Env: BIN (the binaries' folder), CAPTIONS (`shards synth --captions`: varied, the default, or
# plain), ONLY=itm (train and evaluate the ITM model only, no step-time rounds), LOCKED=N (instead:
# ITM on locked towers, ALBEF's start from trained towers: tiny-fusion trained `steps` with
# InfoNCE alone, then N steps of ITM alone with both towers locked, evaluated with re-ranking;
# LOCKED_LR, default 1e-3, the peak lr of those N steps), SEED (run.seed, default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-12800}; steps=${2:-300}; batch=${3:-128}; k=${4:-16}; threads=${5:-2}
# The binaries' folder: target/debug (default), target/release, or a copy (BIN=...).
bin=${BIN:-target/debug}
out=bench/out/itm
worker=$bin/ferroclip-worker
shards=$bin/ferroclip
[ -x "$worker" ] && [ -x "$shards" ] || {
  echo "build first: cargo build -p ferroclip-worker -p ferroclip (or set BIN)" >&2
  exit 2
}
# libtorch as the build found it (cargo sets this for `cargo run`; a bare binary needs it).
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PWD/.libtorch/lib"
mkdir -p "$out"
captions=${CAPTIONS:-varied}
sfx=${CAPTIONS:+-$captions} # plain's outputs apart; varied's where they always were
data="$out/data-$rows$sfx"
[ -f "$data/manifest.json" ] || "$shards" shards synth --out "$data" --rows "$rows" \
  --image-size 32 --val-fraction 0.05 --captions "$captions" --no-progress
run() { # name preset objectives [model lines] [steps] [lr]
  local dir="$out/$1$sfx" n=${5:-$steps} lr=${6:-5e-4}
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/run.toml" <<TOML
[run]
dir = "$dir/run"
steps = $n
seed = ${SEED:-0}
[data]
root = "$data"
[model]
preset = "$2"
${4:-}
[objectives]
$3
[optim]
global_batch = $batch
lr = $lr
warmup_steps = 20
[checkpoint]
every_steps = $n
[eval]
every_steps = $n
TOML
  local t0=$(date +%s)
  "$worker" train --config "$dir/run.toml" --threads "$threads" --no-progress > "$dir/train.log" 2>&1
  echo "$1: trained $n steps in $(( $(date +%s) - t0 )) s"
}
if [ -n "${LOCKED:-}" ]; then
  run towers tiny-fusion 'contrastive = 1.0'
  run itm-locked tiny-fusion $'contrastive = 0.0\nitm = 1.0' \
    "init = \"$out/towers$sfx/run/checkpoints/step-$(printf %08d "$steps")\"
lock_image = true
lock_text = true" "$LOCKED" "${LOCKED_LR:-1e-3}"
  "$worker" eval --checkpoint "$out/itm-locked$sfx/run/checkpoints" --data "$data" --split val \
    --itm-rerank "$k" --json | tee "$out/itm-locked$sfx/eval.json"
  "$worker" eval --checkpoint "$out/itm-locked$sfx/run/checkpoints" --data "$data" --split val \
    --itm-rerank "$k"
  exit 0
fi
run itm tiny-fusion $'contrastive = 1.0\nitm = 1.0'
"$worker" eval --checkpoint "$out/itm$sfx/run/checkpoints" --data "$data" --split val \
  --itm-rerank "$k" --json | tee "$out/itm$sfx/eval.json"
"$worker" eval --checkpoint "$out/itm$sfx/run/checkpoints" --data "$data" --split val \
  --itm-rerank "$k"
[ "${ONLY:-}" = itm ] && exit 0
run contrastive tiny 'contrastive = 1.0'
"$worker" eval --checkpoint "$out/contrastive$sfx/run/checkpoints" --data "$data" --split val \
  --json | tee "$out/contrastive$sfx/eval.json"
# Step time, random data, one process: the ITM objective's cost over InfoNCE alone on the same
# towers (tiny-fusion carries its fusion encoder either way; it trains only with --itm).
for round in 1 2; do
  "$worker" bench-step --preset tiny-fusion --batch "$batch" --steps 10 --threads "$threads"
  "$worker" bench-step --preset tiny-fusion --batch "$batch" --steps 10 --threads "$threads" --itm 1
  "$worker" bench-step --preset tiny --batch "$batch" --steps 10 --threads "$threads"
done | tee "$out/step$sfx.jsonl"
