//! Builds the c10d shim (`csrc/`) against the venv's torch headers, and gives the worker's
//! binaries an rpath to the venv's `torch/lib`, so they run without `LD_LIBRARY_PATH`.
//!
//! torch is found once, the way torch-sys finds it: `LIBTORCH`, else the python on PATH (the
//! project venv, see deploy/bootstrap.sh). Features add backends:
//! - `cuda`: ProcessGroupNCCL, headers from the venv's `nvidia/*` wheels, links `torch_cuda`;
//! - `npu`: ProcessGroupHCCL and the NPU device helpers, headers and `libtorch_npu` from the
//!   torch-npu wheel (`TORCH_NPU_ROOT`, else the venv's installed `torch_npu`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> String {
    std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into())
}

/// Runs a python snippet and returns its trimmed stdout.
fn python_out(code: &str) -> Option<String> {
    let out = Command::new(python()).args(["-c", code]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The torch package directory (holding `include/` and `lib/`).
fn torch_dir() -> Option<PathBuf> {
    if let Ok(l) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(l));
    }
    // find_spec does not import torch, so this stays fast.
    python_out(
        "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])",
    )
    .map(PathBuf::from)
}

/// The torch_npu package directory: `TORCH_NPU_ROOT`, else the installed wheel. Not imported,
/// since importing it needs CANN.
fn torch_npu_dir() -> Option<PathBuf> {
    if let Ok(r) = std::env::var("TORCH_NPU_ROOT") {
        return Some(PathBuf::from(r));
    }
    python_out(
        "import importlib.util as u; s = u.find_spec('torch_npu'); \
         print(s.submodule_search_locations[0] if s else '')",
    )
    .filter(|s| !s.is_empty())
    .map(PathBuf::from)
}

/// Header directories of the pip CUDA wheels (`nvidia/nccl`, `nvidia/cu13`, and the
/// header-only `nvidia-cuda-crt` / `nvidia-cuda-cccl` that deploy/cuda-check.sh installs).
fn cuda_includes(torch: &Path) -> Vec<PathBuf> {
    let nvidia = torch.parent().map(|p| p.join("nvidia")).unwrap_or_default();
    let mut dirs = Vec::new();
    for sub in ["nccl/include", "cu13/include", "cu13/include/cccl"] {
        let d = nvidia.join(sub);
        if d.is_dir() {
            dirs.push(d);
        }
    }
    dirs
}

/// The `_GLIBCXX_USE_CXX11_ABI` value torch was built with, read off the library we link:
/// `std::string` in its exported signatures mangles as `std::__cxx11::basic_string` under the
/// new ABI only. Read from the binary because the other sources are not always there: torch's
/// CMake config stopped stating the flag, and a `LIBTORCH` download comes without python.
fn cxx11_abi(torch: &Path) -> &'static str {
    let c10 = torch.join("lib/libc10.so");
    let bytes = std::fs::read(&c10).unwrap_or_else(|e| {
        panic!("reading {} to learn torch's C++ ABI: {e}", c10.display());
    });
    let needle = b"St7__cxx1112basic_string";
    if bytes.windows(needle.len()).any(|w| w == needle) { "1" } else { "0" }
}

fn main() {
    for v in ["LIBTORCH", "PYTHON_SYS_EXECUTABLE", "VIRTUAL_ENV", "TORCH_NPU_ROOT"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    for f in ["csrc/dist_shim.h", "csrc/dist_shim.cpp", "csrc/npu_shim.cpp"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let npu = std::env::var_os("CARGO_FEATURE_NPU").is_some();

    let Some(torch) = torch_dir() else {
        panic!(
            "torch not found: set LIBTORCH, or put the project venv's python on PATH \
             (deploy/bootstrap.sh creates it)"
        );
    };
    let lib = torch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file("csrc/dist_shim.cpp")
        .include("csrc")
        // The Gloo declarations come from Debian's libgloo-dev headers; the implementation
        // that runs is the one inside libtorch_cpu. Debian's libgloo.so is never linked.
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(&torch))
        // torch's own headers are not ours to warn about.
        .flag("-isystem")
        .flag(torch.join("include").to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(torch.join("include/torch/csrc/api/include").to_string_lossy().as_ref())
        .flag_if_supported("-Wno-unused-parameter");

    if cuda {
        b.define("USE_C10D_NCCL", None).define("USE_CUDA", None).define("DG_WITH_NCCL", None);
        let incs = cuda_includes(&torch);
        if incs.is_empty() {
            println!(
                "cargo:warning=no nvidia/* headers next to torch: run deploy/cuda-check.sh once"
            );
        }
        for d in incs {
            b.flag("-isystem").flag(d.to_string_lossy().as_ref());
        }
        // Without --no-as-needed the linker drops torch_cuda (nothing references it directly),
        // and CUDA stays invisible to libtorch at run time.
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    if npu {
        let Some(npu_dir) = torch_npu_dir() else {
            panic!(
                "feature `npu`: torch_npu not found; install torch-npu==2.11.0 into the venv or \
                 set TORCH_NPU_ROOT (see deploy/ASCEND.md)"
            );
        };
        let inc = npu_dir.join("include");
        b.define("DG_WITH_HCCL", None).file("csrc/npu_shim.cpp");
        // torch_npu's headers include c10d's as `<c10d/...>`.
        let c10d_parent = torch.join("include/torch/csrc/distributed");
        let dirs = [
            c10d_parent,
            inc.clone(),
            inc.join("third_party/hccl/inc"),
            inc.join("third_party/acl/inc"),
        ];
        for d in dirs {
            b.flag("-isystem").flag(d.to_string_lossy().as_ref());
        }
        let npu_lib = npu_dir.join("lib");
        println!("cargo:rustc-link-search=native={}", npu_lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_npu,--as-needed");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", npu_lib.display());
    }
    b.compile("dancegrpo_dist_shim");
}
