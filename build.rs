//! Compiles `proto/gpuwarden/v1/*.proto` with a vendored `protoc`, so a fresh
//! machine needs no protobuf compiler installed, and writes the descriptor set
//! that the gRPC reflection service serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/gpuwarden/v1/types.proto",
    "proto/gpuwarden/v1/node_agent.proto",
    "proto/gpuwarden/v1/control_plane.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let includes = [PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        // Services whose behaviour has not landed yet answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("gpuwarden_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
