//! Conversions between wire types (protobuf well-known types, the CLI's enums, BuildKit
//! status messages) and the domain's.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::builds::insights::{MAX_LOG_LINE_BYTES, cut_line};
use crate::db::builds::{NewLogLine, Platform, Step};
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

/// Build steps from BuildKit status messages: one per vertex, in the order first seen,
/// with the last report of each (later reports carry completion and errors).
pub fn steps_from_statuses(statuses: &[StatusResponse]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for status in statuses {
        for v in &status.vertexes {
            if v.digest.is_empty() || v.digest.len() > 256 {
                continue;
            }
            let step = Step {
                digest: v.digest.clone(),
                name: v.name.chars().take(2000).collect(),
                cached: v.cached,
                started_at: v.started.as_ref().and_then(timestamp),
                completed_at: v.completed.as_ref().and_then(timestamp),
                error: (!v.error.is_empty()).then(|| v.error.chars().take(10_000).collect()),
            };
            match index.get(&v.digest) {
                Some(&i) => steps[i] = step,
                None => {
                    index.insert(v.digest.clone(), steps.len());
                    steps.push(step);
                }
            }
        }
    }
    steps
}

/// Step log lines from BuildKit status messages: each VertexLog chunk split into lines
/// (a chunk may hold several, or end mid-line; a trailing partial line is kept as is).
pub fn logs_from_statuses(statuses: &[StatusResponse]) -> Vec<NewLogLine> {
    let mut lines = Vec::new();
    for status in statuses {
        for log in &status.logs {
            if log.vertex.is_empty() || log.vertex.len() > 256 {
                continue;
            }
            let at = log
                .timestamp
                .as_ref()
                .and_then(timestamp)
                .unwrap_or_else(Utc::now);
            let text = String::from_utf8_lossy(&log.msg);
            for line in text.split_terminator('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                lines.push(NewLogLine {
                    digest: log.vertex.clone(),
                    at,
                    message: cut_line(line, MAX_LOG_LINE_BYTES).to_string(),
                });
            }
        }
    }
    lines
}
