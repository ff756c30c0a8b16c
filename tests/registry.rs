//! The model registry end to end: `kiln models import` semantics through the domain, the
//! read-only `/v2/` API over a real socket (headers, HEAD, Range, conditional GET,
//! listings, errors), storage in a local directory, and real OCI clients (skopeo).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Server, TestDb, app_with, operator};
use kiln::registry::models::DirectoryImport;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What skopeo and buildah send: six Accept lines.
const SKOPEO_ACCEPT: [&str; 6] = [
    MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    INDEX,
];

use common::files::{pseudo_random, write};

/// A model with a model card, small files, a nested directory and a 5 MiB weight file
/// (a layer of its own at the default 4 MiB threshold).
fn model(root: &Path) {
    write(
        root,
        "README.md",
        b"---\nlicense: apache-2.0\n---\n# tiny model\n",
    );
    write(root, "config.json", br#"{"hidden_size": 384}"#);
    write(root, "1_Pooling/config.json", br#"{"mean": true}"#);
    write(root, "tokenizer.json", &pseudo_random(20_000, 1));
    write(
        root,
        "model.safetensors",
        &pseudo_random(5 * 1024 * 1024, 2),
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 of every regular file under `root`, by relative path.
fn file_hashes(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, sha256_hex(&std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

struct Registry {
    _db: TestDb,
    _store: tempfile::TempDir,
    app: kiln::app::AppState,
    server: Server,
    http: reqwest::Client,
}

/// The S3 store of the test run (Ceph's radosgw, started by scripts/test.sh), under a
/// prefix of its own.
fn s3_overrides(prefix: &str) -> Vec<(String, String)> {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests through `bash scripts/test.sh`, which starts radosgw")
        })
    };
    vec![
        ("KILN_MODELS__STORE".into(), "s3".into()),
        ("KILN_MODELS__S3__ENDPOINT".into(), var("TEST_S3_ENDPOINT")),
        ("KILN_MODELS__S3__BUCKET".into(), var("TEST_S3_BUCKET")),
        (
            "KILN_MODELS__S3__ACCESS_KEY_ID".into(),
            var("TEST_S3_ACCESS_KEY"),
        ),
        (
            "KILN_MODELS__S3__SECRET_ACCESS_KEY".into(),
            var("TEST_S3_SECRET_KEY"),
        ),
        ("KILN_MODELS__S3__ALLOW_HTTP".into(), "true".into()),
        ("KILN_MODELS__S3__PREFIX".into(), prefix.into()),
    ]
}

impl Registry {
    async fn start(extra: &[(&str, &str)]) -> Registry {
        let db = TestDb::new().await;
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().display().to_string();
        let mut overrides = vec![("KILN_MODELS__LOCAL__DIR", dir.as_str())];
        overrides.extend_from_slice(extra);
        let app = app_with(&db, &overrides);
        let server = Server::start(&db, &overrides).await;
        Registry {
            _db: db,
            _store: store,
            app,
            server,
            http: reqwest::Client::new(),
        }
    }

    async fn import(
        &self,
        name: &str,
        dir: &Path,
        revision: Option<&str>,
    ) -> kiln::registry::models::Imported {
        self.app
            .models
            .import_directory(
                &operator(),
                DirectoryImport {
                    name: name.into(),
                    dir: dir.to_path_buf(),
                    revision: revision.map(str::to_string),
                    tags: vec![],
                    source: Some("https://huggingface.co/acme/tiny".into()),
                    license: None,
                    hub_repository: None,
                },
            )
            .await
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    /// A GET answered with JSON.
    async fn json(&self, path: &str) -> serde_json::Value {
        self.get(path, &[]).await.json().await.unwrap()
    }

    /// The linux/amd64 manifest of an image, through its index.
    async fn amd64_manifest(&self, name: &str, reference: &str) -> serde_json::Value {
        let index = self
            .json(&format!("/v2/{name}/manifests/{reference}"))
            .await;
        let amd64 = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        self.json(&format!("/v2/{name}/manifests/{amd64}")).await
    }

    async fn head(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.head(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {res:?}"))
        .to_str()
        .unwrap()
}

async fn error_code(res: reqwest::Response) -> String {
    assert_eq!(header(&res, "content-type"), "application/json");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body["errors"][0]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn manifests_answer_get_and_head_with_the_same_headers() {
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(imported.tags, ["latest", "rev1"]);
    assert_eq!(
        imported.layers, 2,
        "small files together, the weights alone"
    );

    let base = registry.get("/v2/", &[]).await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(
        header(&base, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert_eq!(base.text().await.unwrap(), "{}");

    let accept: Vec<(&str, &str)> = SKOPEO_ACCEPT.iter().map(|t| ("accept", *t)).collect();
    for reference in ["latest", "rev1", imported.digest.as_str()] {
        let path = format!("/v2/acme/tiny/manifests/{reference}");
        let get = registry.get(&path, &accept).await;
        assert_eq!(get.status(), StatusCode::OK, "{reference}");
        let head = registry.head(&path, &accept).await;
        assert_eq!(head.status(), StatusCode::OK);
        for name in [
            "content-type",
            "docker-content-digest",
            "content-length",
            "etag",
        ] {
            assert_eq!(
                header(&get, name),
                header(&head, name),
                "{name} of {reference}"
            );
        }
        assert_eq!(header(&get, "content-type"), INDEX);
        assert_eq!(header(&get, "docker-content-digest"), imported.digest);
        assert_eq!(header(&get, "etag"), format!("\"{}\"", imported.digest));
        assert!(get.headers().get("content-encoding").is_none());
        let length: usize = header(&head, "content-length").parse().unwrap();
        let body = get.bytes().await.unwrap();
        assert_eq!(body.len(), length, "HEAD's Content-Length is the body's");
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), imported.digest);
        assert!(head.bytes().await.unwrap().is_empty());
    }

    // Conditional GET.
    let etag = format!("\"{}\"", imported.digest);
    let cached = registry
        .get(
            "/v2/acme/tiny/manifests/latest",
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);

    // A client that reads image manifests only gets the linux/amd64 one by tag; by
    // digest the index is refused rather than changed.
    let only_manifests = [("accept", MANIFEST)];
    let fallback = registry
        .get("/v2/acme/tiny/manifests/latest", &only_manifests)
        .await;
    assert_eq!(fallback.status(), StatusCode::OK);
    assert_eq!(header(&fallback, "content-type"), MANIFEST);
    let manifest: serde_json::Value = fallback.json().await.unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    let refused = registry
        .get(
            &format!("/v2/acme/tiny/manifests/{}", imported.digest),
            &only_manifests,
        )
        .await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(refused).await, "MANIFEST_UNKNOWN");

    // The index names both platforms; each manifest and config is there by digest.
    let index: serde_json::Value = registry.json("/v2/acme/tiny/manifests/latest").await;
    let platforms: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
    assert_eq!(
        index["annotations"]["org.opencontainers.image.licenses"], "apache-2.0",
        "the license comes from the model card"
    );
    registry.server.stop().await;
}

#[tokio::test]
async fn blobs_stream_with_ranges_and_never_416_a_valid_multi_range() {
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), None).await;
    let manifest = registry.amd64_manifest("acme/tiny", &imported.digest).await;
    let weights = &manifest["layers"][1];
    assert_eq!(
        weights["annotations"]["org.opencontainers.image.title"],
        "model.safetensors"
    );
    let digest = weights["digest"].as_str().unwrap();
    let size = weights["size"].as_u64().unwrap();
    let path = format!("/v2/acme/tiny/blobs/{digest}");

    let whole = registry.get(&path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(header(&whole, "docker-content-digest"), digest);
    assert_eq!(header(&whole, "accept-ranges"), "bytes");
    assert!(
        whole.headers().get("content-encoding").is_none(),
        "never compressed"
    );
    let body = whole.bytes().await.unwrap();
    assert_eq!(body.len() as u64, size);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);

    let head = registry.head(&path, &[]).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, "content-length"), size.to_string());
    assert_eq!(header(&head, "docker-content-digest"), digest);

    let one = registry.get(&path, &[("range", "bytes=0-9")]).await;
    assert_eq!(one.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&one, "content-range"), format!("bytes 0-9/{size}"));
    assert_eq!(one.bytes().await.unwrap(), body.slice(0..10));
    let suffix = registry.get(&path, &[("range", "bytes=-100")]).await;
    assert_eq!(suffix.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        suffix.bytes().await.unwrap(),
        body.slice(body.len() - 100..)
    );

    // Several ranges: 206 multipart/byteranges, one part per range.
    let many = registry
        .get(&path, &[("range", "bytes=0-1,1000-1009,5000000-")])
        .await;
    assert_eq!(many.status(), StatusCode::PARTIAL_CONTENT);
    let content_type = header(&many, "content-type").to_string();
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .expect("multipart answer")
        .to_string();
    let declared: usize = header(&many, "content-length").parse().unwrap();
    let multipart = many.bytes().await.unwrap();
    assert_eq!(multipart.len(), declared);
    let text = multipart.to_vec();
    let mut parts = Vec::new();
    let delimiter = format!("--{boundary}");
    let mut rest = &text[..];
    while let Some(at) = find(rest, delimiter.as_bytes()) {
        rest = &rest[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n").unwrap();
        let head = String::from_utf8(rest[..head_end].to_vec()).unwrap();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: bytes "))
            .unwrap()
            .to_string();
        let (span, _) = range.split_once('/').unwrap();
        let (start, end) = span.split_once('-').unwrap();
        let (start, end): (usize, usize) = (start.parse().unwrap(), end.parse().unwrap());
        let data = &rest[head_end + 4..head_end + 4 + (end - start + 1)];
        assert_eq!(data, &body[start..=end], "part {range}");
        parts.push(range);
    }
    assert_eq!(
        parts,
        [
            format!("0-1/{size}"),
            format!("1000-1009/{size}"),
            format!("5000000-{}/{size}", size - 1)
        ]
    );

    // Overlapping and adjacent ranges are merged, in order.
    let merged = registry
        .get(&path, &[("range", "bytes=1000-1009,0-9,5-14,15-19")])
        .await;
    assert_eq!(merged.status(), StatusCode::PARTIAL_CONTENT);
    let merged_type = header(&merged, "content-type").to_string();
    assert!(
        merged_type.starts_with("multipart/byteranges"),
        "{merged_type}"
    );
    let merged_body = merged.bytes().await.unwrap();
    assert!(find(&merged_body, b"Content-Range: bytes 0-19/").is_some());
    assert!(find(&merged_body, b"Content-Range: bytes 1000-1009/").is_some());
    assert_eq!(
        merged_body
            .windows(15)
            .filter(|w| *w == b"Content-Range: ")
            .count(),
        2
    );
    // The amplification an anonymous caller could ask for: the whole blob again and
    // again. It gets the blob once, with 200.
    let repeated = format!("bytes={}", vec!["0-"; 64].join(","));
    let amplified = registry.get(&path, &[("range", &repeated)]).await;
    assert_eq!(amplified.status(), StatusCode::OK);
    assert_eq!(header(&amplified, "content-length"), size.to_string());
    assert_eq!(amplified.bytes().await.unwrap(), body);
    let covering = format!("bytes=0-{},{}-", size / 2, size / 2 - 10);
    let covered = registry.get(&path, &[("range", &covering)]).await;
    assert_eq!(covered.status(), StatusCode::OK);
    assert_eq!(covered.bytes().await.unwrap().len() as u64, size);

    // One range past the end: 416 with the size.
    let beyond = registry
        .get(&path, &[("range", &format!("bytes={size}-{}", size + 10))])
        .await;
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&beyond, "content-range"), format!("bytes */{size}"));

    let etag = format!("\"{digest}\"");
    let cached = registry.get(&path, &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    registry.server.stop().await;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn listings_paginate_and_bad_requests_get_the_specs_errors() {
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    registry
        .import("acme/other", dir.path(), Some("rev1"))
        .await;

    let tags: serde_json::Value = registry.json("/v2/acme/tiny/tags/list").await;
    assert_eq!(
        tags,
        serde_json::json!({"name": "acme/tiny", "tags": ["latest", "rev1"]})
    );
    let first = registry.get("/v2/acme/tiny/tags/list?n=1", &[]).await;
    assert_eq!(
        header(&first, "link"),
        "</v2/acme/tiny/tags/list?n=1&last=latest>; rel=\"next\""
    );
    assert_eq!(
        first.json::<serde_json::Value>().await.unwrap()["tags"],
        serde_json::json!(["latest"])
    );
    let second: serde_json::Value = registry
        .json("/v2/acme/tiny/tags/list?n=1&last=latest")
        .await;
    assert_eq!(second["tags"], serde_json::json!(["rev1"]));
    let none: serde_json::Value = registry.json("/v2/acme/tiny/tags/list?n=0").await;
    assert_eq!(none["tags"], serde_json::json!([]));
    let catalog: serde_json::Value = registry.json("/v2/_catalog").await;
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["acme/other", "acme/tiny"])
    );

    let zeros = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "/v2/acme/nope/manifests/latest".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/acme/tiny/manifests/nope".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/acme/tiny/manifests/{zeros}"),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/acme/tiny/blobs/{zeros}"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            "/v2/acme/tiny/blobs/sha256:abc".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/acme/tiny/manifests/-bad".into(),
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            "/v2/Acme/tiny/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/acme/../etc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/acme/%2e%2e/blobs/sha256:abc".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/acme/tiny/tags/list?n=x".into(),
            StatusCode::BAD_REQUEST,
            "PAGINATION_NUMBER_INVALID",
        ),
        (
            "/v2/acme/tiny/referrers".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
    ];
    for (path, status, code) in cases {
        // reqwest would normalise `..` away: send the path as it is.
        let res = raw_get(&registry.server.url, &path).await;
        assert_eq!(res.0, status, "{path}");
        let body: serde_json::Value = serde_json::from_str(&res.1).unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{path}");
    }
    let head = registry.head("/v2/acme/nope/manifests/latest", &[]).await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert!(head.bytes().await.unwrap().is_empty());

    let put = registry
        .http
        .put(registry.url("/v2/acme/tiny/manifests/latest"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&put, "allow"), "GET, HEAD");
    assert_eq!(error_code(put).await, "UNSUPPORTED");
    registry.server.stop().await;
}

