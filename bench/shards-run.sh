#!/usr/bin/env bash
# `shards build` vs pyarrow + Pillow on 256x256 JPEG q90 sources, with and without --resize 224,
# one core (taskset) and all cores, plus a plain copy of the same bytes.
#   bench/shards-run.sh            # N=2000; builds and uses the release `ferroclip` (BIN to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
N=${N:-2000}
DIR=${BENCH_DIR:-/tmp/ferroclip-bench}
SRC="$DIR/images-256-q90-$N.parquet"
BIN=${BIN:-target/release/ferroclip}
mkdir -p "$DIR"
[ -f "$SRC" ] || "$PY" bench/image_baseline.py make "$SRC" "$N" >&2
[ -x "$BIN" ] || cargo build --release -p ferroclip >&2
for r in "" "--resize 224"; do
  echo "== resize: ${r:-none}"
  rm -rf "$DIR"/out-*
  taskset -c 0 "$BIN" shards build "$SRC" --out "$DIR/out-rs1" --image-col image --threads 1 --no-progress $r | grep time
  "$BIN" shards build "$SRC" --out "$DIR/out-rs" --image-col image --no-progress $r | grep time
  taskset -c 0 "$PY" bench/shards_baseline.py "$SRC" "$DIR/out-py1" $r
  "$PY" bench/shards_baseline.py "$SRC" "$DIR/out-py" --procs "$(nproc)" $r
done
"$PY" -c "import os,shutil,sys,time; t=time.perf_counter(); shutil.copyfile(sys.argv[1], sys.argv[1]+'.copy'); dt=time.perf_counter()-t; print('plain copy MB/s', round(os.path.getsize(sys.argv[1])/1e6/dt)); os.remove(sys.argv[1]+'.copy')" "$SRC"
