//! Model images (`kiln::registry::image`): a directory becomes a reproducible OCI image
//! layout, one layer per large file, that unpacks to the very same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::registry::image::{self, BuildError, BuildOptions, EntryKind, LayerFormat};
use sha2::{Digest, Sha256};

fn options() -> BuildOptions {
    BuildOptions {
        large_file_bytes: 4096,
        source: Some("https://huggingface.co/acme/tiny".into()),
        revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
        ..Default::default()
    }
}

use common::files::{pseudo_random, write};

/// A small model: config files, a tokenizer, two weight files, a subdirectory, an
/// executable script and a link inside the directory.
fn model(root: &Path) {
    write(root, "config.json", br#"{"hidden_size": 384}"#);
    write(root, "README.md", b"# tiny\n");
    write(root, "tokenizer.json", &pseudo_random(3000, 1));
    write(root, "model.safetensors", &pseudo_random(200_000, 2));
    write(
        root,
        "1_Pooling/config.json",
        br#"{"pooling_mode_mean_tokens": true}"#,
    );
    write(root, "onnx/model.onnx", &pseudo_random(50_000, 3));
    write(root, "scripts/run.sh", b"#!/bin/sh\necho hi\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("scripts/run.sh"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink("model.safetensors", root.join("weights.safetensors")).unwrap();
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn blob_count(layout: &Path) -> usize {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .count()
}

#[test]
fn the_same_files_give_the_same_digests_wherever_and_whenever_they_are() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    model(a.path());
    // The same files made in another order, elsewhere, later, with other permissions.
    for path in ["onnx/model.onnx", "README.md", "1_Pooling/config.json"] {
        let bytes = std::fs::read(a.path().join(path)).unwrap();
        write(b.path(), path, &bytes);
    }
    model(b.path());
    // Other modification times than the first copy's.
    for path in ["config.json", "model.safetensors", "onnx/model.onnx"] {
        std::fs::File::options()
            .write(true)
            .open(b.path().join(path))
            .unwrap()
            .set_modified(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400),
            )
            .unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        b.path().join("README.md"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let (out_a, out_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = image::build(a.path(), out_a.path(), &options()).unwrap();
    let second = image::build(b.path(), out_b.path(), &options()).unwrap();
    assert_eq!(first.index.digest, second.index.digest);
    assert_eq!(first.layers, second.layers);
    // Building again into the same layout changes nothing.
    let before = blob_count(out_a.path());
    let again = image::build(a.path(), out_a.path(), &options()).unwrap();
    assert_eq!(again.index.digest, first.index.digest);
    assert_eq!(blob_count(out_a.path()), before);
    // Each stored blob is what its digest says.
    for entry in std::fs::read_dir(out_a.path().join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            sha256_file(&entry.path()),
            entry.file_name().to_str().unwrap()
        );
    }
}

#[test]
fn large_files_get_layers_of_their_own_and_unpack_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let out = tempfile::tempdir().unwrap();
    let built = image::build(dir.path(), out.path(), &options()).unwrap();
    let titles: Vec<Vec<String>> = built.layers.iter().map(|l| l.files.clone()).collect();
    assert_eq!(
        titles[1..],
        [
            vec!["model.safetensors".to_string()],
            vec!["onnx/model.onnx".to_string()]
        ]
    );
    assert!(titles[0].contains(&"config.json".to_string()));
    assert!(titles[0].contains(&"weights.safetensors".to_string()));
    assert_eq!(
        built.layers[1].descriptor.annotations,
        vec![(
            "org.opencontainers.image.title".to_string(),
            "model.safetensors".to_string()
        )]
    );

    // Unpack every layer, in order, and compare with the source.
    let mut seen: BTreeMap<String, (u32, u64, String)> = BTreeMap::new();
    for layer in &built.layers {
        let path = blob(out.path(), &layer.descriptor.digest);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            layer.descriptor.size
        );
        // Plain tar: the digest is the diff id.
        assert_eq!(layer.diff_id, layer.descriptor.digest);
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            assert!(header.username().unwrap().unwrap_or_default().is_empty());
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            let content = match header.entry_type() {
                tar::EntryType::Symlink => {
                    format!("-> {}", entry.link_name().unwrap().unwrap().display())
                }
                _ => hex::encode(Sha256::digest(&bytes)),
            };
            seen.insert(
                name.trim_end_matches('/').to_string(),
                (header.mode().unwrap(), bytes.len() as u64, content),
            );
        }
    }
    for entry in &built.entries {
        let (mode, _, content) = &seen[&entry.path];
        match &entry.kind {
            EntryKind::Directory => assert_eq!(*mode, 0o755, "{}", entry.path),
            EntryKind::File { executable, .. } => {
                assert_eq!(
                    content,
                    &sha256_file(&dir.path().join(&entry.path)),
                    "{}",
                    entry.path
                );
                assert_eq!(*mode, if *executable { 0o755 } else { 0o644 });
            }
            EntryKind::Symlink { target } => assert_eq!(content, &format!("-> {target}")),
        }
    }
    assert_eq!(seen.len(), built.entries.len());

    // The index: both platforms, the same layers, the source and revision annotated; the
    // layout names it `latest`.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(out.path(), &built.index.digest)).unwrap())
            .unwrap();
    assert_eq!(index["mediaType"], image::INDEX_MEDIA_TYPE);
    let platforms: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
    assert_eq!(
        index["annotations"]["org.opencontainers.image.revision"],
        "0123456789abcdef0123456789abcdef01234567"
    );
    for manifest in &built.manifests {
        let body: serde_json::Value =
            serde_json::from_slice(&std::fs::read(blob(out.path(), &manifest.digest)).unwrap())
                .unwrap();
        let layers: Vec<&str> = body["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        let built_layers: Vec<&str> = built
            .layers
            .iter()
            .map(|l| l.descriptor.digest.as_str())
            .collect();
        assert_eq!(layers, built_layers);
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(out.path(), body["config"]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        assert_eq!(
            config["rootfs"]["diff_ids"].as_array().unwrap().len(),
            built.layers.len()
        );
        assert_eq!(
            config["architecture"],
            manifest.platform.as_ref().unwrap().architecture
        );
    }
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(
        layout["manifests"][0]["digest"],
        built.index.digest.as_str()
    );
    assert_eq!(
        layout["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
}

#[test]
fn a_revision_that_changes_one_file_adds_one_layer() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let out = tempfile::tempdir().unwrap();
    let first = image::build(dir.path(), out.path(), &options()).unwrap();
    let blobs = blob_count(out.path());
    write(dir.path(), "onnx/model.onnx", &pseudo_random(50_000, 9));
    let mut next = options();
    next.revision = Some("fedcba9876543210fedcba9876543210fedcba98".into());
    next.tags = vec!["latest".into(), next.revision.clone().unwrap()];
    let second = image::build(dir.path(), out.path(), &next).unwrap();
    let changed: Vec<usize> = (0..first.layers.len())
        .filter(|i| first.layers[*i] != second.layers[*i])
        .collect();
    assert_eq!(changed, [2], "only the changed file's layer");
    // One new layer, two configs, two manifests and an index.
    assert_eq!(blob_count(out.path()), blobs + 6);
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).unwrap()).unwrap();
    let named: Vec<(&str, &str)> = layout["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap(),
                m["digest"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            ("latest", second.index.digest.as_str()),
            (
                "fedcba9876543210fedcba9876543210fedcba98",
                second.index.digest.as_str()
            )
        ]
    );
}

#[test]
fn the_layer_count_is_capped_keeping_the_largest_files_apart() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10u8 {
        write(
            dir.path(),
            &format!("shard-{i:02}.bin"),
            &pseudo_random(5000 + usize::from(i) * 1000, i),
        );
    }
    let out = tempfile::tempdir().unwrap();
    let capped = BuildOptions {
        max_layers: 4,
        ..options()
    };
    let built = image::build(dir.path(), out.path(), &capped).unwrap();
    assert_eq!(built.layers.len(), 4);
    let own: Vec<&str> = built.layers[1..]
        .iter()
        .map(|l| l.files[0].as_str())
        .collect();
    assert_eq!(own, ["shard-07.bin", "shard-08.bin", "shard-09.bin"]);
    assert_eq!(built.layers[0].files.len(), 7);
}

