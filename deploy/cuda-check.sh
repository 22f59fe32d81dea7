#!/usr/bin/env bash
# CUDA build check, for CI machines without a GPU: builds the worker (and its test binaries)
# with `--features cuda`, i.e. the c10d shim with ProcessGroupNCCL, linked against torch_cuda.
# The headers all come from pip: nvidia-nccl-cu13 and nvidia/cu13 arrive with torch; the two
# header-only wheels below are installed into the venv (torch held at 2.11.0). Idempotent.
# Running the GPU tests needs a GPU: deploy/gpu-tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV="${DANCEGRPO_VENV:-$HOME/.cache/dancegrpo/torch-$TORCH_VERSION}"
PINS=("nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*")
log() { printf '[cuda-check] %s\n' "$*" >&2; }

export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1
stamp="$VENV/.cuda-headers-$(echo "${PINS[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing ${PINS[*]} into $VENV"
  constraints=$(mktemp)
  echo "torch==$TORCH_VERSION" > "$constraints"
  "$VENV/bin/pip" install -q -c "$constraints" "${PINS[@]}"
  rm -f "$constraints"
  touch "$stamp"
fi
# The test binaries are what deploy/gpu-tests.sh can run on a GPU host; their paths come from
# cargo's JSON messages.
bins=$(cargo build -p dancegrpo-worker --features cuda --test dist_loopback --message-format=json-render-diagnostics "$@" \
  | "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "dist_loopback":
        print(m["executable"])')
[ -n "$bins" ] || { log "cargo built no dist_loopback test binary"; exit 1; }
# The link must keep torch_cuda (--no-as-needed), or CUDA is invisible at run time.
for bin in $bins; do
  dynamic=$(readelf -d "$bin")
  [[ "$dynamic" == *libtorch_cuda.so* ]] || { log "$bin does not link libtorch_cuda.so"; exit 1; }
  log "GPU test binary: $bin (deploy/gpu-tests.sh runs it on a GPU host)"
done
log "ok: --features cuda compiles and links (torch_cuda, ProcessGroupNCCL)"
