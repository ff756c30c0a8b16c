//! Downloads a model revision from a Hugging Face-compatible hub (its HTTP API, base URL
//! in `models.hub.endpoint`, the HF_ENDPOINT convention): the revision's file list with
//! sizes and LFS hashes from `/api/models/<id>/revision/<rev>?blobs=true`, then each file
//! from `/<id>/resolve/<commit>/<path>`.
//!
//! Downloads resume: a partial file is continued with a `Range` request on the next
//! attempt, and finished files are kept until the import succeeds. Every file is checked
//! against the hub's answer (size, and sha256 for LFS files) before it is used; a path the
//! hub names is used only if it stays inside the model directory.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::error::{Error, Result};

/// A revision's files as the hub describes them.
#[derive(Debug, Clone)]
pub struct HubRevision {
    pub repository: String,
    /// The commit the revision resolved to (40 hex).
    pub commit: String,
    pub files: Vec<HubFile>,
    pub license: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HubFile {
    pub path: String,
    pub size: u64,
    /// sha256 of LFS files (every large file).
    pub sha256: Option<String>,
}

#[derive(Deserialize)]
struct ModelInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
    #[serde(rename = "cardData")]
    card_data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

pub struct Hub {
    http: reqwest::Client,
    endpoint: url::Url,
    token: SecretString,
    download_dir: PathBuf,
    max_bytes: u64,
    max_files: usize,
}

impl Hub {
    pub fn new(config: &Config) -> Hub {
        let hub = &config.models.hub;
        Hub {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .read_timeout(Duration::from_secs(120))
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default(),
            endpoint: hub.endpoint.clone(),
            token: hub.token.clone(),
            download_dir: config.hub_download_dir(),
            max_bytes: hub.max_model_gb.saturating_mul(1 << 30),
            max_files: hub.max_files,
        }
    }

    /// The web page of a repository, recorded as the image's source.
    pub fn repository_url(&self, repository: &str) -> String {
        format!(
            "{}/{repository}",
            self.endpoint.as_str().trim_end_matches('/')
        )
    }

    fn request(&self, url: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(url);
        let token = self.token.expose_secret();
        if token.is_empty() {
            request
        } else {
            request.bearer_auth(token)
        }
    }

