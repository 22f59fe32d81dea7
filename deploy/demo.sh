#!/usr/bin/env bash
# The local demo: a coordinator and 2 CPU workers on this machine. They register, get ranks,
# heartbeat, and show up in the job status; then the workers are stopped with SIGTERM and
# leave cleanly. (The training loop joins this demo as it lands.)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${DANCEGRPO_BIN_DIR:-target/debug}"
OUT="${DEMO_OUT:-out/demo}"
rm -rf "$OUT" && mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

export MASTER_ADDR=127.0.0.1 NNODES=1 NPUS_PER_NODE=2
# A free port for the c10d store that rank 0 hosts.
STORE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN_DIR/dancegrpo-coordinator" serve --config deploy/configs/demo.toml \
  --set "output_dir=$OUT" --listen 127.0.0.1:0 --addr-file "$OUT/coordinator.addr" \
  --store-port "$STORE_PORT" --heartbeat-interval-ms 500 2> "$OUT/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do [ -f "$OUT/coordinator.addr" ] && break; sleep 0.1; done
ADDR=$(cat "$OUT/coordinator.addr")
echo "coordinator listening on $ADDR (log: $OUT/coordinator.log)"

for local in 0 1; do
  NODE_RANK=0 LOCAL_RANK=$local "$BIN_DIR/dancegrpo-worker" run --coordinator "http://$ADDR" \
    --device cpu 2> "$OUT/worker-$local.log" &
  pids+=($!)
done

for _ in $(seq 300); do
  n=$(cat "$OUT"/worker-*.log 2>/dev/null | grep -c "process group ready" || true)
  [ "$n" -ge 2 ] && break
  sleep 0.2
done
grep -h "process group ready" "$OUT"/worker-*.log | sed 's/^/  /' 
sleep 1.2   # a couple of heartbeats, so "last heartbeat" is live
echo
"$BIN_DIR/dancegrpo-coordinator" status --addr "$ADDR"
echo
echo "stopping the workers with SIGTERM (they drain and say goodbye)"
kill -TERM "${pids[1]}" "${pids[2]}"
wait "${pids[1]}" "${pids[2]}"
"$BIN_DIR/dancegrpo-coordinator" status --addr "$ADDR"