/// A GET with the path exactly as given (no client-side normalisation).
async fn raw_get(base: &str, path: &str) -> (StatusCode, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status: u16 = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (StatusCode::from_u16(status).unwrap(), body.to_string())
}

#[tokio::test]
async fn reimports_are_identical_and_a_changed_file_uploads_one_layer() {
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let first = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(
        first.uploaded_blobs,
        2 + 2 + 2 + 1,
        "layers, configs, manifests, index"
    );
    let again = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(again.digest, first.digest);
    assert_eq!(again.uploaded_blobs, 0);
    // The same files under another name share every blob.
    let other = registry.import("acme/copy", dir.path(), Some("rev1")).await;
    assert_eq!(other.digest, first.digest);
    assert_eq!(other.uploaded_blobs, 0);

    write(
        dir.path(),
        "README.md",
        b"---\nlicense: apache-2.0\n---\n# tiny model, v2\n",
    );
    let second = registry.import("acme/tiny", dir.path(), Some("rev2")).await;
    assert_ne!(second.digest, first.digest);
    assert_eq!(
        second.uploaded_blobs,
        1 + 2 + 2 + 1,
        "only the small-files layer is new (plus configs, manifests and the index)"
    );
    assert!(
        second.uploaded_bytes < 1024 * 1024,
        "the weights were not uploaded again"
    );

    // latest moved; rev1 still names the first image.
    let latest = registry.head("/v2/acme/tiny/manifests/latest", &[]).await;
    assert_eq!(header(&latest, "docker-content-digest"), second.digest);
    let rev1 = registry.head("/v2/acme/tiny/manifests/rev1", &[]).await;
    assert_eq!(header(&rev1, "docker-content-digest"), first.digest);

    // The store holds each blob once.
    let store = registry._store.path().join("blobs/sha256");
    assert_eq!(std::fs::read_dir(store).unwrap().count(), 7 + 6);

    // The listing shows the latest revision with its files and the COPY line.
    let list = registry.app.models.list(None).await.unwrap();
    let tiny = list.iter().find(|m| m.name == "acme/tiny").unwrap();
    assert_eq!(tiny.revision, "rev2");
    assert_eq!(tiny.file_count, 5);
    assert_eq!(tiny.license.as_deref(), Some("apache-2.0"));
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'model.import'")
            .fetch_one(&registry._db.pool)
            .await
            .unwrap();
    assert_eq!(audit, 4);
    registry.server.stop().await;
}

