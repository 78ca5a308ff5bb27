#!/usr/bin/env bash
# All-reduce bus bandwidth on loopback: ferroclip's TCP ring vs torch.distributed gloo, same
# sizes, same ranks (one process each), same run. Prints a Markdown table (best of ROUNDS,
# rounds alternate between the two so background load hits both alike).
#   bench/run-allreduce.sh
#   WORLD=3 SIZES=1,16,100 ROUNDS=3 bench/run-allreduce.sh
#   BUILD=0 BIN=path/to/allreduce_bench RING_ARGS="--chunk-kib 64" bench/run-allreduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
WORLD=${WORLD:-2}
SIZES=${SIZES:-1,16,100}
ROUNDS=${ROUNDS:-2}
read -r -a RING_ARGS <<<"${RING_ARGS:-}"

if [ "${BUILD:-1}" = 1 ]; then
  cargo build --release -p ferroclip-worker --example allreduce_bench >&2
fi
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/examples/allreduce_bench}

RESULTS=$(mktemp)
for _ in $(seq "$ROUNDS"); do
  "$PY" bench/allreduce_gloo.py --world "$WORLD" --sizes-mib "$SIZES" >>"$RESULTS"
  "$BIN" --world "$WORLD" --sizes-mib "$SIZES" --dtype f32 "${RING_ARGS[@]}" >>"$RESULTS"
  "$BIN" --world "$WORLD" --sizes-mib "$SIZES" --dtype bf16 "${RING_ARGS[@]}" >>"$RESULTS"
done

"$PY" - "$RESULTS" "$WORLD" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
best = {}
for r in rows:
    k = (r["impl"], r["dtype"].lower(), r["bytes"])
    best[k] = max(best.get(k, 0.0), r["busbw_gbs"])
sizes = sorted({r["bytes"] for r in rows})
print(f"all-reduce, {sys.argv[2]} ranks on loopback, busbw GB/s (best of rounds); busbw = algbw * 2(n-1)/n")
print()
print("| size | gloo (f32) | ferroclip ring f32 | ratio | ferroclip ring bf16 wire | ratio |")
print("| --- | --- | --- | --- | --- | --- |")
for b in sizes:
    g = best.get(("torch-gloo", "f32", b), float("nan"))
    f = best.get(("ferroclip-ring", "f32", b), float("nan"))
    h = best.get(("ferroclip-ring", "bf16", b), float("nan"))
    print(f"| {b / 2**20:g} MiB | {g:.2f} | {f:.2f} | {f / g:.2f}x | {h:.2f} | {h / g:.2f}x |")
PYEOF
rm -f "$RESULTS"
