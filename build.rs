// Compiles proto/ with protox (pure Rust, no system protoc, nothing downloaded) and
// generates prost types. The descriptor set is also embedded so the Connect layer can
// transcode JSON requests (prost-reflect).
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "depot/cli/v1/build.proto",
    "depot/cli/v1beta1/login.proto",
    "depot/cli/v1beta1/projects.proto",
    "depot/core/v1/organization.proto",
    "depot/core/v1/project.proto",
    "moby/buildkit/v1/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
