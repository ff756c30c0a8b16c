//! Generated protobuf types (prost) for the wire protocols under `proto/`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod depot {
    pub mod cli {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/depot.cli.v1.rs"));
        }
        pub mod v1beta1 {
            include!(concat!(env!("OUT_DIR"), "/depot.cli.v1beta1.rs"));
        }
    }
    pub mod core {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/depot.core.v1.rs"));
        }
    }
    pub mod build {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/depot.build.v1.rs"));
        }
    }
    pub mod buildkit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/depot.buildkit.v1.rs"));
        }
    }
}

/// BuildKit's API: status types (uploaded by the CLI), and the Control and LLBBridge
/// gRPC services with their server and client code (tonic).
pub mod moby {
    pub mod buildkit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.rs"));
            pub mod apicaps {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.apicaps.rs"));
            }
            pub mod frontend {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.frontend.rs"));
            }
            pub mod types {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.types.rs"));
            }
        }
    }
}

/// Kiln's machine-agent protocol (tonic server and client).
pub mod kiln {
    pub mod agent {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/kiln.agent.v1.rs"));
        }
    }
}

/// BuildKit's LLB types (proto package `pb`), as far as the control API embeds them.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pb.rs"));
}

/// The compiled descriptor set of every proto file, for JSON transcoding.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