#[test]
fn gzip_layers_are_reproducible_and_hold_the_same_tar() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let gzip = BuildOptions {
        format: LayerFormat::Gzip,
        ..options()
    };
    let (a, b, plain) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = image::build(dir.path(), a.path(), &gzip).unwrap();
    let second = image::build(dir.path(), b.path(), &gzip).unwrap();
    assert_eq!(first.index.digest, second.index.digest);
    let tar = image::build(dir.path(), plain.path(), &options()).unwrap();
    for (zipped, plain) in first.layers.iter().zip(&tar.layers) {
        assert_eq!(zipped.descriptor.media_type, image::TAR_GZIP_MEDIA_TYPE);
        assert_eq!(zipped.diff_id, plain.diff_id, "same uncompressed content");
        assert_ne!(zipped.descriptor.digest, plain.descriptor.digest);
    }
}

#[test]
fn bad_directories_are_refused_with_the_reason_and_name_nothing() {
    // A link that leads outside the model directory.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", b"{}");
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = image::build(dir.path(), out.path(), &options()).unwrap_err();
    assert!(
        matches!(&err, BuildError::SymlinkEscapes { path, .. } if path == "passwd"),
        "{err}"
    );
    assert!(!out.path().join("index.json").exists());

    // Through a parent directory, too.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/config.json", b"{}");
    std::os::unix::fs::symlink("../../", dir.path().join("a/up")).unwrap();
    let err = image::build(dir.path(), out.path(), &options()).unwrap_err();
    assert!(err.to_string().contains("a/up"), "{err}");

    // Nothing to ship.
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("nothing")).unwrap();
    let err = image::build(empty.path(), out.path(), &options()).unwrap_err();
    assert!(matches!(err, BuildError::Empty(_)), "{err}");

    // A missing directory.
    let err = image::build(&empty.path().join("absent"), out.path(), &options()).unwrap_err();
    assert!(err.to_string().contains("absent"), "{err}");
    assert!(!out.path().join("index.json").exists());
}

