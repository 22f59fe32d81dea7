#!/usr/bin/env bash
# Multi-node launcher with the interface of MindSpeed-MM's posttrain_flux_dancegrpo.sh.
# Run it on every node, from the same directory, with the same MASTER_ADDR/MASTER_PORT and
# its own NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPUS_PER_NODE=8 deploy/launch.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPUS_PER_NODE=8 deploy/launch.sh
#
# Node rank 0 also starts the coordinator (START_COORDINATOR=0: not here, it runs elsewhere,
# e.g. its own Kubernetes Deployment; the workers then dial DANCEGRPO_COORDINATOR or
# MASTER_ADDR:MASTER_PORT). Each node starts NPUS_PER_NODE workers with LOCAL_RANK
# 0..NPUS_PER_NODE-1. DEVICE=npu (default) | cuda | cpu. The script returns when its workers
# have exited (stopping the coordinator then), with the first failing one's status: 0 when the
# job finished; 2 when it refuses to start. BIN_DIR (default: this checkout's target/release).
# LOG_DIR (default logs): one file per process there; LOG_DIR=- sends them all to this
# script's output instead (a container's log).
#
# Networks: the workers' Gloo sockets use the interfaces in GLOO_SOCKET_IFNAME when it is set
# (checked at start), else the address of the route to rank 0; NCCL_SOCKET_IFNAME and
# HCCL_SOCKET_IFNAME are read by NCCL and HCCL themselves. All pass through from here.
#
# The job is CONFIG (default: this checkout's deploy/configs/dancegrpo_flux.toml), overridden
# by MindSpeed-MM's variables, overridden in turn by DANCEGRPO_<KEY> variables (and the
# coordinator's own rule: its --mm-data/--mm-model files lose to DANCEGRPO_<KEY> too):
#
#   MindSpeed-MM          job config key                       its default there
#   LOAD_PATH             pretrained_model_name_or_path        ckpt/flux
#   SAVE_PATH             output_dir (checkpoint-N/, and the   save_dir
#                         job database, samples/)
#   HPS_REWARD_SAVE_PATH  reward_log (metrics.jsonl and        ./hps_reward.txt
#                         reward_curve.png go beside it)
#   MM_DATA               serve --mm-data: data_path           ./examples/dancegrpo/data_dancegrpo.json
#   MM_MODEL              serve --mm-model: an hpsv2 reward    ./examples/dancegrpo/model_dancegrpo.json
#                         with model_dir = reward.ckpt_dir
#   MM_TOOL               (its profiler: not supported, ignored with a note)
#
# Set none of them and the job is CONFIG's, as before. Set any of them without CONFIG and the
# others take MindSpeed-MM's defaults: a copied MindSpeed-MM variable block, whole or in part,
# runs that script's job (its hyperparameters are the recipe's). Set CONFIG too and the ones
# you leave unset keep the file's values. Relative paths, in these variables, in CONFIG and in
# the JSON files, are taken from the current directory, as MindSpeed-MM takes them from its
# root, where its script runs; HPS_REWARD_SAVE_PATH is made absolute for that (reward_log
# alone would be relative to output_dir). A data_path naming a videos2caption.json that does
# not exist, beside a manifest.json (what deploy/preprocess.sh writes), reads that folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))
DEVICE=${DEVICE:-npu}
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
LOG_DIR=${LOG_DIR:-logs}
export NPUS_PER_NODE MASTER_ADDR MASTER_PORT NNODES NODE_RANK

