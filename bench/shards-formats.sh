#!/usr/bin/env bash
# `shards build` rows/s on one core by input layout, the same N images and captions each time:
# img2dataset Parquet, webdataset tars (1000 samples each, streamed), and a COCO captions file
# over a folder of the image files. 256x256 JPEG q90, no resize (validate + copy).
#   N=4000 bash bench/shards-formats.sh    # builds and uses the release `ferroclip` (BIN to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
N=${N:-4000}
DIR=${BENCH_DIR:-/tmp/ferroclip-bench}
SRC="$DIR/images-256-q90-$N.parquet"
BIN=${BIN:-target/release/ferroclip}
mkdir -p "$DIR"
[ -f "$SRC" ] || "$PY" bench/image_baseline.py make "$SRC" "$N" >&2
[ -d "$DIR/formats-$N" ] || "$PY" bench/shards_formats.py "$SRC" "$DIR/formats-$N"
[ -x "$BIN" ] || cargo build --release -p ferroclip >&2
one() { # NAME ARGS...
  local name=$1
  shift
  rm -rf "$DIR/out-formats"
  echo "== $name"
  taskset -c 0 "$BIN" shards build "$@" --out "$DIR/out-formats" --threads 1 --no-progress | grep -E "time|rows"
}
one parquet "$SRC" --image-col image
one webdataset "$DIR/formats-$N/wds/{00000..$(printf %05d $(((N - 1) / 1000)))}.tar"
one coco --format coco --annotations "$DIR/formats-$N/coco/captions_train2017.json" --images "$DIR/formats-$N/coco/images"
