// Compiles proto/ with protox (pure Rust, no system protoc, nothing downloaded) and
// generates prost types. The descriptor set is also embedded so the Connect layer can
// transcode JSON requests (prost-reflect). Services in GRPC_PACKAGES additionally get
// tonic gRPC server and client code; the Connect services are served by our own layer
// and get none.
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "depot/cli/v1/build.proto",
    "depot/cli/v1beta1/login.proto",
    "depot/cli/v1beta1/projects.proto",
    "depot/core/v1/organization.proto",
    "depot/core/v1/project.proto",
    "depot/core/v1/build.proto",
    "depot/core/v1/usage.proto",
    "depot/build/v1/build.proto",
    "depot/build/v1/registry.proto",
    "depot/buildkit/v1/buildkit.proto",
    "moby/buildkit/v1/status.proto",
    "moby/buildkit/v1/control.proto",
    "moby/buildkit/v1/frontend/gateway.proto",
    "kiln/agent/v1/agent.proto",
];

/// Proto packages whose services are spoken over gRPC (BuildKit's API, the machine agent).
const GRPC_PACKAGES: &[&str] = &[
    "moby.buildkit.v1",
    "moby.buildkit.v1.frontend",
    "kiln.agent.v1",
];

/// Delegates to tonic's generator for gRPC packages only.
struct GrpcOnly(Box<dyn prost_build::ServiceGenerator>);

impl prost_build::ServiceGenerator for GrpcOnly {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        if GRPC_PACKAGES.contains(&service.package.as_str()) {
            self.0.generate(service, buf);
        }
    }

    fn finalize(&mut self, buf: &mut String) {
        self.0.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.0.finalize_package(package, buf);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let tonic = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .service_generator();
    prost_build::Config::new()
        .service_generator(Box::new(GrpcOnly(tonic)))
        .compile_fds(fds)?;
    Ok(())
}
