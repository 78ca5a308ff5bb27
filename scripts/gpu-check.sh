#!/usr/bin/env bash
# One check of a machine with an NVIDIA GPU, no internet, and PyTorch 2.11 in a Python env:
#   CUDA and NCCL found; a 1-rank NCCL self-test; ViT-B-16 bf16 training samples/s and MFU of
#   ferroclip-worker at a batch that fits; the same step in PyTorch eager for comparison; then a
#   short `ferroclip train --device cuda` (coordinator + 1 worker over NCCL) when the `ferroclip`
#   binary sits beside ferroclip-worker.
# Finishes in under 8 minutes (each part has its own time limit).
#
#   scripts/gpu-check.sh PATH/TO/ferroclip-worker [PYTHON]      (PYTHON default: $PYTHON or python3)
#
# The binary is built on any x86-64 Linux machine with this repository (glibc >= 2.34 needed here):
#   scripts/setup-libtorch && cargo build --release -p ferroclip-worker --bin ferroclip-worker
#   copy target/release/ferroclip-worker to the GPU machine.
# It was linked against a CPU-only libtorch 2.11; here it runs on PyTorch's own libtorch (same
# version; torch/lib on LD_LIBRARY_PATH), whose libtorch_cuda.so it loads for --device cuda.
# Environment: PRESET (ViT-B-16), STEPS (20), WARMUP (5), BATCH (0 = largest that fits),
#   PEAK_TFLOPS (bf16 dense peak, when the GPU's name is not in the built-in table).
set -uo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
BIN=$(readlink -f "$1")
PY=${2:-${PYTHON:-python3}}
HERE=$(cd "$(dirname "$0")" && pwd)
PRESET=${PRESET:-ViT-B-16}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
BATCH=${BATCH:-0}
START=$(date +%s)
FAILED=()

say() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $1: $2"; FAILED+=("$1"); }

[[ -x $BIN ]] || { echo "not an executable: $1"; usage; }
command -v "$PY" >/dev/null || { echo "no python at $PY (pass it as the second argument)"; exit 2; }

say "PyTorch"
INFO=$(timeout 60 "$PY" - <<'EOF'
import os, torch
print("TORCH_DIR=" + os.path.dirname(torch.__file__))
print("TORCH_VERSION=" + torch.__version__)
print("CUDA_OK=" + str(int(torch.cuda.is_available())))
print("GPUS=" + str(torch.cuda.device_count()))
if torch.cuda.is_available():
    print("GPU_NAME='" + torch.cuda.get_device_name(0).replace("'", "") + "'")
    print("TORCH_CUDA=" + str(torch.version.cuda))
    try:
        print("TORCH_NCCL=" + ".".join(map(str, torch.cuda.nccl.version())))
    except Exception as e:
        print("TORCH_NCCL='unknown (" + str(e).replace("'", "") + ")'")
EOF
) || { echo "python could not import torch:"; echo "$INFO"; exit 1; }
echo "$INFO"
eval "$(echo "$INFO" | grep -E '^[A-Z_]+=')"
TORCH_LIB=$TORCH_DIR/lib
[[ ${CUDA_OK:-0} == 1 ]] || fail cuda "torch.cuda.is_available() is False"
[[ -f $TORCH_LIB/libtorch_cuda.so ]] || fail libtorch_cuda "$TORCH_LIB/libtorch_cuda.so missing (a CPU-only PyTorch?)"
[[ $TORCH_VERSION == 2.11.* ]] || echo "warning: PyTorch $TORCH_VERSION, the binary was built for 2.11"

say "NCCL library"
# PyTorch's wheels ship NCCL as nvidia/nccl/lib/libnccl.so.2; cudarc looks for libnccl.so, so a
# link of that name goes first on the loader path.
SITE=$(dirname "$TORCH_DIR")
NCCL_LIB=$(find "$SITE/nvidia" -maxdepth 4 -name 'libnccl.so*' 2>/dev/null | sort | head -n1)
[[ -n $NCCL_LIB ]] || NCCL_LIB=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/ {print $NF; exit}')
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
if [[ -n $NCCL_LIB ]]; then
  ln -s "$NCCL_LIB" "$SHIM/libnccl.so"
  echo "NCCL: $NCCL_LIB (linked as libnccl.so)"
else
  fail nccl-lib "no libnccl.so* under $SITE/nvidia or in ldconfig"
