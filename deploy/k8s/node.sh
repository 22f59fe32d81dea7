#!/usr/bin/env bash
# One node's workers, in one pod: the entrypoint of the worker pods in deploy/k8s/. It finds the
# node rank from the pod's index, then runs deploy/launch.sh for this node without a coordinator
# (START_COORDINATOR=0: the coordinator is its own Deployment, coordinator.yaml), with the
# workers' logs on the pod's output (LOG_DIR=-): launch.sh starts NPUS_PER_NODE workers,
# LOCAL_RANK 0..NPUS_PER_NODE-1 on DEVICE:0..NPUS_PER_NODE-1, exports the CANN/HCCL
# environment on NPUs and checks ASCEND_RT_VISIBLE_DEVICES, drains them on SIGTERM (pod
# deletion), and returns with the first failing worker's status (0 when the job finished).
#
# The node rank is the pod's index: NODE_RANK if set, else the first of JOB_COMPLETION_INDEX
# (an Indexed Job), VC_TASK_INDEX (a Volcano Job) and RANK (PyTorchJob and AscendJob, whose
# operators give each pod its rank, Master 0, Worker i -> i+1). DEVICE=cuda (default) | npu |
# cpu. BIN_DIR: the binaries (default /opt/dancegrpo/bin). The workers reach the coordinator
# at DANCEGRPO_COORDINATOR (or MASTER_ADDR:MASTER_PORT) with the token of
# DANCEGRPO_AUTH_TOKEN_FILE.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "node.sh: error: $*" >&2; exit 2; }

NODE_RANK=${NODE_RANK:-${JOB_COMPLETION_INDEX:-${VC_TASK_INDEX:-${RANK:-}}}}
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] ||
  die "no node rank: set NODE_RANK, or run in an Indexed Job (JOB_COMPLETION_INDEX), a Volcano Job (VC_TASK_INDEX) or a PyTorchJob/AscendJob (RANK)"
# The operators' RANK, LOCAL_RANK (AscendJob: a list) and WORLD_SIZE are per pod; launch.sh
# gives each worker its own.
unset RANK LOCAL_RANK WORLD_SIZE
NODE_RANK=$NODE_RANK DEVICE=${DEVICE:-cuda} BIN_DIR=${BIN_DIR:-/opt/dancegrpo/bin} \
  START_COORDINATOR=0 LOG_DIR=${LOG_DIR:--} exec "$HERE/../launch.sh"
