//! Where each volume lives: an RBD namespace per project (or per build, for ephemeral
//! caches) and an image per architecture and cache generation. Names are built only from
//! values checked here, so no input can reach another namespace or image.

use crate::db::builds::Platform;
use crate::error::{Error, Result};

/// A pool, client or namespace name Ceph accepts and a shell or path cannot misread.
pub fn is_ceph_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An id that may become part of a namespace: lowercase letters, digits, '-' and '_'.
fn checked_id<'a>(field: &str, id: &'a str) -> Result<&'a str> {
    let ok = !id.is_empty()
        && id.len() <= 48
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 48 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        ))
    }
}

/// The architecture of a volume, from untrusted text.
pub fn platform(value: &str) -> Result<Platform> {
    Platform::parse(value)
        .ok_or_else(|| Error::invalid("platform", "must be \"amd64\" or \"arm64\""))
}

/// The namespace of a project's volumes: `proj-<project id>`.
pub fn project_namespace(project_id: &str) -> Result<String> {
    Ok(format!("proj-{}", checked_id("project_id", project_id)?))
}

/// The namespace of a project's copy-on-write clones (extra autoscaled builders): apart
/// from the project's own, so a clone's key can write there and only read the project's.
pub fn clone_namespace(project_id: &str) -> Result<String> {
    Ok(format!("proj-{}-x", checked_id("project_id", project_id)?))
}

/// The namespace of a build's ephemeral cache.
pub fn ephemeral_namespace(build_id: &str) -> Result<String> {
    Ok(format!("build-{}", checked_id("build_id", build_id)?))
}

/// A project volume's image: a new name every generation, so a reset never reuses one.
pub fn project_image(platform: Platform, generation: i32) -> String {
    format!("cache-{}-g{}", platform.as_str(), generation.max(0))
}

pub fn clone_image(platform: Platform, machine_id: &str) -> Result<String> {
    Ok(format!(
        "clone-{}-{}",
        platform.as_str(),
        checked_id("machine_id", machine_id)?
    ))
}

pub fn ephemeral_image(platform: Platform) -> String {
    format!("cache-{}", platform.as_str())
}

/// The snapshot a project image is cloned from for one extra builder.
pub fn clone_snapshot(machine_id: &str) -> Result<String> {
    Ok(format!("for-{}", checked_id("machine_id", machine_id)?))
}

/// Whether a namespace is one Kiln creates (the sweep leaves every other one alone).
pub fn is_kiln_namespace(namespace: &str) -> bool {
    (namespace.starts_with("proj-") || namespace.starts_with("build-")) && is_ceph_name(namespace)
}

/// The cephx client of one machine's assignment.
pub fn machine_client(machine_id: &str) -> Result<String> {
    Ok(format!("kiln-m-{}", checked_id("machine_id", machine_id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_their_namespace() {
        assert_eq!(project_namespace("abc123").unwrap(), "proj-abc123");
        for bad in [
            "",
            "../x",
            "a/b",
            "A",
            "a b",
            "a\0",
            "-a",
            "a.b",
            "ä",
            &"a".repeat(49),
        ] {
            assert!(project_namespace(bad).is_err(), "{bad:?} accepted");
            assert!(ephemeral_namespace(bad).is_err(), "{bad:?} accepted");
            assert!(machine_client(bad).is_err(), "{bad:?} accepted");
        }
        assert!(platform("amd64").is_ok());
        for bad in ["", "x86", "amd64/../x", "AMD64"] {
            assert!(platform(bad).is_err());
        }
        assert_eq!(project_image(Platform::Arm64, 3), "cache-arm64-g3");
        assert!(is_kiln_namespace("proj-abc"));
        assert!(!is_kiln_namespace("other"));
        assert!(is_ceph_name("kiln-cache"));
        assert!(!is_ceph_name("a b"));
        assert!(!is_ceph_name(".x"));
    }
}
