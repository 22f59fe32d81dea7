//! Deterministic CPU numerics: a fixed intra-op thread count, with the thread runtimes'
//! dynamic adjustment off.
//!
//! libtorch splits a parallel kernel into one chunk per thread of the OpenMP team, and MKL splits
//! its BLAS calls the same way, so the team size decides the order of every parallel sum. Left
//! alone, libtorch sizes the team from the core count (or `OMP_NUM_THREADS`) and MKL may shrink
//! its own per call (`MKL_DYNAMIC`, on by default until `at::set_num_threads` is called), as
//! OpenMP does under `OMP_DYNAMIC=true`. Then the same process on the same input can round
//! differently from run to run, and a resume is no longer bit-identical to the run it resumes.
//! [`pin`] fixes all three.

/// Fixes libtorch's intra-op thread count at `threads` (at least 1) and turns off MKL's and the
/// calling thread's OpenMP dynamic adjustment. OpenMP keeps that flag per thread (its default,
/// off, comes from `OMP_DYNAMIC` at start-up), so the thread that runs the model calls this.
pub fn pin(threads: usize) {
    let threads = threads.clamp(1, i32::MAX as usize) as i32;
    // SAFETY: plain calls into the thread runtimes; no pointers cross.
    unsafe { crate::dist::ffi::dg_pin_threads(threads) };
}

/// Pins at libtorch's current count (`OMP_NUM_THREADS`, else one per core): what a process that
/// chooses no count of its own uses, with the adjustment off.
pub fn pin_default() -> usize {
    let n = tch::get_num_threads().max(1) as usize;
    pin(n);
    n
}

/// Whether the calling thread's OpenMP, and MKL, may change the team size on their own.
/// A runtime whose switch cannot be read counts as off.
pub fn dynamic_adjustment() -> DynamicThreads {
    // SAFETY: as in `pin`.
    let bits = unsafe { crate::dist::ffi::dg_dynamic_threads() };
    DynamicThreads { openmp: bits & 1 != 0, mkl: bits & 2 != 0 }
}

/// The state [`dynamic_adjustment`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicThreads {
    /// OpenMP's `dyn-var` of the calling thread.
    pub openmp: bool,
    /// MKL's dynamic mode (not readable from libtorch's MKL: reported off).
    pub mkl: bool,
}
