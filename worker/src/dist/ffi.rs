//! Declarations of the C ABI in `worker/csrc/dist_shim.h`, and the one helper that turns its
//! error strings into Rust strings.

use std::ffi::{CStr, c_char, c_int, c_void};

/// Opaque `dg_store`.
#[repr(C)]
pub(crate) struct DgStore {
    _private: [u8; 0],
}

/// Opaque `dg_group`.
#[repr(C)]
pub(crate) struct DgGroup {
    _private: [u8; 0],
}

/// Opaque `dg_work`: a started collective.
#[repr(C)]
pub(crate) struct DgWork {
    _private: [u8; 0],
}

/// `at::Tensor`, as tch's `as_mut_ptr()` hands it out (tch does not export its `C_tensor`).
pub(crate) type DgTensor = c_void;

unsafe extern "C" {
    pub(crate) fn dg_free_error(err: *mut c_char);
    pub(crate) fn dg_backends_compiled() -> u32;
    pub(crate) fn dg_store_create(
        host: *const c_char,
        port: u16,
        is_master: c_int,
        timeout_ms: i64,
        connect_timeout_ms: i64,
        listen_fd: c_int,
        out: *mut *mut DgStore,
    ) -> *mut c_char;
    pub(crate) fn dg_store_port(store: *const DgStore) -> u16;
    pub(crate) fn dg_store_destroy(store: *mut DgStore);
    pub(crate) fn dg_store_set(
        store: *mut DgStore,
        key: *const c_char,
        value: *const u8,
        len: usize,
    ) -> *mut c_char;
    pub(crate) fn dg_store_get(
        store: *mut DgStore,
        key: *const c_char,
        timeout_ms: i64,
        buf: *mut u8,
        cap: usize,
        len: *mut usize,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dg_group_create(
        store: *mut DgStore,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        backend: c_int,
        timeout_ms: i64,
        gloo_host: *const c_char,
        out: *mut *mut DgGroup,
    ) -> *mut c_char;
    pub(crate) fn dg_group_destroy(group: *mut DgGroup);
    pub(crate) fn dg_pin_threads(threads: c_int);
    pub(crate) fn dg_dynamic_threads() -> u32;
    pub(crate) fn dg_clear_grad(t: *mut DgTensor) -> *mut c_char;
    pub(crate) fn dg_all_reduce(g: *mut DgGroup, t: *mut DgTensor, average: c_int) -> *mut c_char;
    pub(crate) fn dg_broadcast(g: *mut DgGroup, t: *mut DgTensor, root: c_int) -> *mut c_char;
    pub(crate) fn dg_barrier(g: *mut DgGroup) -> *mut c_char;
    pub(crate) fn dg_all_gather_into(
        g: *mut DgGroup,
        output: *mut DgTensor,
        input: *mut DgTensor,
    ) -> *mut c_char;
    pub(crate) fn dg_reduce_scatter(
        g: *mut DgGroup,
        output: *mut DgTensor,
        input: *mut DgTensor,
        average: c_int,
    ) -> *mut c_char;
    pub(crate) fn dg_all_gather_into_start(
        g: *mut DgGroup,
        output: *mut DgTensor,
        input: *mut DgTensor,
        out: *mut *mut DgWork,
    ) -> *mut c_char;
    pub(crate) fn dg_work_wait(work: *mut DgWork) -> *mut c_char;
}

#[cfg(feature = "npu")]
unsafe extern "C" {
    pub(crate) fn dg_npu_init(index: c_int) -> *mut c_char;
    pub(crate) fn dg_npu_to(t: *mut DgTensor, index: c_int, out: *mut *mut DgTensor)
    -> *mut c_char;
    pub(crate) fn dg_npu_synchronize(index: c_int) -> *mut c_char;
    pub(crate) fn dg_npu_device_count(out: *mut c_int) -> *mut c_char;
}

/// Turns a shim return value into `Err(message)`, releasing the string.
pub(crate) fn check(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc, owned by us now.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { dg_free_error(err) };
    Err(msg)
}
