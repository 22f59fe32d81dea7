# The two commands of the README:
#   make demo   set up this machine if needed, then run the local demo
#   make test   set up this machine if needed, then run every check CI runs
# Set-up (deploy/bootstrap.sh) is idempotent: Debian packages + the torch venv in a per-user cache;
# `make test` adds the test-only packages (deploy/bootstrap.sh --test: Slurm, munge).

VENV ?= $(or $(DANCEGRPO_VENV),$(HOME)/.cache/dancegrpo/torch-2.11.0)
export DANCEGRPO_VENV := $(VENV)
# torch-sys finds libtorch through the venv's python (tch's LIBTORCH_USE_PYTORCH mode).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: bootstrap test-bootstrap reference build demo test lint unit-tests numeric-passes npu-check cuda-check

bootstrap:
	@./deploy/bootstrap.sh

# What only the tests need on top (Slurm and munge for tests/tests/slurm.rs, iproute2, shellcheck);
# idempotent.
test-bootstrap:
	@./deploy/bootstrap.sh --test

# The pinned Python reference packages (diffusers, open_clip, peft) that the parity tests
# load saved checkpoints into; idempotent.
reference: bootstrap
	@./deploy/reference-venv.sh > /dev/null

build: bootstrap
	cargo build --workspace --bins

demo: build
	./deploy/demo.sh

SHELL_SCRIPTS := deploy/*.sh deploy/slurm/dancegrpo.sbatch deploy/slurm/node.sh deploy/k8s/node.sh .ci/run

lint: bootstrap test-bootstrap
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	shellcheck -S warning $(SHELL_SCRIPTS)

unit-tests: build reference test-bootstrap
	cargo test --workspace --no-fail-fast

# The test binaries that compare numbers with the Python reference or with torch (each includes
# worker/tests/numerics, which pins its threads). numeric-passes runs them again.
NUMERIC_TESTS := check_cli check_cli_hps data_reference flux_checkpoint flux_latents flux_lora \
	flux_parity hf_clip_parity hps_loading hps_parity preprocess_cli reward_builtin sampler_parity text_parity \
	shard_bf16 threads train_checkpoint train_distributed train_loop_parity train_lr_schedule train_optim \
	vae_parity

# The numeric tests under two other kernel sets and under load (deploy/numeric-passes.sh).
numeric-passes: build reference
	./deploy/numeric-passes.sh $(NUMERIC_TESTS)

test: lint unit-tests numeric-passes npu-check cuda-check

# Compile check of the Ascend (HCCL) shim against the torch-npu wheel's headers; no NPU needed.
npu-check: bootstrap
	./deploy/npu-check.sh

# Build and link check of `--features cuda` (NCCL); no GPU needed. GPU hosts: deploy/gpu-tests.sh.
cuda-check: bootstrap
	./deploy/cuda-check.sh
