//! Reads PyTorch zip pickles (what `torch.save` writes since 1.6) with libtorch's own C++
//! unpickler, through the small shim in `worker/csrc/pickle.cpp`.
//!
//! Why this route: tch only exposes `torch::jit::_load_parameters`, which accepts a flat
//! `{name: tensor}` dict and so rejects `HPS_v2.1_compressed.pt` (`{'state_dict': {...}}`).
//! libtorch's unpickler is the reader PyTorch itself maintains for this format and resolves
//! only a fixed set of globals (no code execution); a Rust pickle VM (candle's) would mean
//! either pulling all of candle or keeping our own copy of the format in step with PyTorch.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

use tch::Tensor;

use super::ClipError;

type Emit = unsafe extern "C" fn(*mut c_void, *const c_char, usize, *mut torch_sys::C_tensor);

unsafe extern "C" {
    fn dg_pickle_load(
        path: *const c_char,
        key: *const c_char,
        emit: Emit,
        ctx: *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn dg_pickle_free_error(err: *mut c_char);
}

unsafe extern "C" fn collect(
    ctx: *mut c_void,
    name: *const c_char,
    len: usize,
    tensor: *mut torch_sys::C_tensor,
) {
    // SAFETY: ctx is the `Vec` passed by `read_pickle` below, alive for the whole call; name
    // points at `len` bytes owned by the caller; tensor is a fresh `new at::Tensor` whose
    // ownership passes to us (tch frees it with `delete`).
    unsafe {
        let out = &mut *(ctx as *mut Vec<(String, Tensor)>);
        let bytes = std::slice::from_raw_parts(name as *const u8, len);
        out.push((String::from_utf8_lossy(bytes).into_owned(), Tensor::from_ptr(tensor)));
    }
}

/// Reads the tensors of a PyTorch zip pickle at `path`, on the CPU, in the file's order.
///
/// The root must be a dict of tensors, or a dict holding such a dict under `key` (HPSv2's
/// `{'state_dict': ...}`); any other value is an error naming its entry.
pub fn read_pickle(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>, ClipError> {
    let read_err = |message: String| ClipError::Read { path: path.display().to_string(), message };
    if !path.is_file() {
        return Err(read_err("no such file".into()));
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| read_err("path contains a NUL byte".into()))?;
    let c_key = CString::new(key.unwrap_or("")).map_err(|_| read_err("key has a NUL".into()))?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; `collect` matches the C signature.
    let rc = unsafe {
        dg_pickle_load(
            c_path.as_ptr(),
            c_key.as_ptr(),
            collect,
            &mut out as *mut Vec<(String, Tensor)> as *mut c_void,
            &mut err,
        )
    };
    if rc != 0 {
        let message = if err.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: err is a NUL-terminated malloc'ed string from the shim; freed right after.
            let m = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
            unsafe { dg_pickle_free_error(err) };
            m
        };
        // libtorch messages carry a C++ backtrace after the first line; keep the first lines.
        let short: Vec<&str> = message.lines().take(2).collect();
        return Err(read_err(short.join(" ")));
    }
    Ok(out)
}