#[tokio::test]
async fn bad_imports_change_nothing() {
    let registry = Registry::start(&[]).await;
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret", b"do not ship");
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("leak")).unwrap();
    let bad = |name: &str, dir: &Path, revision: Option<&str>| DirectoryImport {
        name: name.into(),
        dir: dir.to_path_buf(),
        revision: revision.map(str::to_string),
        tags: vec![],
        source: None,
        license: None,
        hub_repository: None,
    };
    let models = &registry.app.models;
    let err = models
        .import_directory(&operator(), bad("acme/tiny", dir.path(), None))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the model directory"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("leak")).unwrap();
    for (name, revision, field) in [
        ("../etc", None, "name"),
        ("Acme/Tiny", None, "name"),
        ("acme/tiny", Some("a/b"), "revision"),
    ] {
        let err = models
            .import_directory(&operator(), bad(name, dir.path(), revision))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(field), "{name}: {err}");
    }
    let missing = models
        .import_directory(
            &operator(),
            bad("acme/tiny", &dir.path().join("nope"), None),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(missing, kiln::error::Error::InvalidArgument { .. }),
        "{missing}"
    );
    // A user who is not a server admin may not import.
    let tenant = common::tenant(&registry._db.pool, "models").await;
    let user = registry.app.auth.verify(&tenant.user_token).await.unwrap();
    let denied = models
        .import_directory(&user, bad("acme/tiny", dir.path(), None))
        .await
        .unwrap_err();
    assert!(
        matches!(denied, kiln::error::Error::PermissionDenied(_)),
        "{denied}"
    );

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM models")
        .fetch_one(&registry._db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let blobs = registry._store.path().join("blobs");
    assert!(!blobs.exists() || std::fs::read_dir(blobs.join("sha256")).unwrap().count() == 0);
    registry.server.stop().await;
}