#[test]
fn skopeo_reads_and_copies_the_layout() {
    let skopeo = std::env::var("TEST_SKOPEO").expect(
        "TEST_SKOPEO is not set: run the tests through `bash scripts/test.sh`, which installs skopeo",
    );
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let out = tempfile::tempdir().unwrap();
    let built = image::build(dir.path(), out.path(), &options()).unwrap();
    let layout = format!("oci:{}:latest", out.path().display());
    let raw = std::process::Command::new(&skopeo)
        .args(["inspect", "--raw", &layout])
        .output()
        .unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    assert_eq!(
        hex::encode(Sha256::digest(&raw.stdout)),
        built.index.digest.trim_start_matches("sha256:"),
        "skopeo reads the very index bytes"
    );
    // A copy of every platform verifies every digest and size on the way.
    for arch in ["amd64", "arm64"] {
        let copy = tempfile::tempdir().unwrap();
        let target = format!("oci:{}:copy", copy.path().display());
        let out = std::process::Command::new(&skopeo)
            .args(["--override-arch", arch, "copy", "--quiet", &layout, &target])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let inspect = std::process::Command::new(&skopeo)
            .args(["--override-arch", arch, "inspect", &layout])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(info["Architecture"], arch);
        assert_eq!(
            info["Labels"]["org.opencontainers.image.source"],
            "https://huggingface.co/acme/tiny"
        );
        assert_eq!(info["Layers"].as_array().unwrap().len(), built.layers.len());
    }
}
