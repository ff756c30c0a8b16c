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
}

pub mod moby {
    pub mod buildkit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.rs"));
        }
    }
}

/// The compiled descriptor set of every proto file, for JSON transcoding.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
