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

/// Largest distance in units in the last place between two f32 tensors of one shape.
pub fn max_ulp(a: &tch::Tensor, b: &tch::Tensor) -> i64 {
    assert_eq!(a.size(), b.size());
    let bits = |t: &tch::Tensor| -> Vec<i64> {
        Vec::<f32>::try_from(t.flatten(0, -1))
            .unwrap()
            .into_iter()
            .map(|x| {
                // Map the sign-magnitude bit patterns onto a monotone integer line.
                let i = x.to_bits() as i32 as i64;
                if i < 0 { i64::from(i32::MIN) - i } else { i }
            })
            .collect()
    };
    bits(a).iter().zip(bits(b)).map(|(x, y)| (x - y).abs()).max().unwrap_or(0)
}