die() { echo "launch.sh: error: $*" >&2; exit 2; }
note() { echo "launch.sh: $*" >&2; }
for v in NNODES NODE_RANK NPUS_PER_NODE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v=${!v} must be a number"
done
((NNODES >= 1 && NPUS_PER_NODE >= 1)) || die "NNODES=$NNODES and NPUS_PER_NODE=$NPUS_PER_NODE must be >= 1"
((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
START_COORDINATOR=${START_COORDINATOR:-$((NODE_RANK == 0 ? 1 : 0))}
[[ "$START_COORDINATOR" == [01] ]] || die "START_COORDINATOR=$START_COORDINATOR must be 0 or 1"
needed=(dancegrpo-worker)
if [[ "$START_COORDINATOR" == 1 ]]; then needed+=(dancegrpo-coordinator); fi
for b in "${needed[@]}"; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b not found (BIN_DIR); build with: cargo build --release (add --features npu or cuda)"
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

count_devices() { local IFS=,; local a; read -ra a <<< "$1"; echo "${#a[@]}"; }

case "$DEVICE" in
  npu)
    # The CANN / HCCL environment of the MindSpeed-MM script, exported before any NPU runtime
    # or HCCL communicator starts (CANN reads it at process start, HCCL at the first collective).
    # CANN 8.5+ installs to .../cann, earlier ones to .../ascend-toolkit.
    for env_sh in ${ASCEND_TOOLKIT_HOME:+"$ASCEND_TOOLKIT_HOME/set_env.sh"} \
      /usr/local/Ascend/cann/set_env.sh /usr/local/Ascend/ascend-toolkit/set_env.sh; do
      if [[ -f "$env_sh" ]]; then
        # shellcheck disable=SC1090
        source "$env_sh"
        break
      fi
    done
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
    if ((WORLD_SIZE <= 8)); then export HCCL_DETERMINISTIC=${HCCL_DETERMINISTIC:-true}; fi
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

# The job's arguments for `serve`, from CONFIG and MindSpeed-MM's variables (see the top).
# Only node rank 0 runs the coordinator, so only it needs them.
serve_args=()
if [[ "$START_COORDINATOR" == 1 ]]; then
  given=()
  for v in LOAD_PATH SAVE_PATH HPS_REWARD_SAVE_PATH MM_DATA MM_MODEL; do
    if [[ -n "${!v:-}" ]]; then given+=("$v"); fi
  done
  defaulted=()
  if [[ ${#given[@]} -gt 0 && -z "${CONFIG:-}" ]]; then
    for v in LOAD_PATH SAVE_PATH HPS_REWARD_SAVE_PATH MM_DATA MM_MODEL; do
      if [[ -z "${!v:-}" ]]; then defaulted+=("$v"); fi
    done
    LOAD_PATH=${LOAD_PATH:-ckpt/flux}
    SAVE_PATH=${SAVE_PATH:-save_dir}
    HPS_REWARD_SAVE_PATH=${HPS_REWARD_SAVE_PATH:-./hps_reward.txt}
    # A DANCEGRPO_ variable that sets the key makes the file moot: it is not defaulted.
    if [[ -z "${DANCEGRPO_DATA_JSON_PATH:-}" ]]; then
      MM_DATA=${MM_DATA:-./examples/dancegrpo/data_dancegrpo.json}
    fi
    if [[ -z "${DANCEGRPO_REWARDS:-}" ]]; then
      MM_MODEL=${MM_MODEL:-./examples/dancegrpo/model_dancegrpo.json}
    fi
  fi
  CONFIG=${CONFIG:-$ROOT/deploy/configs/dancegrpo_flux.toml}
  serve_args+=(--config "$CONFIG")

  # One variable, one key, unless the key's DANCEGRPO_ variable is set (it wins).
  set_key() {
    local var=$1 key=$2 value=$3 env="DANCEGRPO_${2^^}"
    if [[ -n "${!env:-}" ]]; then
      note "$var=${!var} not used: $env=${!env} sets $key"
    else
      serve_args+=(--set "$key=$value")
      echo "$var=${!var} -> $key=$value"
    fi
  }
  mm_file() {
    local var=$1
    if [[ ! -f "${!var}" ]]; then
      local why=""
      if [[ " ${defaulted[*]} " == *" $var "* ]]; then
        why=" (MindSpeed-MM's default, used because ${given[*]} set without CONFIG): set $var, or CONFIG"
      fi
      die "$var=${!var} does not exist$why"
    fi
  }
  if [[ -n "${MM_MODEL:-}" ]]; then mm_file MM_MODEL; fi
  if [[ -n "${MM_DATA:-}" ]]; then mm_file MM_DATA; fi
  if [[ -n "${LOAD_PATH:-}" ]]; then set_key LOAD_PATH pretrained_model_name_or_path "$LOAD_PATH"; fi
  if [[ -n "${SAVE_PATH:-}" ]]; then set_key SAVE_PATH output_dir "$SAVE_PATH"; fi
  if [[ -n "${HPS_REWARD_SAVE_PATH:-}" ]]; then
    reward_log=$HPS_REWARD_SAVE_PATH
    [[ "$reward_log" == /* ]] || reward_log="$PWD/${reward_log#./}"
    set_key HPS_REWARD_SAVE_PATH reward_log "$reward_log"
  fi
  if [[ -n "${MM_MODEL:-}" ]]; then
    serve_args+=(--mm-model "$MM_MODEL")
    echo "MM_MODEL=$MM_MODEL -> serve --mm-model (rewards: hpsv2 from its reward.ckpt_dir)"
  fi
  if [[ -n "${MM_DATA:-}" ]]; then
    serve_args+=(--mm-data "$MM_DATA")
    echo "MM_DATA=$MM_DATA -> serve --mm-data (data_json_path: its data_path)"
    # MindSpeed-MM's data_path names its preprocessing's videos2caption.json; deploy/preprocess.sh
    # writes manifest.json instead. A data_path that is missing beside a manifest reads the folder.
    if [[ -z "${DANCEGRPO_DATA_JSON_PATH:-}" ]]; then
      data_path=$(sed -n -e 's/.*"data_path"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' \
        -e "s/^[[:space:]]*data_path:[[:space:]]*[\"']\{0,1\}\([^\"']*\)[\"']\{0,1\}[[:space:]]*\$/\1/p" \
        "$MM_DATA" | head -n 1)
      data_dir=$(dirname "${data_path:-.}")
      if [[ "$data_path" == */videos2caption.json && ! -e "$data_path" && -f "$data_dir/manifest.json" ]]; then
        note "$data_path (MM_DATA's data_path) does not exist; reading $data_dir, whose manifest.json deploy/preprocess.sh wrote"
        serve_args+=(--set "data_json_path=$data_dir")
      fi
    fi
  fi
  if [[ -n "${MM_TOOL:-}" ]]; then
    note "MM_TOOL=$MM_TOOL ignored: MindSpeed-MM's profiler settings have no counterpart here"
  fi
fi

if [[ "$LOG_DIR" != - ]]; then mkdir -p "$LOG_DIR"; fi
stamp=$(date +%Y%m%d_%H%M%S)
# Runs "$@" in place of this (background) subshell, so $! is its pid, with its output in
# LOG_DIR/$1_<stamp>.log, or in this script's output when LOG_DIR=-.
exec_logged() {
  local name=$1
  shift
  if [[ "$LOG_DIR" == - ]]; then exec "$@" 2>&1; fi
  exec "$@" > "$LOG_DIR/${name}_$stamp.log" 2>&1
}
coordinator=""
workers=()
stopping=0
stop() {
  for p in ${coordinator:+"$coordinator"} ${workers[@]+"${workers[@]}"}; do
    kill -TERM "$p" 2> /dev/null || true
  done
}
# shellcheck disable=SC2317 # invoked by the traps
on_signal() { stopping=1; stop; }
trap on_signal INT TERM

if [[ "$START_COORDINATOR" == 1 ]]; then
  if [[ "$LOG_DIR" == - ]]; then
    "$BIN_DIR/dancegrpo-coordinator" serve "${serve_args[@]}" 2>&1 &
  else
    # tee ignores the signals that stop the job, so the coordinator's last lines (written while
    # it shuts down) still reach the file: tee ends when the coordinator closes its output.
    "$BIN_DIR/dancegrpo-coordinator" serve "${serve_args[@]}" \
      > >(trap '' INT TERM; exec tee "$LOG_DIR/coordinator_$stamp.log") 2>&1 &
  fi
  coordinator=$!
  echo "coordinator on $MASTER_ADDR:$MASTER_PORT (world size $WORLD_SIZE); status: $BIN_DIR/dancegrpo-coordinator status --addr $MASTER_ADDR:$MASTER_PORT"
fi

for ((local = 0; local < NPUS_PER_NODE; local++)); do
  dev=cpu
  [[ "$DEVICE" != cpu ]] && dev="$DEVICE:$local"
  exec_logged "worker_${NODE_RANK}_$local" env RANK=$((NODE_RANK * NPUS_PER_NODE + local)) \
    LOCAL_RANK=$local WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE="$NPUS_PER_NODE" \
    "$BIN_DIR/dancegrpo-worker" run --device "$dev" &
  workers+=($!)
done
where="logs in $LOG_DIR/"
[[ "$LOG_DIR" == - ]] && where="logs here"
echo "node $NODE_RANK: started $NPUS_PER_NODE workers ($DEVICE); $where"

# Wait for the workers. The coordinator serves on after its job has ended, so it is stopped
# once they are gone; if it exits first (a bad config, a missing file), the workers are stopped.
status=0
running=("${workers[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2> /dev/null; then
      still+=("$p")
    else
      s=0
      wait "$p" || s=$?
      if [[ "$status" -eq 0 ]]; then status=$s; fi
    fi
  done
  running=(${still[@]+"${still[@]}"})
  if [[ -n "$coordinator" ]] && ! kill -0 "$coordinator" 2> /dev/null; then
    s=0
    wait "$coordinator" || s=$?
    coordinator=""
    if [[ ${#running[@]} -gt 0 && "$stopping" -eq 0 ]]; then
      note "the coordinator exited (status $s) before the workers; stopping them"
      if [[ "$status" -eq 0 ]]; then status=$((s == 0 ? 1 : s)); fi
      stop
    fi
  fi
  if [[ ${#running[@]} -gt 0 ]]; then sleep 0.5; fi
done
if [[ -n "$coordinator" ]]; then
  kill -TERM "$coordinator" 2> /dev/null || true
  # Poll, not `wait`: a trapped signal (a scheduler sends TERM more than once) interrupts
  # `wait`. The coordinator must really be gone, so that nothing of the job outlives the script
  # and holds its port; at most 60 s, then it is killed.
  for ((i = 0; i < 600; i++)); do
    kill -0 "$coordinator" 2> /dev/null || break
    sleep 0.1
  done
  if kill -0 "$coordinator" 2> /dev/null; then
    note "the coordinator did not exit within 60 s of SIGTERM; killing it"
    kill -KILL "$coordinator" 2> /dev/null || true
  fi
  wait "$coordinator" 2> /dev/null || true
fi
exit "$status"
