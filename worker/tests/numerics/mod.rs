//! Included by every numeric test binary (`mod numerics;`): pins libtorch's intra-op thread
//! count before any test runs, with MKL's and OpenMP's dynamic adjustment off
//! ([`dancegrpo_worker::threads::pin`]), so a test's reductions run in the same order whatever
//! the machine's core count or load. The Makefile's `NUMERIC_TESTS` lists these binaries; `make
//! test` runs them again under other kernel sets and under load (`deploy/numeric-passes.sh`).
#![allow(dead_code, unreachable_pub)]

/// The intra-op threads of every numeric test, on every machine.
pub const TEST_THREADS: usize = 2;

extern "C" fn pin() {
    dancegrpo_worker::threads::pin(TEST_THREADS);
}

// Runs before `main` (the test harness), after libtorch's own initialisers: an ELF
// constructor, as the `ctor` crate writes one. The test threads are spawned later and pick the
// count up from libtorch on their first parallel kernel.
#[used]
#[unsafe(link_section = ".init_array")]
static PIN: extern "C" fn() = pin;
