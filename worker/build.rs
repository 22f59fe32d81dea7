//! Gives the worker's binaries an rpath to the venv's `torch/lib`, so they run without
//! `LD_LIBRARY_PATH`. The location comes from the same place torch-sys looks: the python on
//! PATH (the project venv, see deploy/bootstrap.sh), or LIBTORCH.

use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(l) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(l).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
    let out = Command::new(python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn main() {
    build_pickle_shim();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=PATH");
    match torch_lib_dir() {
        Some(dir) => println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display()),
        None => println!("cargo:warning=torch not found: binaries will need LD_LIBRARY_PATH"),
    }
}

/// Compiles `csrc/pickle.cpp`, the reader of PyTorch zip pickles (`HPS_v2.1_compressed.pt`),
/// against the headers of the same torch that tch links. Self-contained on purpose: it only
/// needs the torch directory and the C++ ABI flag torch was built with.
fn build_pickle_shim() {
    println!("cargo:rerun-if-changed=csrc/pickle.cpp");
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
    let (torch_dir, cxx11_abi) = match std::env::var("LIBTORCH") {
        Ok(l) => (PathBuf::from(l), std::env::var("LIBTORCH_CXX11_ABI").unwrap_or("1".into())),
        Err(_) => {
            let out = Command::new(&python)
                .args([
                    "-c",
                    "import os, torch; print(os.path.dirname(torch.__file__)); \
                     print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
                ])
                .output()
                .expect("running python to locate torch for csrc/pickle.cpp");
            assert!(
                out.status.success(),
                "python cannot import torch (needed for csrc/pickle.cpp)"
            );
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let mut lines = text.lines();
            let dir = PathBuf::from(lines.next().unwrap_or_default().trim());
            (dir, lines.next().unwrap_or("1").trim().to_string())
        }
    };
    let include = torch_dir.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/pickle.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        // The torch headers are noisy; their warnings are not ours to fix.
        .warnings(false)
        .flag("-w")
        .compile("dg_pickle");
}
