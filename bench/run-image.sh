#!/usr/bin/env bash
# Image pipeline, per core: ferroclip (Rust) vs Pillow + torchvision (OpenCLIP's train transform),
# same shard, same run, both pinned to one core. Prints a Markdown table.
#   bench/run-image.sh                      # 2000 images, 3 passes, bicubic and bilinear
#   N=500 PASSES=2 CORE=1 bench/run-image.sh
#   BIN=target/release/deps/image_pipeline-HASH bench/run-image.sh   # skip the build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
DIR=${BENCH_DIR:-/tmp/ferroclip-bench}
N=${N:-2000}
PASSES=${PASSES:-3}
CORE=${CORE:-0}
SHARD="$DIR/images-256-q90-$N.parquet"
mkdir -p "$DIR"
[ -f "$SHARD" ] || "$PY" bench/image_baseline.py make "$SHARD" "$N" >&2

# Build (release) and find the bench binary (or take BIN=path from the environment).
BIN=${BIN:-}
[ -n "$BIN" ] || BIN=$(cargo bench -p ferroclip-worker --bench image_pipeline --no-run --message-format=json 2>/dev/null \
  | "$PY" -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "image_pipeline":
        print(m["executable"])')
[ -n "$BIN" ] || { echo "could not build the image_pipeline bench" >&2; exit 1; }

PIN=()
command -v taskset >/dev/null && PIN=(taskset -c "$CORE")
RESULTS=$(mktemp)
for interp in bicubic bilinear; do
  "${PIN[@]}" "$PY" bench/image_baseline.py run "$SHARD" --passes "$PASSES" --interpolation "$interp" | tail -1 >>"$RESULTS"
  "${PIN[@]}" "$BIN" "$SHARD" --threads 1 --passes "$PASSES" --interpolation "$interp" | tail -1 >>"$RESULTS"
done

"$PY" - "$RESULTS" "$SHARD" <<'PYEOF'
import json, sys, platform, subprocess
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"shard: {sys.argv[2]} ({rows[0]['images']} JPEGs 256x256 q90), one core each, best of passes")
print()
print("| pipeline | interpolation | img/s (1 core, wall) | ratio | img per CPU-second | ratio | decode only img/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for i in range(0, len(rows), 2):
    py, rs = rows[i], rows[i + 1]
    interp = py["impl"].split("(")[1].rstrip(")")
    print(f"| Pillow + torchvision | {interp} | {py['img_per_s']:.0f} | 1.00x | {py['cpu_img_per_s']:.0f} | 1.00x | |")
    print(f"| ferroclip | {interp} | {rs['img_per_s']:.0f} | {rs['img_per_s'] / py['img_per_s']:.2f}x "
          f"| {rs['cpu_img_per_s']:.0f} | {rs['cpu_img_per_s'] / py['cpu_img_per_s']:.2f}x | {rs['decode_only_img_per_s']:.0f} |")
PYEOF
rm -f "$RESULTS"