    /// What `revision` (a branch, tag or commit) of `repository` holds.
    pub async fn revision(&self, repository: &str, revision: &str) -> Result<HubRevision> {
        validate_repository(repository)?;
        if revision.is_empty() || revision.len() > 256 || revision.contains("..") {
            return Err(Error::invalid(
                "revision",
                "must be a branch, tag or commit of the repository",
            ));
        }
        let url = format!(
            "{}/api/models/{repository}/revision/{}?blobs=true",
            self.endpoint.as_str().trim_end_matches('/'),
            url::form_urlencoded::byte_serialize(revision.as_bytes()).collect::<String>()
        );
        let response = self.request(&url).send().await.map_err(unreachable_hub)?;
        match response.status() {
            s if s.is_success() => {}
            reqwest::StatusCode::NOT_FOUND => {
                return Err(Error::NotFound(format!(
                    "the hub has no revision {revision:?} of {repository:?} (or it is private and models.hub.token cannot read it)"
                )));
            }
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                return Err(Error::FailedPrecondition(format!(
                    "the hub refused access to {repository:?} ({}); set models.hub.token to a token that can read it",
                    response.status()
                )));
            }
            other => {
                return Err(Error::Unavailable(format!(
                    "the hub answered {other} for {repository:?}; retry later"
                )));
            }
        }
        let body = crate::outbound::read_capped(response, MAX_MODEL_INFO_BYTES)
            .await
            .map_err(|e| match e {
                crate::outbound::BodyError::TooLarge(_) => {
                    bad_answer("its file list is over 16 MiB")
                }
                crate::outbound::BodyError::Transport(e) => unreachable_hub(e),
            })?;
        let info: ModelInfo = serde_json::from_slice(&body)
            .map_err(|e| bad_answer(&format!("its model info is not the hub API's JSON ({e})")))?;
        let commit = info
            .sha
            .filter(|c| c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad_answer("it named no 40-hex commit for the revision"))?
            .to_ascii_lowercase();
        if info.siblings.len() > self.max_files {
            return Err(Error::FailedPrecondition(format!(
                "{repository} has {} files, more than models.hub.max_files ({})",
                info.siblings.len(),
                self.max_files
            )));
        }
        let mut files = Vec::with_capacity(info.siblings.len());
        let mut total = 0u64;
        for sibling in info.siblings {
            safe_relative_path(&sibling.rfilename)?;
            let (size, sha256) = match sibling.lfs {
                Some(lfs) => {
                    if lfs.sha256.len() != 64 || !lfs.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(bad_answer(&format!(
                            "{}: its LFS sha256 is malformed",
                            sibling.rfilename
                        )));
                    }
                    (lfs.size, Some(lfs.sha256.to_ascii_lowercase()))
                }
                None => (
                    sibling
                        .size
                        .ok_or_else(|| bad_answer(&format!("{}: no size", sibling.rfilename)))?,
                    None,
                ),
            };
            total = total.saturating_add(size);
            files.push(HubFile {
                path: sibling.rfilename,
                size,
                sha256,
            });
        }
        if total > self.max_bytes {
            return Err(Error::FailedPrecondition(format!(
                "{repository} is {total} bytes, more than models.hub.max_model_gb allows"
            )));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let license = info
            .card_data
            .as_ref()
            .and_then(|c| c.get("license"))
            .and_then(|l| l.as_str())
            .filter(|l| !l.is_empty() && l.len() <= 100)
            .map(str::to_string);
        Ok(HubRevision {
            repository: repository.to_string(),
            commit,
            files,
            license,
        })
    }

    /// Where a revision's files are gathered.
    fn revision_dir(&self, revision: &HubRevision) -> PathBuf {
        let repo = hex::encode(&Sha256::digest(revision.repository.as_bytes())[..8]);
        self.download_dir.join(repo).join(&revision.commit)
    }

    /// Downloads every file of `revision` (resuming what an earlier attempt left) and
    /// checks it; returns the directory holding the model's files.
    pub async fn download(&self, revision: &HubRevision) -> Result<PathBuf> {
        let root = self.revision_dir(revision);
        let files_dir = root.join("files");
        let partial_dir = root.join("partial");
        for dir in [&files_dir, &partial_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(Error::internal)?;
        }
        for file in &revision.files {
            let target = files_dir.join(&file.path);
            if tokio::fs::metadata(&target)
                .await
                .is_ok_and(|m| m.len() == file.size)
            {
                continue; // Checked when it was finished.
            }
            let partial = partial_dir.join(hex::encode(Sha256::digest(file.path.as_bytes())));
            self.fetch(revision, file, &partial).await?;
            check(file, &partial).await?;
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(Error::internal)?;
            }
            tokio::fs::rename(&partial, &target)
                .await
                .map_err(Error::internal)?;
        }
        Ok(files_dir)
    }

    /// Forgets a revision's downloads (after a successful import).
    pub async fn discard(&self, revision: &HubRevision) {
        let _ = tokio::fs::remove_dir_all(self.revision_dir(revision)).await;
    }

    /// Brings `partial` up to the file's size, continuing where it stopped.
    async fn fetch(&self, revision: &HubRevision, file: &HubFile, partial: &Path) -> Result<()> {
        let have = tokio::fs::metadata(partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have == file.size {
            return Ok(());
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint.as_str().trim_end_matches('/'),
            revision.repository,
            revision.commit,
            file.path
                .split('/')
                .map(|p| url::form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>())
                .collect::<Vec<_>>()
                .join("/")
        );
        let mut request = self.request(&url);
        if have > 0 && have < file.size {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = request.send().await.map_err(unreachable_hub)?;
        let resumed = response.status() == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
        if !response.status().is_success() {
            return Err(Error::Unavailable(format!(
                "the hub answered {} for {}; retry later",
                response.status(),
                file.path
            )));
        }
        let mut out = if resumed {
            tokio::fs::OpenOptions::new()
                .append(true)
                .open(partial)
                .await
        } else {
            tokio::fs::File::create(partial).await
        }
        .map_err(Error::internal)?;
        let mut written = if resumed { have } else { 0 };
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(unreachable_hub)?;
            written += chunk.len() as u64;
            if written > file.size {
                drop(out);
                let _ = tokio::fs::remove_file(partial).await;
                return Err(bad_answer(&format!(
                    "{}: it sent more than the {} bytes its file list gives",
                    file.path, file.size
                )));
            }
            out.write_all(&chunk).await.map_err(Error::internal)?;
        }
        out.flush().await.map_err(Error::internal)?;
        if written != file.size {
            return Err(Error::Unavailable(format!(
                "the download of {} stopped at {written} of {} bytes; the next attempt resumes it",
                file.path, file.size
            )));
        }
        Ok(())
    }
}

