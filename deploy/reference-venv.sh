#!/usr/bin/env bash
# The Python reference packages (diffusers, transformers, open_clip), pinned, used by the golden
# scripts and the side-by-side benchmarks; the Prometheus project's parser and TensorBoard's
# event reader, which read our /metrics and event files back in the tests; and the Kubernetes
# JSON schemas (kubernetes-validate, for core/apps/batch kinds) and the Kubeflow training SDK's
# PyTorchJob models, which check deploy/k8s/ in tests/tests/k8s.rs. They go into the
# project venv next to torch, with torch itself held at the pinned version, so torch (4.6 GB)
# exists once.
# Idempotent. Prints the python to use on stdout.
set -euo pipefail

TORCH_VERSION=2.11.0
VENV="${DANCEGRPO_VENV:-$HOME/.cache/dancegrpo/torch-$TORCH_VERSION}"
PINS=(diffusers==0.42.1 transformers==5.24.0 open-clip-torch==3.3.0 safetensors==0.8.0
      ftfy==6.3.1 regex pillow
      sentencepiece==0.2.3 protobuf==7.36.2 tokenizers==0.23.3 peft==0.21.2
      prometheus-client==0.26.0 tensorboard==2.21.0
      kubernetes-validate==1.37.0 kubeflow-training==1.9.4)

"$(dirname "$0")/bootstrap.sh" >&2
stamp="$VENV/.reference-$(echo "${PINS[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[reference-venv] installing ${PINS[*]} into $VENV" >&2
  constraints=$(mktemp)
  echo "torch==$TORCH_VERSION" > "$constraints"
  "$VENV/bin/pip" install -q -c "$constraints" "${PINS[@]}" >&2
  rm -f "$constraints"
  "$VENV/bin/python" -c "import torch, diffusers, transformers, open_clip, peft, prometheus_client, tensorboard, kubernetes_validate, kubeflow.training; assert torch.__version__.startswith('$TORCH_VERSION')" >&2
  touch "$stamp"
fi
echo "$VENV/bin/python"