#[tokio::test]
async fn token_mode_challenges_and_accepts_kiln_tokens() {
    let registry = Registry::start(&[("KILN_MODELS__AUTH", "token")]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    registry.import("acme/tiny", dir.path(), None).await;
    let anonymous = registry.get("/v2/", &[]).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&anonymous, "www-authenticate").to_string();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}/v2/_token\",service=\"kiln\"",
            registry.server.url
        )
    );
    assert_eq!(error_code(anonymous).await, "UNAUTHORIZED");

    let tenant = common::tenant(&registry._db.pool, "pullers").await;
    let token = registry
        .http
        .get(registry.url("/v2/_token?service=kiln&scope=repository:acme/tiny:pull"))
        .basic_auth("anyone", Some(&tenant.user_token))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), StatusCode::OK);
    let token: serde_json::Value = token.json().await.unwrap();
    let bearer = token["token"].as_str().unwrap();
    assert!(token["expires_in"].as_u64().unwrap() >= 60);
    let issued =
        chrono::DateTime::parse_from_rfc3339(token["issued_at"].as_str().unwrap()).unwrap();
    assert!((chrono::Utc::now() - issued.to_utc()).num_seconds().abs() < 60);
    let auth = format!("Bearer {bearer}");
    let pulled = registry
        .get(
            "/v2/acme/tiny/manifests/latest",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(pulled.status(), StatusCode::OK);
    let wrong = registry
        .get(
            "/v2/acme/tiny/manifests/latest",
            &[("authorization", "Bearer kiln_nope")],
        )
        .await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let bad_login = registry
        .http
        .get(registry.url("/v2/_token"))
        .basic_auth("anyone", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_login.status(), StatusCode::UNAUTHORIZED);
    registry.server.stop().await;
}

#[tokio::test]
async fn pulls_are_counted() {
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    registry.import("acme/tiny", dir.path(), None).await;
    for _ in 0..3 {
        let res = registry.get("/v2/acme/tiny/manifests/latest", &[]).await;
        assert_eq!(res.status(), StatusCode::OK);
    }
    // HEADs and platform manifests are not pulls.
    registry.head("/v2/acme/tiny/manifests/latest", &[]).await;
    registry.server.stop().await;
    let pulls: i64 = sqlx::query_scalar("SELECT pull_count FROM models WHERE name = 'acme/tiny'")
        .fetch_one(&registry._db.pool)
        .await
        .unwrap();
    assert_eq!(pulls, 3, "flushed at shutdown");
}

