#!/usr/bin/env bash
# Multi-node launcher with the interface of MindSpeed-MM's posttrain_flux_dancegrpo.sh.
# Run it on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPUS_PER_NODE=8 deploy/launch.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPUS_PER_NODE=8 deploy/launch.sh
#
# Node rank 0 also starts the coordinator. Each node starts NPUS_PER_NODE workers with
# LOCAL_RANK 0..NPUS_PER_NODE-1. DEVICE=npu (default) | cuda | cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))
DEVICE=${DEVICE:-npu}
CONFIG=${CONFIG:-deploy/configs/dancegrpo_flux.toml}
BIN_DIR=${BIN_DIR:-target/release}
LOG_DIR=${LOG_DIR:-logs}
export NPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK

die() { echo "launch.sh: error: $*" >&2; exit 1; }
[[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
for b in dancegrpo-coordinator dancegrpo-worker; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b not found; build with: cargo build --release (add --features npu or cuda)"
done

# Every node's processes need the job's token (DANCEGRPO_AUTH_TOKEN_FILE, a file all nodes can
# read, or DANCEGRPO_AUTH_TOKEN); a coordinator on a non-loopback address refuses to start
# without one, and the workers of the other nodes would only wait for it.
case "$MASTER_ADDR" in
  localhost | 127.* | ::1) ;;
  *)
    [[ -n "${DANCEGRPO_AUTH_TOKEN_FILE:-}${DANCEGRPO_AUTH_TOKEN:-}" ]] ||
      die "MASTER_ADDR=$MASTER_ADDR is reachable from the network: give every node the job's token, e.g.
  openssl rand -hex 32 > /shared/dancegrpo.token && export DANCEGRPO_AUTH_TOKEN_FILE=/shared/dancegrpo.token"
    ;;
esac

count_devices() { local IFS=,; local a=($1); echo "${#a[@]}"; }

case "$DEVICE" in
  npu)
    # The CANN / HCCL environment of the MindSpeed-MM script, exported before any NPU runtime
    # or HCCL communicator starts (CANN reads it at process start, HCCL at the first collective).
    if [[ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/cann}/set_env.sh" ]]; then
      # shellcheck disable=SC1091
      source "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/cann}/set_env.sh"
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
    export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-2}
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    export NPU_ASD_ENABLE=${NPU_ASD_ENABLE:-0}
    export ASCEND_LAUNCH_BLOCKING=${ASCEND_LAUNCH_BLOCKING:-0}
    export ACLNN_CACHE_LIMIT=${ACLNN_CACHE_LIMIT:-100000}
    export MULTI_STREAM_MEMORY_REUSE=${MULTI_STREAM_MEMORY_REUSE:-2}
    export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
    export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-800}
    export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((NPUS_PER_NODE - 1)))}
    # As the MindSpeed-MM trainer does: deterministic HCCL on small worlds, AIV expansion on
    # large ones (not on Ascend 950, where CCU_SCHED is exported instead: set A5=1).
    if [[ "${A5:-0}" == 1 ]]; then
      export HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE:-CCU_SCHED}
    elif ((WORLD_SIZE >= 16)); then
      export HCCL_OP_EXPANSION_MODE=${HCCL_OP_EXPANSION_MODE:-AIV}
    fi
    ((WORLD_SIZE <= 8)) && export HCCL_DETERMINISTIC=${HCCL_DETERMINISTIC:-true}
    n=$(count_devices "$ASCEND_RT_VISIBLE_DEVICES")
    [[ "$n" -eq "$NPUS_PER_NODE" ]] ||
      die "ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES lists $n devices, NPUS_PER_NODE=$NPUS_PER_NODE"
    ;;
  cuda)
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      n=$(count_devices "$CUDA_VISIBLE_DEVICES")
      [[ "$n" -eq "$NPUS_PER_NODE" ]] ||
        die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists $n devices, NPUS_PER_NODE=$NPUS_PER_NODE"
    fi
    ;;
  cpu) ;;
  *) die "DEVICE must be npu, cuda or cpu (got $DEVICE)" ;;
esac

mkdir -p "$LOG_DIR"
stamp=$(date +%Y%m%d_%H%M%S)
pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap stop INT TERM

if [[ "$NODE_RANK" -eq 0 ]]; then
  "$BIN_DIR/dancegrpo-coordinator" serve --config "$CONFIG" \
    > >(tee "$LOG_DIR/coordinator_$stamp.log") 2>&1 &
  pids+=($!)
  echo "coordinator on $MASTER_ADDR:$MASTER_PORT (world size $WORLD_SIZE); status: $BIN_DIR/dancegrpo-coordinator status --addr $MASTER_ADDR:$MASTER_PORT"
fi

for ((local = 0; local < NPUS_PER_NODE; local++)); do
  dev=cpu
  [[ "$DEVICE" != cpu ]] && dev="$DEVICE:$local"
  RANK=$((NODE_RANK * NPUS_PER_NODE + local)) LOCAL_RANK=$local WORLD_SIZE=$WORLD_SIZE \
    LOCAL_WORLD_SIZE=$NPUS_PER_NODE "$BIN_DIR/dancegrpo-worker" run --device "$dev" \
    > "$LOG_DIR/worker_${NODE_RANK}_${local}_$stamp.log" 2>&1 &
  pids+=($!)
done
echo "node $NODE_RANK: started $NPUS_PER_NODE workers ($DEVICE); logs in $LOG_DIR/"
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
