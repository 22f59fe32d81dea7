#!/usr/bin/env bash
# The local demo: DanceGRPO on this machine with a tiny FLUX-shaped model.
#  1. preprocess the demo prompts with the tiny text encoders of the test fixtures;
#  2. start the coordinator and 2 CPU workers (a real Gloo process group);
#  3. train with the JPEG-compressibility reward, printing one row per iteration;
#  4. report the reward at the start and at the end, and where the PNGs are.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${DANCEGRPO_BIN_DIR:-target/debug}"
OUT="${DEMO_OUT:-out/demo}"
rm -rf "$OUT" && mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== preprocessing deploy/demo/prompts.txt"
"$BIN_DIR/dancegrpo-worker" preprocess --model-dir tests/golden/text/model \
  --prompts deploy/demo/prompts.txt --out "$OUT/data" --max-sequence-length 16 --quiet

export MASTER_ADDR=127.0.0.1 NNODES=1 NPUS_PER_NODE=2
# The job's token: the coordinator, the workers and the status commands all read this file, so
# nobody else on the machine can act as a worker or change the job.
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$OUT/token")
export DANCEGRPO_AUTH_TOKEN_FILE="$OUT/token"
# Each worker uses one core; libtorch would otherwise start a thread per core in each.
export OMP_NUM_THREADS=1
# A free port for the c10d store that rank 0 hosts.
STORE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN_DIR/dancegrpo-coordinator" serve --config deploy/configs/demo.toml \
  --set "output_dir=$OUT" --set "data_json_path=$OUT/data" --db "$OUT/coordinator.sqlite" \
  --listen 127.0.0.1:0 --addr-file "$OUT/coordinator.addr" \
  --store-port "$STORE_PORT" --heartbeat-interval-ms 500 2> "$OUT/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do [ -f "$OUT/coordinator.addr" ] && break; sleep 0.1; done
ADDR=$(cat "$OUT/coordinator.addr")
echo "== coordinator listening on $ADDR (log: $OUT/coordinator.log)"

for local in 0 1; do
  NODE_RANK=0 LOCAL_RANK=$local "$BIN_DIR/dancegrpo-worker" run --coordinator "http://$ADDR" \
    --device cpu 2> "$OUT/worker-$local.log" &
  pids+=($!)
done
echo "== 2 workers started (logs: $OUT/worker-*.log); training"
"$BIN_DIR/dancegrpo-coordinator" watch --addr "$ADDR" --table
for p in "${pids[@]:1}"; do wait "$p"; done
echo
"$BIN_DIR/dancegrpo-coordinator" status --addr "$ADDR"
python3 - "$OUT/reward.txt" <<'PY'
import sys
r = [float(l) for l in open(sys.argv[1])]
k = max(1, len(r) // 5)
a, b = sum(r[:k]) / k, sum(r[-k:]) / k
print(f"mean reward: first {k} iterations {a:.4f} -> last {k} iterations {b:.4f} ({b - a:+.4f})")
PY
echo "reward log: $OUT/reward.txt   metrics: $OUT/metrics.jsonl"
echo "reward curve: $OUT/reward_curve.png   sample grids: $OUT/samples/"
echo "checkpoints: $(ls -d "$OUT"/checkpoint-* | tr '\n' ' ')"
