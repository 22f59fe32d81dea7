#!/usr/bin/env bash
# Runs the GPU tests (NCCL collectives, CUDA device layer) on a GPU host that already has
# torch==2.11.0 in a Python environment. Needs no network. One rank per visible GPU; a few
# minutes at most.
#
#   deploy/gpu-tests.sh                  build with cargo --offline (crates already fetched, and
#                                        deploy/cuda-check.sh run once for the CUDA headers), run
#   deploy/gpu-tests.sh path/to/dist_loopback-<hash>
#                                        run a test binary that deploy/cuda-check.sh built on a CI
#                                        machine with the same torch; no Rust toolchain needed
#
# PYTHON selects the interpreter whose torch is used (default: DANCEGRPO_VENV's, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DANCEGRPO_VENV:-$HOME/.cache/dancegrpo/torch-2.11.0}"
PYTHON="${PYTHON:-$( [ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo python3 )}"
log() { printf '[gpu-tests] %s\n' "$*" >&2; }

"$PYTHON" - <<'PY'
import sys, torch
v = torch.__version__.split("+")[0]
if v != "2.11.0":
    sys.exit(f"torch {torch.__version__} found; the worker is built for torch 2.11.0")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: run this on a GPU host")
print(f"[gpu-tests] torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}", file=sys.stderr)
PY
TORCH_LIB=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
# A binary built elsewhere has an rpath to that machine's venv; point it at this one.
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ $# -ge 1 ]; then
  log "running $1"
  exec "$1" cuda_ --test-threads=1
fi
VIRTUAL_ENV="$(dirname "$(dirname "$PYTHON")")"
PATH="$(dirname "$PYTHON"):$PATH"
export VIRTUAL_ENV PATH LIBTORCH_USE_PYTORCH=1
exec cargo test --offline -p dancegrpo-worker --features cuda --test dist_loopback -- cuda_ --test-threads=1
