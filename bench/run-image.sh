#!/usr/bin/env bash
# Image pipeline, per core: ferroclip (Rust) vs Pillow + torchvision (OpenCLIP's train transform),
# same shard, same run, all pinned to one core. The Rust side runs once per JPEG decoder
# (libjpeg-turbo-rs, zune-jpeg), the same crop + normalise after each. Prints a Markdown table.
#   bench/run-image.sh                      # 2000 images, 3 passes, bicubic and bilinear
#   N=500 PASSES=2 CORE=1 bench/run-image.sh
#   DECODERS=pipeline bench/run-image.sh    # only what training runs (or: libjpeg-turbo, zune)
#   BIN=target/release/deps/image_pipeline-HASH bench/run-image.sh   # skip the build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
DIR=${BENCH_DIR:-/tmp/ferroclip-bench}
N=${N:-2000}
PASSES=${PASSES:-3}
CORE=${CORE:-0}
DECODERS=${DECODERS:-libjpeg-turbo zune}
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
  for dec in $DECODERS; do
    "${PIN[@]}" "$BIN" "$SHARD" --threads 1 --passes "$PASSES" --interpolation "$interp" --decoder "$dec" | tail -1 >>"$RESULTS"
  done
done

"$PY" - "$RESULTS" "$SHARD" <<'PYEOF'
import json, sys, platform, subprocess
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"shard: {sys.argv[2]} ({rows[0]['images']} JPEGs 256x256 q90), one core each, best of passes")
print()
print("| pipeline | interpolation | JPEG decoder | img/s (1 core, wall) | ratio | img per CPU-second | ratio | decode only img/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
py = None
for r in rows:
    interp = r["impl"].split("(")[1].rstrip(")")
    if r["impl"].startswith("pillow"):
        py = r
        print(f"| Pillow + torchvision | {interp} | libjpeg-turbo (Pillow) | {py['img_per_s']:.0f} | 1.00x | {py['cpu_img_per_s']:.0f} | 1.00x | |")
        continue
    dec = r["decoder"] + (" (training)" if r.get("pipeline") else "")
    print(f"| ferroclip | {interp} | {dec} | {r['img_per_s']:.0f} | {r['img_per_s'] / py['img_per_s']:.2f}x "
          f"| {r['cpu_img_per_s']:.0f} | {r['cpu_img_per_s'] / py['cpu_img_per_s']:.2f}x | {r['decode_only_img_per_s']:.0f} |")
PYEOF
rm -f "$RESULTS"
