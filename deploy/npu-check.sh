#!/usr/bin/env bash
# NPU compile check, for CI machines without an Ascend NPU: compiles the `npu` build of the c10d
# shim (worker/csrc/dist_shim.cpp with ProcessGroupHCCL, and worker/csrc/npu_shim.cpp) to object
# files against the real torch-npu==2.11.0 headers, so API drift in torch_npu fails CI.
# It cannot link here: libtorch_npu needs CANN. The real Ascend build is in deploy/ASCEND.md.
#
# The wheel (about 40 MB) is fetched once with `pip download --no-deps` and cached, with its
# unpacked include/, under ~/.cache/dancegrpo/ (DANCEGRPO_CACHE overrides). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_NPU_VERSION=2.11.0
VENV="${DANCEGRPO_VENV:-$HOME/.cache/dancegrpo/torch-2.11.0}"
PY="$VENV/bin/python"
CACHE="${DANCEGRPO_CACHE:-$HOME/.cache/dancegrpo}/torch-npu-$TORCH_NPU_VERSION"
log() { printf '[npu-check] %s\n' "$*" >&2; }

mkdir -p "$CACHE/wheel"
wheel=$(ls "$CACHE"/wheel/torch_npu-"$TORCH_NPU_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  log "downloading torch-npu==$TORCH_NPU_VERSION (no deps) into $CACHE/wheel"
  "$PY" -m pip download -q --no-deps "torch-npu==$TORCH_NPU_VERSION" -d "$CACHE/wheel"
  wheel=$(ls "$CACHE"/wheel/torch_npu-"$TORCH_NPU_VERSION"-*.whl | head -n1)
fi
NPU_INC="$CACHE/unpacked/torch_npu/include"
if [ ! -f "$CACHE/unpacked/.done" ]; then
  log "unpacking torch_npu/include from $(basename "$wheel")"
  rm -rf "$CACHE/unpacked"
  unzip -q -o "$wheel" 'torch_npu/include/*' -d "$CACHE/unpacked"
  touch "$CACHE/unpacked/.done"
fi

TORCH_DIR=$("$PY" -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])")
# The C++ ABI torch was built with, read off its library as worker/build.rs does.
if grep -q 'St7__cxx1112basic_string' "$TORCH_DIR/lib/libc10.so"; then ABI=1; else ABI=0; fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-std=c++17 -fPIC -O0 -DUSE_C10D_GLOO -DDG_WITH_HCCL "-D_GLIBCXX_USE_CXX11_ABI=$ABI"
       -Iworker/csrc
       -isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include"
       -isystem "$TORCH_DIR/include/torch/csrc/distributed"
       -isystem "$NPU_INC" -isystem "$NPU_INC/third_party/hccl/inc"
       -isystem "$NPU_INC/third_party/acl/inc")
for src in worker/csrc/dist_shim.cpp worker/csrc/npu_shim.cpp; do
  obj="$OUT/$(basename "$src" .cpp).o"
  log "compiling $src"
  "${CXX:-c++}" "${FLAGS[@]}" -c "$src" -o "$obj"
done

# The objects must define the C ABI and really reach into torch_npu: a build that silently
# compiled the HCCL branch out would pass the compile step above, but not this. (Symbols go to
# files first: `nm | grep -q` under pipefail fails when grep exits early.)
nm -C "$OUT/dist_shim.o" > "$OUT/dist_shim.sym"
nm -C "$OUT/npu_shim.o" > "$OUT/npu_shim.sym"
need() { grep -q "$2" "$OUT/$1.sym" || { log "$1.o: no symbol matching '$2'"; exit 1; }; }
need dist_shim ' T dg_group_create$'
need dist_shim ' U c10d_npu::ProcessGroupHCCL::ProcessGroupHCCL('
for sym in dg_npu_init dg_npu_to dg_npu_synchronize dg_npu_device_count; do
  need npu_shim " T $sym\$"
done
need npu_shim ' U torch_npu::init_npu('
log "ok: the npu shim compiles against torch-npu==$TORCH_NPU_VERSION headers"