#[tokio::test]
async fn skopeo_copies_and_inspects_by_tag_and_by_digest() {
    let skopeo = std::env::var("TEST_SKOPEO").expect(
        "TEST_SKOPEO is not set: run the tests through `bash scripts/test.sh`, which installs skopeo",
    );
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    let host = format!("127.0.0.1:{}", registry.server.port);
    let by_tag = format!("docker://{host}/acme/tiny:latest");
    let by_digest = format!("docker://{host}/acme/tiny@{}", imported.digest);
    let skopeo = |args: Vec<String>| {
        let skopeo = skopeo.clone();
        async move {
            let out = tokio::process::Command::new(&skopeo)
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    };
    for reference in [&by_tag, &by_digest] {
        let raw = skopeo(vec![
            "inspect".into(),
            "--tls-verify=false".into(),
            "--raw".into(),
            reference.clone(),
        ])
        .await;
        assert_eq!(format!("sha256:{}", sha256_hex(&raw)), imported.digest);
        for arch in ["amd64", "arm64"] {
            let info = skopeo(vec![
                "--override-arch".into(),
                arch.into(),
                "inspect".into(),
                "--tls-verify=false".into(),
                reference.clone(),
            ])
            .await;
            let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
            assert_eq!(info["Architecture"], arch);
            assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
            assert_eq!(info["RepoTags"], serde_json::json!(["latest", "rev1"]));
        }
        // A copy of every platform checks every digest and size on the way; unpacking it
        // gives the model's files, byte for byte.
        let out = tempfile::tempdir().unwrap();
        let target = format!("oci:{}:copy", out.path().display());
        skopeo(vec![
            "copy".into(),
            "--all".into(),
            "--quiet".into(),
            "--preserve-digests".into(),
            "--src-tls-verify=false".into(),
            reference.clone(),
            target,
        ])
        .await;
        let copied: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(copied["manifests"][0]["digest"], imported.digest.as_str());
        let unpacked = tempfile::tempdir().unwrap();
        unpack_amd64(out.path(), unpacked.path());
        assert_eq!(file_hashes(unpacked.path()), file_hashes(dir.path()));
    }
    registry.server.stop().await;
}

/// Extracts the linux/amd64 image of an OCI layout's only index into `into`.
fn unpack_amd64(layout: &Path, into: &Path) {
    let blob = |digest: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&blob(top["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let amd64 = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(amd64["digest"].as_str().unwrap())).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let bytes = blob(layer["digest"].as_str().unwrap());
        tar::Archive::new(&bytes[..]).unpack(into).unwrap();
    }
}

/// sha256 of every file of a model image pulled through `/v2/` by hand: index, amd64
/// manifest, every layer unpacked.
async fn pull_files(registry: &Registry, name: &str, tag: &str) -> BTreeMap<String, String> {
    let manifest = registry.amd64_manifest(name, tag).await;
    let into = tempfile::tempdir().unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let res = registry
            .get(&format!("/v2/{name}/blobs/{digest}"), &[])
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        let bytes = res.bytes().await.unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), digest);
        tar::Archive::new(&bytes[..]).unpack(into.path()).unwrap();
    }
    file_hashes(into.path())
}

#[tokio::test]
async fn an_s3_store_serves_the_same_images_with_ranges() {
    let prefix = format!("t-{}", kiln::db::ids::new_id());
    let s3 = s3_overrides(&prefix);
    let s3: Vec<(&str, &str)> = s3.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let registry = Registry::start(&s3).await;
    let local = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(imported.uploaded_blobs, 7);
    let same = local.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(
        imported.digest, same.digest,
        "the store does not change the image"
    );
    assert_eq!(
        pull_files(&registry, "acme/tiny", "latest").await,
        file_hashes(dir.path())
    );

    // Ranges are read from the store as ranges.
    let manifest: serde_json::Value = registry
        .get("/v2/acme/tiny/manifests/latest", &[("accept", MANIFEST)])
        .await
        .json()
        .await
        .unwrap();
    let weights = manifest["layers"][1]["digest"].as_str().unwrap();
    let path = format!("/v2/acme/tiny/blobs/{weights}");
    let whole = registry.get(&path, &[]).await.bytes().await.unwrap();
    let part = registry.get(&path, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap(), whole.slice(1000..2000));
    let many = registry.get(&path, &[("range", "bytes=0-0,-1")]).await;
    assert_eq!(many.status(), StatusCode::PARTIAL_CONTENT);
    assert!(header(&many, "content-type").starts_with("multipart/byteranges"));

    // The blobs are in the bucket, under the prefix.
    let store =
        kiln::registry::store::ModelStore::from_config(&common::config(&registry._db.url, &s3))
            .unwrap();
    let index = kiln::registry::reference::Digest::parse(&imported.digest).unwrap();
    assert!(store.blob_size(&index).await.unwrap().is_some());

    // A re-import finds every blob in the bucket already.
    let again = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    assert_eq!(again.uploaded_blobs, 0);
    registry.server.stop().await;
    local.server.stop().await;
}

#[tokio::test]
async fn blobs_can_redirect_to_presigned_store_urls() {
    let prefix = format!("t-{}", kiln::db::ids::new_id());
    let mut s3 = s3_overrides(&prefix);
    s3.push(("KILN_MODELS__REDIRECT_BLOBS".into(), "true".into()));
    let s3: Vec<(&str, &str)> = s3.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let registry = Registry::start(&s3).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), None).await;
    let manifest = registry.amd64_manifest("acme/tiny", &imported.digest).await;
    let weights_digest = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let path = format!("/v2/acme/tiny/blobs/{weights_digest}");
    let redirect = no_follow.get(registry.url(&path)).send().await.unwrap();
    assert_eq!(redirect.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = header(&redirect, "location").to_string();
    assert!(
        location.starts_with(&std::env::var("TEST_S3_ENDPOINT").unwrap()),
        "{location}"
    );
    assert!(location.contains("X-Amz-Signature="), "{location}");
    // The presigned URL serves the bytes, and ranges of them.
    let bytes = no_follow
        .get(&location)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), weights_digest);
    let part = no_follow
        .get(&location)
        .header("range", "bytes=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    // HEAD still answers from the registry itself, with the size.
    let head = registry.head(&path, &[]).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(header(&head, "content-length"), bytes.len().to_string());
    // skopeo follows the redirects.
    if let Ok(skopeo) = std::env::var("TEST_SKOPEO") {
        let out = tempfile::tempdir().unwrap();
        let status = tokio::process::Command::new(skopeo)
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &format!(
                    "docker://127.0.0.1:{}/acme/tiny:latest",
                    registry.server.port
                ),
                &format!("oci:{}:x", out.path().display()),
            ])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }
    registry.server.stop().await;
}

/// The real model (PyPI's copy of all-MiniLM-L6-v2, 13 files, one of 90.9 MB).
fn test_model_dir() -> std::path::PathBuf {
    std::env::var("TEST_MODEL_DIR")
        .expect("TEST_MODEL_DIR is not set: run the tests through `bash scripts/test.sh`, which downloads the model")
        .into()
}

