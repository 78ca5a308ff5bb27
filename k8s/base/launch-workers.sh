#!/usr/bin/env bash
# Runs FERROCLIP_LOCAL_WORKERS `ferroclip-worker` processes in this pod, one per GPU (local rank i
# uses cuda:i and collective port FERROCLIP_COLLECTIVE_PORT_BASE+i), and supervises them.
# One pod per node keeps a node's GPUs in one IPC namespace, so NCCL can use NVLink/P2P and
# shared memory between them (see k8s/README.md).
#
# - A worker that crashes is restarted in place and rejoins the run (elastic), at most
#   FERROCLIP_MAX_RESTARTS times per local rank; after that the pod fails (exit 1) and the Job
#   replaces it, on another node if need be.
# - SIGTERM (pod deleted, drained, preempted) goes to every worker: each leaves the run and exits
#   0. The launcher then exits 143, which the Job's podFailurePolicy answers with a replacement
#   that rejoins, without using up a retry.
# - A worker exiting 2 (bad flags) stops the pod with 2: the Job fails rather than retrying.
# - When every worker has exited 0 (the run is over) the launcher exits 0.
set -uo pipefail

n=${FERROCLIP_LOCAL_WORKERS:-1}
device=${FERROCLIP_DEVICE:-cuda}
port_base=${FERROCLIP_COLLECTIVE_PORT_BASE:-29500}
max_restarts=${FERROCLIP_MAX_RESTARTS:-3}
restart_delay=${FERROCLIP_RESTART_DELAY_S:-2}
worker=${FERROCLIP_WORKER_BIN:-ferroclip-worker}

declare -A slot_of=() # running pid -> local rank
declare -a restarts=()
sigterm=0 # set once the pod is being stopped
failing=0 # exit status chosen when a worker failed for good

log() { echo "launch-workers: $*" >&2; }

start() {
  local i=$1 dev=cpu
  if [[ $device == cuda ]]; then dev="cuda:$i"; fi
  "$worker" join --coordinator "$FERROCLIP_COORDINATOR" --token-file "$FERROCLIP_TOKEN_FILE" \
    --device "$dev" --collective-port $((port_base + i)) &
  slot_of[$!]=$i
  log "local rank $i: pid $! on $dev, collective port $((port_base + i))"
}

stop_all() {
  local pids=("${!slot_of[@]}")
  if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null; fi
}

on_term() {
  sigterm=1
  log "SIGTERM: asking ${#slot_of[@]} worker(s) to leave the run"
  stop_all
}
trap on_term TERM INT

for ((i = 0; i < n; i++)); do
  restarts[i]=0
  start "$i"
done

while ((${#slot_of[@]})); do
  pid=""
  wait -n -p pid "${!slot_of[@]}"
  rc=$?
  if [[ -z ${pid:-} ]]; then continue; fi # woken by a signal, not by a worker exiting
  i=${slot_of[$pid]}
  unset "slot_of[$pid]"
  if ((rc == 0)); then
    log "local rank $i exited 0"
  elif ((sigterm || failing)); then
    log "local rank $i exited $rc while stopping"
  elif ((rc == 2)); then
    log "local rank $i: usage error (exit 2); stopping the pod"
    failing=2
    stop_all
  elif ((restarts[i] < max_restarts)); then
    restarts[i]=$((restarts[i] + 1))
    log "local rank $i exited $rc; restart ${restarts[i]} of $max_restarts (it rejoins the run)"
    sleep "$restart_delay"
    if ((sigterm)); then continue; fi
    start "$i"
  else
    log "local rank $i exited $rc after $max_restarts restarts; failing the pod"
    failing=1
    stop_all
  fi
done

if ((failing)); then exit "$failing"; fi
if ((sigterm)); then exit 143; fi
exit 0
