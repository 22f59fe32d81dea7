//! Compiles the v1 protos with tonic-prost-build, and saves the descriptor set for reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["dancegrpo/v1/coordinator.proto", "dancegrpo/v1/job.proto"];
    tonic_prost_build::configure()
        // Served by tonic-reflection, so `grpcurl -plaintext host:port list` works.
        .file_descriptor_set_path(out_dir.join("dancegrpo_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
