#!/usr/bin/env bash
# Prompt preprocessing with the interface of MindSpeed-MM's preprocess_flux_rl_embeddings.sh:
# one `dancegrpo-worker preprocess` per local device, rank NODE_RANK*NPUS_PER_NODE+i of
# NNODES*NPUS_PER_NODE, each encoding its share of the shards; then `preprocess --merge`, which
# checks every shard and writes OUTPUT_DIR/manifest.json.
#
#   LOAD_PATH=ckpt/flux OUTPUT_DIR=data/rl_embeddings PROMPT_DIR=data/prompts.txt deploy/preprocess.sh
#
# MindSpeed-MM's variables, with its defaults:
#   LOAD_PATH      ckpt/flux           the FLUX.1-dev folder: its text_encoder*/ and tokenizer*/
#   OUTPUT_DIR     data/rl_embeddings  the dataset (shard-*.safetensors + manifest.json): the job's
#                                      data_json_path; a MindSpeed-MM data_path of
#                                      OUTPUT_DIR/videos2caption.json finds it too (deploy/launch.sh)
#   PROMPT_DIR     data/prompts.txt    the prompts, one per line (lines with CJK characters dropped)
#   SAMPLE_NUM     50000               at most this many prompts, the first (its --sample_num)
#   NPUS_PER_NODE  8, NNODES 1, NODE_RANK 0; MASTER_ADDR and MASTER_PORT are accepted and unused:
#                  the ranks share nothing but OUTPUT_DIR.
# And ours: DEVICE=npu (default) | cuda | cpu (cpu: NPUS_PER_NODE processes sharing the cores),
# BIN_DIR (default: this checkout's target/release), LOG_DIR (logs; one log per rank), and
# PREPROCESS_ARGS, more `preprocess` flags for every rank and the merge (e.g. "--shard-size 64").
#
# Relative paths are taken from the current directory, as MindSpeed-MM takes them from its root.
# A re-run skips the shards already written. With NNODES > 1 every node encodes its ranks'
# shards; once all are done, run `deploy/preprocess.sh --merge` where all of OUTPUT_DIR is seen.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

LOAD_PATH=${LOAD_PATH:-ckpt/flux}
OUTPUT_DIR=${OUTPUT_DIR:-data/rl_embeddings}
PROMPT_DIR=${PROMPT_DIR:-data/prompts.txt}
SAMPLE_NUM=${SAMPLE_NUM:-50000}
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))
DEVICE=${DEVICE:-npu}
BIN_DIR=${BIN_DIR:-$ROOT/target/release}
LOG_DIR=${LOG_DIR:-logs}
read -ra extra <<< "${PREPROCESS_ARGS:-}"

die() { echo "preprocess.sh: error: $*" >&2; exit 1; }
[[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
[[ -x "$BIN_DIR/dancegrpo-worker" ]] ||
  die "$BIN_DIR/dancegrpo-worker not found; build with: cargo build --release (add --features npu or cuda)"
[[ -d "$LOAD_PATH" ]] || die "LOAD_PATH=$LOAD_PATH is not a folder (the FLUX.1-dev one, with text_encoder/ etc.)"
[[ -f "$PROMPT_DIR" ]] || die "PROMPT_DIR=$PROMPT_DIR does not exist"

common=(--model-dir "$LOAD_PATH" --prompts "$PROMPT_DIR" --out "$OUTPUT_DIR"
  --max-prompts "$SAMPLE_NUM" ${extra[@]+"${extra[@]}"})
mkdir -p "$LOG_DIR"
stamp=$(date +%Y%m%d_%H%M%S)

merge() {
  "$BIN_DIR/dancegrpo-worker" preprocess "${common[@]}" --merge --rank 0 --world-size 1 \
    2>&1 | tee -a "$LOG_DIR/preprocess_$stamp.log"
}
if [[ "${1:-}" == --merge ]]; then
  merge
  exit
fi
[[ $# -eq 0 ]] || die "unknown argument $1 (the only one is --merge)"

case "$DEVICE" in
  npu)
    if [[ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/cann}/set_env.sh" ]]; then
      # shellcheck disable=SC1091
      source "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/cann}/set_env.sh"
    fi
    ;;
  cuda) ;;
  cpu)
    # Each process pins its threads; without this each would take every core.
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((cores + NPUS_PER_NODE - 1) / NPUS_PER_NODE))}
    ;;
  *) die "DEVICE must be npu, cuda or cpu (got $DEVICE)" ;;
esac

pids=()
# shellcheck disable=SC2317 # invoked by the trap
stop() { for p in ${pids[@]+"${pids[@]}"}; do kill -TERM "$p" 2> /dev/null || true; done; }
trap stop INT TERM
echo "preprocessing $PROMPT_DIR with $LOAD_PATH into $OUTPUT_DIR: node $NODE_RANK, ranks" \
  "$((NODE_RANK * NPUS_PER_NODE))..$(((NODE_RANK + 1) * NPUS_PER_NODE - 1)) of $WORLD_SIZE ($DEVICE)"
for ((local = 0; local < NPUS_PER_NODE; local++)); do
  rank=$((NODE_RANK * NPUS_PER_NODE + local))
  dev=cpu
  [[ "$DEVICE" != cpu ]] && dev="$DEVICE:$local"
  "$BIN_DIR/dancegrpo-worker" preprocess "${common[@]}" --rank "$rank" --world-size "$WORLD_SIZE" \
    --device "$dev" > "$LOG_DIR/preprocess_${stamp}_rank$rank.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  rank=$((NODE_RANK * NPUS_PER_NODE + i))
  log="$LOG_DIR/preprocess_${stamp}_rank$rank.log"
  if wait "${pids[$i]}"; then
    tail -n 1 "$log"
  else
    failed=$((failed + 1))
    echo "preprocess.sh: rank $rank failed; the end of $log:" >&2
    tail -n 5 "$log" >&2
  fi
done
if [[ "$failed" -gt 0 ]]; then
  if [[ "$DEVICE" == npu ]] && grep -q "expected cpu or cuda" "$LOG_DIR/preprocess_${stamp}"_rank*.log; then
    echo "preprocess.sh: this dancegrpo-worker's preprocess cannot use NPUs; DEVICE=cpu (or cuda) can" >&2
  fi
  die "$failed of $NPUS_PER_NODE ranks failed; a re-run keeps the shards that are done"
fi
if [[ "$NNODES" -gt 1 ]]; then
  echo "node $NODE_RANK done; when every node is, run \`deploy/preprocess.sh --merge\` with the" \
    "same variables where all of $OUTPUT_DIR is seen"
  exit 0
fi
merge
