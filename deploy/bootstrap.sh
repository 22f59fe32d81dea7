#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh Debian machine with Rust:
#   1. Debian packages the build needs (gloo headers for the c10d shim, protoc for the proto crate);
#   2. the project venv with PyPI torch==2.11.0, which is also the libtorch the worker links.
# With --test (what `make test` runs), also the Debian packages only the tests need: Slurm's
# daemons and client tools and munge, for the test of deploy/slurm/ (tests/tests/slurm.rs),
# which runs a one-machine Slurm cluster of its own (no system service is configured or started).
# Every step checks first and does nothing when it is already done. Safe to run on every `make`.
set -euo pipefail

MODE=${1:-}
case "$MODE" in
  "" | --test) ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

TORCH_VERSION=2.11.0
VENV="${DANCEGRPO_VENV:-$HOME/.cache/dancegrpo/torch-$TORCH_VERSION}"
APT_PACKAGES=(libgloo-dev protobuf-compiler unzip)
# slurm-wlm: slurmctld, slurmd and the client tools (sbatch, srun, scontrol, ...); iproute2:
# `ip netns` for the two-host test (tests/tests/two_hosts.rs); shellcheck for `make lint`.
TEST_APT_PACKAGES=(slurm-wlm munge iproute2 shellcheck)
if [[ "$MODE" == --test ]]; then APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}"); fi

log() { printf '[bootstrap] %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "creating venv $VENV with torch==$TORCH_VERSION (about 80 s, 4.6 GB)"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy
fi
log "ready: venv $VENV"
