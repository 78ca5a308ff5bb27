#!/usr/bin/env bash
# All-reduce bus bandwidth on one host: ferroclip's ring (TCP on loopback, and shared memory)
# vs torch.distributed gloo, same sizes, same ranks (one process each), same run. Prints a Markdown table (best of ROUNDS,
# rounds alternate between the two so background load hits both alike).
#   bench/run-allreduce.sh
#   WORLD=3 SIZES=1,16,100 ROUNDS=3 bench/run-allreduce.sh
#   BUILD=0 BIN=path/to/allreduce_bench RING_ARGS="--chunk-kib 64" bench/run-allreduce.sh
#   SHM_ARGS="--shm-chunk-kib 256" bench/run-allreduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-bench/bin/python}
WORLD=${WORLD:-2}
SIZES=${SIZES:-1,16,100}
ROUNDS=${ROUNDS:-2}
read -r -a RING_ARGS <<<"${RING_ARGS:-}"
read -r -a SHM_ARGS <<<"${SHM_ARGS:-}"

if [ "${BUILD:-1}" = 1 ]; then
  cargo build --release -p ferroclip-worker --example allreduce_bench >&2
fi
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/examples/allreduce_bench}

RESULTS=$(mktemp)
for _ in $(seq "$ROUNDS"); do
  "$PY" bench/allreduce_gloo.py --world "$WORLD" --sizes-mib "$SIZES" >>"$RESULTS"
  "$BIN" --world "$WORLD" --sizes-mib "$SIZES" --transport tcp --dtype f32 "${RING_ARGS[@]}" >>"$RESULTS"
  "$BIN" --world "$WORLD" --sizes-mib "$SIZES" --transport tcp --dtype bf16 "${RING_ARGS[@]}" >>"$RESULTS"
  "$BIN" --world "$WORLD" --sizes-mib "$SIZES" --transport shm "${SHM_ARGS[@]}" >>"$RESULTS"
done

"$PY" - "$RESULTS" "$WORLD" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
best = {}
for r in rows:
    k = (r.get("transport", "torch"), r["dtype"].lower(), r["bytes"])
    best[k] = max(best.get(k, 0.0), r["busbw_gbs"])
sizes = sorted({r["bytes"] for r in rows})
print(f"all-reduce, {sys.argv[2]} ranks on one host, busbw GB/s (best of rounds); busbw = algbw * 2(n-1)/n")
print()
print("| size | gloo (f32) | ring TCP f32 | ratio | ring TCP bf16 wire | ratio | ring shm f32 | ratio |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
nan = float("nan")
for b in sizes:
    g = best.get(("torch", "f32", b), nan)
    cols = [best.get(k, nan) for k in (("tcp", "f32", b), ("tcp", "bf16", b), ("shm", "f32", b))]
    cells = " | ".join(f"{x:.2f} | {x / g:.2f}x" for x in cols)
    print(f"| {b / 2**20:g} MiB | {g:.2f} | {cells} |")
PYEOF
rm -f "$RESULTS"