#[tokio::test]
async fn buildah_embeds_the_real_model_with_copy_from_offline() {
    let buildah = std::env::var("TEST_BUILDAH").expect(
        "TEST_BUILDAH is not set: run the tests through `bash scripts/test.sh`, which installs buildah",
    );
    let registry = Registry::start(&[]).await;
    let model_dir = test_model_dir();
    let imported = registry
        .import("sentence-transformers/all-minilm-l6-v2", &model_dir, None)
        .await;
    assert_eq!(imported.files, 13);
    assert_eq!(
        imported.layers, 2,
        "the weights alone, everything else together"
    );
    assert_eq!(
        pull_files(
            &registry,
            "sentence-transformers/all-minilm-l6-v2",
            "latest"
        )
        .await,
        file_hashes(&model_dir),
        "the model round-trips byte for byte"
    );

    // `COPY --from=<registry>/<model>:latest / /model`, built offline: FROM scratch, vfs
    // storage and chroot isolation (no daemon, no network but the registry).
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    let from = format!(
        "127.0.0.1:{}/sentence-transformers/all-minilm-l6-v2:latest",
        registry.server.port
    );
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM scratch\nCOPY --from={from} / /model\n"),
    )
    .unwrap();
    let storage = [
        "--storage-driver".to_string(),
        "vfs".to_string(),
        "--root".to_string(),
        work.path().join("root").display().to_string(),
        "--runroot".to_string(),
        work.path().join("runroot").display().to_string(),
    ];
    let run = |args: Vec<String>| {
        let buildah = buildah.clone();
        let storage = storage.clone();
        async move {
            let out = tokio::process::Command::new(&buildah)
                .args(&storage)
                .args(&args)
                .env("BUILDAH_ISOLATION", "chroot")
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "buildah {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        }
    };
    run(vec![
        "bud".into(),
        "--isolation".into(),
        "chroot".into(),
        "--tls-verify=false".into(),
        "--layers=false".into(),
        "-t".into(),
        "localhost/embedded".into(),
        context.display().to_string(),
    ])
    .await;
    let container = run(vec!["from".into(), "localhost/embedded".into()]).await;
    let mount = run(vec!["mount".into(), container.clone()]).await;
    let copied = file_hashes(&std::path::Path::new(&mount).join("model"));
    run(vec!["umount".into(), container.clone()]).await;
    run(vec!["rm".into(), container]).await;
    assert_eq!(copied, file_hashes(&model_dir));
    registry.server.stop().await;
}

#[tokio::test]
async fn the_oci_client_crate_pulls_an_image() {
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::secrets::RegistryAuth;
    let registry = Registry::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let imported = registry.import("acme/tiny", dir.path(), Some("rev1")).await;
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference =
        format!("127.0.0.1:{}/acme/tiny:latest", registry.server.port)
            .parse()
            .unwrap();
    let image = client
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            vec!["application/vnd.oci.image.layer.v1.tar"],
        )
        .await
        .unwrap();
    // The client picks the linux/amd64 manifest out of the index.
    let manifest = image.manifest.unwrap();
    assert_eq!(manifest.layers.len(), 2);
    let config: serde_json::Value = serde_json::from_slice(&image.config.data).unwrap();
    assert_eq!(config["architecture"], "amd64");
    let into = tempfile::tempdir().unwrap();
    for layer in &image.layers {
        tar::Archive::new(&layer.data[..])
            .unpack(into.path())
            .unwrap();
    }
    assert_eq!(file_hashes(into.path()), file_hashes(dir.path()));
    let tags = client
        .list_tags(&reference, &RegistryAuth::Anonymous, None, None)
        .await
        .unwrap();
    assert_eq!(tags.tags, ["latest", "rev1"]);
    assert!(!imported.digest.is_empty());
    registry.server.stop().await;
}

