#!/usr/bin/env bash
# One node's workers, in one pod: the entrypoint of the worker pods in deploy/k8s/. Starts
# NPUS_PER_NODE `dancegrpo-worker run` processes, LOCAL_RANK 0..NPUS_PER_NODE-1 on devices
# DEVICE:0..NPUS_PER_NODE-1, and returns when they have all exited, with the first failing one's
# status (0 when the job finished). SIGTERM (pod deletion) drains them all.
#
# The node rank is the pod's index: NODE_RANK if set, else the first of JOB_COMPLETION_INDEX
# (an Indexed Job), VC_TASK_INDEX (a Volcano Job) and RANK (PyTorchJob and AscendJob, whose
# operators give each pod its rank, Master 0, Worker i -> i+1). deploy/launch.sh is the
# bare-metal counterpart; it is not used here because on node rank 0 it also starts a
# coordinator, which on Kubernetes is its own Deployment (coordinator.yaml).
#
# DEVICE=cuda (default) | npu | cpu. With npu, CANN's set_env.sh is sourced when present and
# ASCEND_RT_VISIBLE_DEVICES (default 0..NPUS_PER_NODE-1, the devices Ascend's device plugin
# mounted, renumbered from 0) must list NPUS_PER_NODE devices. BIN_DIR: the binaries (default
# /opt/dancegrpo/bin). The workers reach the coordinator at DANCEGRPO_COORDINATOR (or
# MASTER_ADDR:MASTER_PORT) with the token of DANCEGRPO_AUTH_TOKEN_FILE.
set -euo pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
DEVICE=${DEVICE:-cuda}
BIN_DIR=${BIN_DIR:-/opt/dancegrpo/bin}
die() { echo "node.sh: error: $*" >&2; exit 2; }

NODE_RANK=${NODE_RANK:-${JOB_COMPLETION_INDEX:-${VC_TASK_INDEX:-${RANK:-}}}}
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] ||
  die "no node rank: set NODE_RANK, or run in an Indexed Job (JOB_COMPLETION_INDEX), a Volcano Job (VC_TASK_INDEX) or a PyTorchJob/AscendJob (RANK)"
[[ "$NPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPUS_PER_NODE=$NPUS_PER_NODE must be a positive integer"
if [[ -n "${NNODES:-}" ]] && ((NODE_RANK >= NNODES)); then
  die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
fi
export NODE_RANK

case "$DEVICE" in
  npu)
    if [[ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit/latest}/set_env.sh" ]]; then
      # shellcheck disable=SC1091
      source "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit/latest}/set_env.sh"
    fi
    export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((NPUS_PER_NODE - 1)))}
    IFS=, read -ra visible <<< "$ASCEND_RT_VISIBLE_DEVICES"
    [[ ${#visible[@]} -eq "$NPUS_PER_NODE" ]] ||
      die "ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES lists ${#visible[@]} devices, NPUS_PER_NODE=$NPUS_PER_NODE"
    ;;
  cuda | cpu) ;;
  *) die "DEVICE must be cuda, npu or cpu (got $DEVICE)" ;;
esac
[[ -x "$BIN_DIR/dancegrpo-worker" ]] || die "$BIN_DIR/dancegrpo-worker not found (BIN_DIR)"

workers=()
# shellcheck disable=SC2317 # invoked by the trap
stop() { for p in "${workers[@]}"; do kill -TERM "$p" 2> /dev/null || true; done; }
trap stop INT TERM
for ((local = 0; local < NPUS_PER_NODE; local++)); do
  dev=cpu
  [[ "$DEVICE" != cpu ]] && dev="$DEVICE:$local"
  LOCAL_RANK=$local "$BIN_DIR/dancegrpo-worker" run --device "$dev" &
  workers+=($!)
done
echo "node.sh: node $NODE_RANK: started $NPUS_PER_NODE workers ($DEVICE)" >&2

status=0
for p in "${workers[@]}"; do
  s=0
  # A trapped signal interrupts `wait`; wait again until this worker has really exited.
  while true; do
    wait "$p" && s=0 || s=$?
    kill -0 "$p" 2> /dev/null || break
  done
  if [[ "$status" -eq 0 ]]; then status=$s; fi
done
exit "$status"
