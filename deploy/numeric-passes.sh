#!/usr/bin/env bash
# The numeric parity tests again, under conditions the first pass of `make test` did not see, so
# a bound that holds only for this machine's kernels, or only on an idle machine, fails here and
# not on a user's machine:
#   1. ATen's AVX2 kernels and MKL restricted to AVX2 (on an AVX-512 machine: other kernels);
#   2. ATen's portable `default` kernels and MKL restricted to SSE4.2;
#   3. this machine's own kernels with a busy loop on every core, plus the two end-to-end runs
#      that must be bit-identical to an uninterrupted run (a resume, a killed worker).
# Only the binaries named in NUMERIC_TESTS run again (the Makefile passes them), so the added
# time is theirs alone. Usage: deploy/numeric-passes.sh test1 test2 ...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 <test binary>..." >&2; exit 2; }
args=()
for t in "$@"; do
  # A numeric test pins its threads; one that does not would make these passes meaningless.
  grep -q '^mod numerics;' "worker/tests/$t.rs" || { echo "worker/tests/$t.rs: no 'mod numerics;'" >&2; exit 1; }
  args+=(--test "$t")
done
# Every test that pins is listed, so none is left out of these passes.
for f in $(grep -l '^mod numerics;' worker/tests/*.rs); do
  t=$(basename "$f" .rs)
  [[ " $* " == *" $t "* ]] || { echo "$f pins its threads but is not in NUMERIC_TESTS" >&2; exit 1; }
done

pass() {
  local name=$1; shift
  echo "== numeric tests: $name"
  env "$@" cargo test -p dancegrpo-worker "${args[@]}" --no-fail-fast -q
}

pass "AVX2 kernels" ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
pass "default kernels" ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2

busy=()
stop_busy() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_busy EXIT
for _ in $(seq "$(nproc)"); do
  ( while :; do :; done ) &
  busy+=($!)
done
pass "under load ($(nproc) busy loops)"
echo "== end-to-end resume and recovery: under load"
cargo test -p dancegrpo-e2e --test training -q -- --exact \
  resuming_from_a_checkpoint_is_bit_identical \
  a_killed_worker_rejoins_and_the_result_equals_an_uninterrupted_run