/// A stand-in for a Hugging Face-compatible hub serving one repository from a directory:
/// the model info API (`?blobs=true`: sizes, LFS sha256s, the card's license) and
/// `resolve` downloads with Range. It can cut the first download of a file short,
/// corrupt a file, or name a path outside the model.
#[derive(Clone, Default)]
struct HubBehaviour {
    /// The first download of this file stops after this many bytes.
    cut_short: Option<(String, usize)>,
    /// This file's bytes are served with one byte changed.
    corrupt: Option<String>,
    /// An extra file list entry with this path.
    extra_path: Option<String>,
    /// The model info is this many bytes of padding, sent without a length.
    huge_info: Option<usize>,
    /// Bytes of the model info actually sent (pulled by the client).
    info_bytes_sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct StandInHub {
    url: String,
    commit: String,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StandInHub {
    async fn start(repository: &str, dir: &Path, behaviour: HubBehaviour) -> StandInHub {
        use axum::extract::{Path as UrlPath, State};
        use axum::response::IntoResponse;
        type Shared = std::sync::Arc<(
            String,
            std::path::PathBuf,
            std::sync::Mutex<HubBehaviour>,
            std::sync::Arc<std::sync::Mutex<Vec<String>>>,
            String,
        )>;
        let commit = "4f5c2b1a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b".to_string();
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared: Shared = std::sync::Arc::new((
            repository.to_string(),
            dir.to_path_buf(),
            std::sync::Mutex::new(behaviour),
            ranges.clone(),
            commit.clone(),
        ));
        async fn info(
            State(s): State<Shared>,
            UrlPath(rest): UrlPath<String>,
        ) -> axum::response::Response {
            let (repository, dir, behaviour, _, commit) = &*s;
            if !rest.starts_with(&format!("{repository}/revision/")) {
                return (axum::http::StatusCode::NOT_FOUND, "no such repository").into_response();
            }
            let (huge, sent) = {
                let b = behaviour.lock().unwrap();
                (b.huge_info, b.info_bytes_sent.clone())
            };
            if let Some(total) = huge {
                // A JSON array of spaces, chunk by chunk, counting what the client pulls.
                let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
                let stream = futures_util::StreamExt::map(
                    futures_util::stream::iter(0..total / chunk.len()),
                    move |_| {
                        sent.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, std::io::Error>(chunk.clone())
                    },
                );
                return axum::response::Response::new(axum::body::Body::from_stream(stream));
            }
            let mut siblings = Vec::new();
            for (path, _) in file_hashes(dir) {
                let bytes = std::fs::read(dir.join(&path)).unwrap();
                let mut entry = serde_json::json!({"rfilename": path, "size": bytes.len()});
                if bytes.len() > 100_000 {
                    entry["lfs"] = serde_json::json!({
                        "sha256": sha256_hex(&bytes), "size": bytes.len(), "pointerSize": 134
                    });
                }
                siblings.push(entry);
            }
            if let Some(extra) = &behaviour.lock().unwrap().extra_path {
                siblings.push(serde_json::json!({"rfilename": extra, "size": 1}));
            }
            axum::Json(serde_json::json!({
                "id": repository, "sha": commit, "siblings": siblings,
                "cardData": {"license": "apache-2.0"}
            }))
            .into_response()
        }
        async fn resolve(
            State(s): State<Shared>,
            UrlPath(rest): UrlPath<String>,
            headers: axum::http::HeaderMap,
        ) -> axum::response::Response {
            let (repository, dir, behaviour, ranges, commit) = &*s;
            let Some(path) = rest.strip_prefix(&format!("{repository}/resolve/{commit}/")) else {
                return (axum::http::StatusCode::NOT_FOUND, "no such file").into_response();
            };
            let Ok(mut bytes) = std::fs::read(dir.join(path)) else {
                return (axum::http::StatusCode::NOT_FOUND, "no such file").into_response();
            };
            let mut behaviour = behaviour.lock().unwrap();
            if behaviour.corrupt.as_deref() == Some(path) {
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
            }
            let mut start = 0;
            if let Some(range) = headers.get("range").and_then(|v| v.to_str().ok()) {
                ranges.lock().unwrap().push(format!("{path} {range}"));
                start = range
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-')
                    .parse()
                    .unwrap();
            }
            let total = bytes.len();
            let body = bytes.split_off(start);
            let status = if start > 0 {
                axum::http::StatusCode::PARTIAL_CONTENT
            } else {
                axum::http::StatusCode::OK
            };
            let cut = match &behaviour.cut_short {
                Some((file, at)) if file == path => {
                    let at = *at;
                    behaviour.cut_short = None;
                    Some(at)
                }
                _ => None,
            };
            let length = body.len();
            let stream: futures_util::stream::BoxStream<
                'static,
                Result<bytes::Bytes, std::io::Error>,
            > = match cut {
                // Declares the whole length, sends part of it, then fails mid-body.
                Some(at) => futures_util::StreamExt::boxed(futures_util::stream::iter(vec![
                    Ok(bytes::Bytes::from(body[..at].to_vec())),
                    Err(std::io::Error::other("connection lost")),
                ])),
                None => futures_util::StreamExt::boxed(futures_util::stream::once(async move {
                    Ok(bytes::Bytes::from(body))
                })),
            };
            let mut response = axum::response::Response::new(axum::body::Body::from_stream(stream));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert("content-length", length.into());
            if start > 0 {
                response.headers_mut().insert(
                    "content-range",
                    format!("bytes {start}-{}/{total}", total - 1)
                        .parse()
                        .unwrap(),
                );
            }
            response
        }
        let app = axum::Router::new()
            .route("/api/models/{*rest}", axum::routing::get(info))
            .route("/{*rest}", axum::routing::get(resolve))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandInHub {
            url,
            commit,
            ranges,
            task,
        }
    }
}

impl Drop for StandInHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hub_registry(hub: &StandInHub, downloads: &Path) -> Registry {
    let downloads = downloads.display().to_string();
    Registry::start(&[
        ("KILN_MODELS__HUB__ENDPOINT", hub.url.as_str()),
        ("KILN_MODELS__HUB__DOWNLOAD_DIR", downloads.as_str()),
    ])
    .await
}

fn hub_import(repository: &str) -> kiln::registry::models::HubImport {
    kiln::registry::models::HubImport {
        repository: repository.into(),
        revision: None,
        name: None,
    }
}

#[tokio::test]
async fn the_real_model_imports_from_a_hub_and_resumes_an_interrupted_download() {
    let model_dir = test_model_dir();
    let hub = StandInHub::start(
        "sentence-transformers/all-MiniLM-L6-v2",
        &model_dir,
        HubBehaviour {
            cut_short: Some(("model.safetensors".into(), 30_000_000)),
            ..Default::default()
        },
    )
    .await;
    let downloads = tempfile::tempdir().unwrap();
    let registry = hub_registry(&hub, downloads.path()).await;
    let models = &registry.app.models;
    let interrupted = models
        .import_from_hub(
            &operator(),
            hub_import("sentence-transformers/all-MiniLM-L6-v2"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(interrupted, kiln::error::Error::Unavailable(_)),
        "{interrupted}"
    );
    assert!(
        models.list(None).await.unwrap().is_empty(),
        "nothing was imported"
    );

    let imported = models
        .import_from_hub(
            &operator(),
            hub_import("sentence-transformers/all-MiniLM-L6-v2"),
        )
        .await
        .unwrap();
    let resumed = hub.ranges.lock().unwrap().clone();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let (file, range) = resumed[0].split_once(' ').unwrap();
    assert_eq!(file, "model.safetensors");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from <= 30_000_000, "resumed at {from}");

    // Named and tagged as depot.ai names them.
    assert_eq!(imported.name, "sentence-transformers/all-minilm-l6-v2");
    assert_eq!(imported.revision, hub.commit);
    assert_eq!(imported.tags, ["latest", hub.commit.as_str()]);
    assert_eq!(
        pull_files(
            &registry,
            "sentence-transformers/all-minilm-l6-v2",
            &hub.commit
        )
        .await,
        file_hashes(&model_dir),
        "every file round-trips byte for byte"
    );
    let index: serde_json::Value = registry
        .get(
            "/v2/sentence-transformers/all-minilm-l6-v2/manifests/latest",
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    let annotations = &index["annotations"];
    assert_eq!(
        annotations["org.opencontainers.image.source"],
        format!("{}/sentence-transformers/all-MiniLM-L6-v2", hub.url)
    );
    assert_eq!(
        annotations["org.opencontainers.image.revision"],
        hub.commit.as_str()
    );
    assert_eq!(
        annotations["org.opencontainers.image.licenses"],
        "apache-2.0"
    );
    // Finished downloads are gone once imported.
    let left: usize = std::fs::read_dir(downloads.path())
        .unwrap()
        .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(left, 0);
    registry.server.stop().await;
}

#[tokio::test]
async fn a_hub_answer_that_does_not_match_its_hashes_or_escapes_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let huge = HubBehaviour {
        huge_info: Some(256 << 20),
        ..Default::default()
    };
    let sent = huge.info_bytes_sent.clone();
    for (behaviour, expected) in [
        (
            HubBehaviour {
                corrupt: Some("model.safetensors".into()),
                ..Default::default()
            },
            "does not match its LFS sha256",
        ),
        (
            HubBehaviour {
                extra_path: Some("../outside".into()),
                ..Default::default()
            },
            "outside the model directory",
        ),
        (
            HubBehaviour {
                extra_path: Some("/etc/passwd".into()),
                ..Default::default()
            },
            "outside the model directory",
        ),
        (huge, "its file list is over 16 MiB"),
    ] {
        let hub = StandInHub::start("acme/tiny", dir.path(), behaviour).await;
        let downloads = tempfile::tempdir().unwrap();
        let registry = hub_registry(&hub, downloads.path()).await;
        let err = registry
            .app
            .models
            .import_from_hub(&operator(), hub_import("acme/tiny"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, kiln::error::Error::FailedPrecondition(_)),
            "{err}"
        );
        assert!(err.to_string().contains(expected), "{err}");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM models")
            .fetch_one(&registry._db.pool)
            .await
            .unwrap();
        assert_eq!(rows, 0);
        registry.server.stop().await;
    }
    // A file list without end was read only up to its bound.
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(sent < 40 << 20, "the hub sent {} MiB", sent >> 20);

    // Unknown repositories and malformed ids are clear errors too.
    let hub = StandInHub::start("acme/tiny", dir.path(), HubBehaviour::default()).await;
    let downloads = tempfile::tempdir().unwrap();
    let registry = hub_registry(&hub, downloads.path()).await;
    let models = &registry.app.models;
    let missing = models
        .import_from_hub(&operator(), hub_import("acme/nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, kiln::error::Error::NotFound(_)),
        "{missing}"
    );
    let malformed = models
        .import_from_hub(&operator(), hub_import("../acme"))
        .await
        .unwrap_err();
    assert!(
        matches!(malformed, kiln::error::Error::InvalidArgument { .. }),
        "{malformed}"
    );
    registry.server.stop().await;
}

#[tokio::test]
async fn server_admins_start_hub_imports_through_the_api_and_everyone_lists_models() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let hub = StandInHub::start("Acme/Tiny", dir.path(), HubBehaviour::default()).await;
    let downloads = tempfile::tempdir().unwrap();
    let registry = hub_registry(&hub, downloads.path()).await;
    let pool = &registry._db.pool;
    let member = common::tenant(pool, "members").await;
    let admin = common::tenant(pool, "admins").await;
    registry
        .app
        .orgs
        .set_server_admin(&operator(), &admin.user_id, true)
        .await
        .unwrap();
    let start = |token: &str| {
        registry
            .http
            .post(registry.url("/api/v1/models/imports"))
            .bearer_auth(token)
            .json(&serde_json::json!({"repository": "Acme/Tiny"}))
            .send()
    };
    let refused = start(&member.user_token).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let started = start(&admin.user_token).await.unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let job: serde_json::Value = started.json().await.unwrap();
    assert!(job["job_id"].as_i64().is_some());
    let bad = registry
        .http
        .post(registry.url("/api/v1/models/imports"))
        .bearer_auth(&admin.user_token)
        .json(&serde_json::json!({"repository": "../etc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    common::wait_for(
        "the import job",
        std::time::Duration::from_secs(60),
        || async {
            registry
                .get("/v2/acme/tiny/manifests/latest", &[])
                .await
                .status()
                == StatusCode::OK
        },
    )
    .await;
    let api = |path: &'static str| {
        registry
            .http
            .get(registry.url(path))
            .bearer_auth(&member.user_token)
            .send()
    };
    let list: serde_json::Value = api("/api/v1/models").await.unwrap().json().await.unwrap();
    let model = &list["models"][0];
    assert_eq!(model["name"], "acme/tiny");
    assert_eq!(model["revision"], hub.commit.as_str());
    assert_eq!(model["file_count"], 5);
    assert_eq!(
        model["copy_from"],
        format!(
            "COPY --from=127.0.0.1:{}/acme/tiny:latest / /model",
            registry.server.port
        )
    );
    let detail: serde_json::Value = api("/api/v1/models/acme%2Ftiny")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["revisions"][0]["files"].as_array().unwrap().len(), 5);
    registry.server.stop().await;
}