fi
export LD_LIBRARY_PATH=$SHIM:$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  echo "warning: libcuda.so.1 is not in ldconfig's cache (the driver may still be on LD_LIBRARY_PATH)"
fi

say "ferroclip-worker"
MISSING=$(ldd "$BIN" 2>&1 | grep -E 'not found|GLIBC' || true)
[[ -z $MISSING ]] || { echo "$MISSING"; fail binary "libraries or glibc symbols missing (build on an older distribution?)"; }
timeout 30 "$BIN" --version || fail binary "--version failed"

say "ferroclip-worker gpu-check ($PRESET, bf16 autocast)"
GC_ARGS=(gpu-check --device cuda --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH")
[[ -n ${PEAK_TFLOPS:-} ]] && GC_ARGS+=(--peak-tflops "$PEAK_TFLOPS")
RUST_OUT=$(mktemp)
RUST_LOG=${RUST_LOG:-warn} RUST_BACKTRACE=0 timeout 230 "$BIN" "${GC_ARGS[@]}" 2>&1 | tee "$RUST_OUT"
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || fail ferroclip "gpu-check exited $rc$([[ $rc == 124 ]] && echo ' (timed out after 230 s)')"

say "PyTorch eager, the same step"
PY_ARGS=(--device cuda --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH")
[[ -n ${PEAK_TFLOPS:-} ]] && PY_ARGS+=(--peak-tflops "$PEAK_TFLOPS")
PY_OUT=$(mktemp)
timeout 140 "$PY" "$HERE/gpu_step_torch.py" "${PY_ARGS[@]}" 2>&1 | tee "$PY_OUT"
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || fail pytorch "gpu_step_torch.py exited $rc$([[ $rc == 124 ]] && echo ' (timed out after 140 s)')"

say "ferroclip train --device cuda: coordinator + 1 worker on NCCL, bf16 autocast (distributed path)"
# Needs the `ferroclip` binary (no libtorch) beside ferroclip-worker, or FERROCLIP_BIN.
FC=${FERROCLIP_BIN:-$(dirname "$BIN")/ferroclip}
if [[ -x $FC ]]; then
  RUN=$(mktemp -d)
  cat >"$RUN/run.toml" <<EOF
[run]
dir = "$RUN/run"
steps = 30
[data]
root = "$RUN/data"
[model]
preset = "tiny"
[optim]
global_batch = 256
[checkpoint]
every_steps = 0
[cluster]
backend = "nccl"
EOF
  timeout 30 "$FC" shards synth --out "$RUN/data" --rows 4000 --image-size 32 --no-progress >/dev/null \
    || fail dist "shards synth failed"
  FERROCLIP_WORKER_BIN=$BIN RUST_LOG=${RUST_LOG:-warn} timeout 150 \
    "$FC" train --config "$RUN/run.toml" --workers 1 --device cuda 2>&1 | tail -n 15
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || fail dist "ferroclip train --device cuda exited $rc"
  ls -d "$RUN"/run/checkpoints/step-* >/dev/null 2>&1 || fail dist "no checkpoint written"
  rm -rf "$RUN"
else
  echo "skipped: no ferroclip binary at $FC (set FERROCLIP_BIN)"
fi

say "Summary"
"$PY" - "$RUST_OUT" "$PY_OUT" <<'EOF' || true
import json, sys
def last_json(path):
    rows = [l for l in open(path, errors="replace") if l.startswith("{")]
    return json.loads(rows[-1]) if rows else None
ours, torch_ = last_json(sys.argv[1]), last_json(sys.argv[2])
for name, r in (("ferroclip", ours), ("pytorch eager", torch_)):
    if r is None:
        print(f"{name:>14}: no result")
    else:
        mfu = "unknown" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name:>14}: batch {r['batch']}, {r['samples_per_s']:.1f} samples/s, MFU {mfu}")
if ours and torch_ and torch_["samples_per_s"] > 0:
    print(f"ferroclip / pytorch samples/s: {ours['samples_per_s'] / torch_['samples_per_s']:.2f}x"
          + ("" if ours["batch"] == torch_["batch"] else " (different batches)"))
EOF
rm -f "$RUST_OUT" "$PY_OUT"
echo "elapsed: $(( $(date +%s) - START )) s"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu-check: FAILED (${FAILED[*]})"
  exit 1
fi
echo "gpu-check: all passed"
