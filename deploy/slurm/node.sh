#!/usr/bin/env bash
# The per-node step of deploy/slurm/dancegrpo.sbatch (srun runs it once on every node): takes
# this node's NODE_RANK from Slurm, checks what the batch step derived, and runs
# deploy/launch.sh. Every variable launch.sh reads comes through from sbatch's environment.
set -euo pipefail

die() { echo "node.sh: error on ${SLURMD_NODENAME:-?}: $*" >&2; exit 1; }

[[ -n "${SLURM_STEP_ID:-}" ]] || die "not in a Slurm step: deploy/slurm/dancegrpo.sbatch runs this through srun"
: "${REPO_DIR:?set by dancegrpo.sbatch}" "${NNODES:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"

# One task per node: the task's rank is the node's rank.
[[ "${SLURM_NTASKS:-}" == "$NNODES" && "${SLURM_LOCALID:-}" == 0 ]] ||
  die "$SLURM_NTASKS tasks for $NNODES nodes (local id ${SLURM_LOCALID:-?}): run one task per node (--ntasks-per-node=1)"
NODE_RANK=$SLURM_NODEID
[[ "$NODE_RANK" == "$SLURM_PROCID" ]] || die "node id $NODE_RANK is not task rank $SLURM_PROCID"

# Accelerators per node: as given, else as many as Slurm gave this node (--gpus-per-node,
# --gres=gpu:N), else one CPU worker, or launch.sh's 8 NPUs (Slurm does not count NPU gres).
gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -n "${NPUS_PER_NODE:-}" ]]; then
  [[ -z "$gpus" || "$gpus" == "$NPUS_PER_NODE" ]] ||
    die "Slurm gave this node $gpus GPUs (SLURM_GPUS_ON_NODE), NPUS_PER_NODE=$NPUS_PER_NODE: every node runs NPUS_PER_NODE workers; ask for nodes of one kind"
elif [[ -n "$gpus" ]]; then
  NPUS_PER_NODE=$gpus
elif [[ "${DEVICE:-npu}" == cpu ]]; then
  NPUS_PER_NODE=1
else
  NPUS_PER_NODE=8
fi

if [[ -n "${DANCEGRPO_AUTH_TOKEN_FILE:-}" && ! -r "$DANCEGRPO_AUTH_TOKEN_FILE" ]]; then
  die "cannot read DANCEGRPO_AUTH_TOKEN_FILE=$DANCEGRPO_AUTH_TOKEN_FILE here: put it on storage every node sees (TOKEN_DIR)"
fi

export NODE_RANK NPUS_PER_NODE
echo "node $SLURMD_NODENAME: NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NPUS_PER_NODE=$NPUS_PER_NODE"
exec bash "$REPO_DIR/deploy/launch.sh"