/// Checks a finished download against the hub's file list; a mismatch deletes it.
async fn check(file: &HubFile, path: &Path) -> Result<()> {
    let Some(expected) = file.sha256.clone() else {
        return Ok(());
    };
    let path_owned = path.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = Sha256::new();
        let mut reader = std::fs::File::open(path_owned)?;
        std::io::copy(&mut reader, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(Error::internal)?
    .map_err(Error::internal)?;
    if actual != expected {
        let _ = tokio::fs::remove_file(path).await;
        return Err(Error::FailedPrecondition(format!(
            "the hub's copy of {} does not match its LFS sha256 (expected {expected}, got {actual}); nothing was imported",
            file.path
        )));
    }
    Ok(())
}

/// The model info (the file list) is read up to this many bytes, and refused past them.
const MAX_MODEL_INFO_BYTES: usize = 16 * 1024 * 1024;

fn unreachable_hub(err: reqwest::Error) -> Error {
    Error::Unavailable(format!("the hub could not be reached ({err}); retry later"))
}

fn bad_answer(what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "the hub's answer is unusable: {what}; nothing was imported"
    ))
}

/// `org/name` or `name`, as the hub spells repository ids.
pub fn validate_repository(repository: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && !p.contains("..")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let parts: Vec<&str> = repository.split('/').collect();
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
        Ok(())
    } else {
        Err(Error::invalid(
            "repository",
            format!("{repository:?} is not a hub repository id like org/model"),
        ))
    }
}

/// A path inside the model directory: relative, no `..`, no empty or odd parts.
fn safe_relative_path(path: &str) -> Result<()> {
    let unsafe_path = || {
        bad_answer(&format!(
            "it names the file {path:?}, which would land outside the model directory"
        ))
    };
    if path.is_empty() || path.len() > 1024 || path.contains('\\') || path.contains('\0') {
        return Err(unsafe_path());
    }
    let parsed = Path::new(path);
    if !parsed
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(unsafe_path());
    }
    if path
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(unsafe_path());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_paths_must_stay_inside_the_model() {
        for ok in [
            "config.json",
            "1_Pooling/config.json",
            "onnx/model.onnx",
            ".gitattributes",
        ] {
            assert!(safe_relative_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "./a",
            "a\\b",
            "a/..",
        ] {
            assert!(safe_relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repository_ids() {
        for ok in [
            "bert-base-uncased",
            "sentence-transformers/all-MiniLM-L6-v2",
            "a.b/c_d",
        ] {
            assert!(validate_repository(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c", "../x", "a/..", "-a/b", "a b", "a/"] {
            assert!(validate_repository(bad).is_err(), "{bad}");
        }
    }
}
