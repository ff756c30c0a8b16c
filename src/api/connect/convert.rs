//! Conversions between wire types (protobuf well-known types, the CLI's enums, BuildKit
//! status messages) and the domain's.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::db::builds::{Platform, Step};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1 as cli;
use crate::proto::moby::buildkit::v1::StatusResponse;

pub fn timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// Maps the CLI's platform enum; 0 (unspecified) is a client bug.
pub fn platform(value: i32) -> Result<Platform> {
    match cli::BuilderPlatform::try_from(value) {
        Ok(cli::BuilderPlatform::Amd64) => Ok(Platform::Amd64),
        Ok(cli::BuilderPlatform::Arm64) => Ok(Platform::Arm64),
        _ => Err(Error::invalid(
            "platform",
            "must be BUILDER_PLATFORM_AMD64 or BUILDER_PLATFORM_ARM64",
        )),
    }
}

/// The targets' options of a CreateBuild, as stored with the build.
pub fn build_options_json(options: &[cli::BuildOptions]) -> serde_json::Value {
    serde_json::Value::Array(
        options
            .iter()
            .map(|o| {
                json!({
                    "command": o.command,
                    "tags": o.tags,
                    "push": o.push,
                    "load": o.load,
                    "save": o.save,
                    "lint": o.lint,
                    "target": o.target_name,
                    "outputs": o.outputs.iter().map(|out| json!({"kind": out.kind, "attributes": out.attributes})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Build steps from BuildKit status messages: one per vertex, the last report of each
/// (later reports carry completion and errors).
pub fn steps_from_statuses(statuses: &[StatusResponse]) -> Vec<Step> {
    let mut steps = std::collections::HashMap::new();
    for status in statuses {
        for v in &status.vertexes {
            if v.digest.is_empty() || v.digest.len() > 256 {
                continue;
            }
            steps.insert(
                v.digest.clone(),
                Step {
                    digest: v.digest.clone(),
                    name: v.name.chars().take(2000).collect(),
                    cached: v.cached,
                    started_at: v.started.as_ref().and_then(timestamp),
                    completed_at: v.completed.as_ref().and_then(timestamp),
                    error: (!v.error.is_empty()).then(|| v.error.chars().take(10_000).collect()),
                },
            );
        }
    }
    steps.into_values().collect()
}
