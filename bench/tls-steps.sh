#!/usr/bin/env bash
# Step time of `ferroclip train` with TLS on the control plane (the default) vs --plaintext:
# PAIRS alternating pairs of a STEPS-step run of 2 CPU workers on a synthetic dataset; prints the
# wall time per step of each run (startup included: the same in both) and the medians.
# Usage: bash bench/tls-steps.sh [STEPS=40] [PAIRS=3]   (env FERROCLIP, FERROCLIP_WORKER_BIN:
# the binaries; default target/debug/)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-40}
pairs=${2:-3}
bin=${FERROCLIP:-target/debug/ferroclip}
export FERROCLIP_WORKER_BIN=${FERROCLIP_WORKER_BIN:-target/debug/ferroclip-worker}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin" shards synth --out "$tmp/data" --rows 2000 >/dev/null
cat >"$tmp/run.toml" <<TOML
[run]
name = "tls-bench"
dir = "$tmp/run"
steps = $steps
[data]
root = "$tmp/data"
decode_threads = 1
[model]
preset = "tiny"
[optim]
global_batch = 32
[checkpoint]
every_steps = 0
TOML
one() { # MODE: prints seconds per step
  local start end
  start=$(date +%s.%N)
  "$bin" train --config "$tmp/run.toml" --workers 2 --threads 1 --fresh "$@" >/dev/null 2>"$tmp/err" \
    || { cat "$tmp/err" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "($end - $start) / $steps" | bc -l
}
tls=() plain=()
for i in $(seq "$pairs"); do
  tls+=("$(one)")
  plain+=("$(one --plaintext)")
  printf 'pair %d: tls %.3f s/step, plaintext %.3f s/step\n' "$i" "${tls[-1]}" "${plain[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf 'median: tls %.3f s/step, plaintext %.3f s/step\n' "$(median "${tls[@]}")" "$(median "${plain[@]}")"
