//! Thread pinning for deterministic numerics: the numeric test binaries start pinned, and
//! `threads::pin` turns off an OpenMP dynamic adjustment that the environment turned on.

mod numerics;

use std::process::Command;

use dancegrpo_worker::threads;

/// The constructor of `numerics` ran before the harness: a fresh test thread sees the count.
#[test]
fn numeric_test_binaries_start_pinned() {
    assert_eq!(tch::get_num_threads() as usize, numerics::TEST_THREADS);
}

/// Re-executed with `OMP_DYNAMIC=true` (read by libgomp at start-up): adjustment is on until
/// `pin`, and off after it.
#[test]
fn pin_turns_off_dynamic_adjustment_from_the_environment() {
    if std::env::var_os("DG_THREADS_CHILD").is_some() {
        assert!(threads::dynamic_adjustment().openmp, "OMP_DYNAMIC=true did not take effect");
        threads::pin(3);
        assert!(!threads::dynamic_adjustment().openmp, "pin left OpenMP's adjustment on");
        assert_eq!(tch::get_num_threads(), 3);
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pin_turns_off_dynamic_adjustment_from_the_environment", "--nocapture"])
        .env("DG_THREADS_CHILD", "1")
        .env("OMP_DYNAMIC", "true")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}
