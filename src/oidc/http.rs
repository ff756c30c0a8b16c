//! Outbound HTTP for the issuer: GitHub's API and CI providers' discovery documents and
//! key sets. Every response body is read up to a bound, so a hostile or broken upstream
//! cannot exhaust memory.

use std::time::Duration;

/// Why an upstream call gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The upstream answered with this status (the body is dropped).
    #[error("answered HTTP {status}")]
    Status {
        status: u16,
        /// Seconds the upstream asked us to wait (Retry-After or rate-limit reset).
        retry_after: Option<u64>,
    },
    #[error("could not be reached: {0}")]
    Transport(String),
    #[error("answered a body over the {0}-byte limit")]
    TooLarge(usize),
    #[error("answered a body that is not the JSON expected: {0}")]
    Malformed(String),
    /// The caller's budget of calls is spent: nothing was sent.
    #[error("was not asked: this check's budget of calls is spent")]
    BudgetSpent,
}

impl FetchError {
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        // GitHub answers a renamed repository with a redirect to its new name.
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    if let Some(seconds) = value("retry-after") {
        return Some(seconds);
    }
    // GitHub's primary rate limit: the epoch second the budget refills.
    let reset = value("x-ratelimit-reset")?;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    Some(reset.saturating_sub(now))
}

/// Sends `request` and reads the body of a 2xx answer, up to `limit` bytes.
pub async fn fetch(request: reqwest::RequestBuilder, limit: usize) -> Result<Vec<u8>, FetchError> {
    let response = request
        .send()
        .await
        .map_err(|e| FetchError::Transport(without_url(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            status: status.as_u16(),
            retry_after: retry_after(response.headers()),
        });
    }
    crate::outbound::read_capped(response, limit)
        .await
        .map_err(|e| match e {
            crate::outbound::BodyError::TooLarge(limit) => FetchError::TooLarge(limit),
            crate::outbound::BodyError::Transport(e) => FetchError::Transport(without_url(&e)),
        })
}

/// Like [`fetch`], parsed as JSON.
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    limit: usize,
) -> Result<T, FetchError> {
    let body = fetch(request, limit).await?;
    serde_json::from_slice(&body).map_err(|e| FetchError::Malformed(e.to_string()))
}

/// reqwest's message without the URL, which may carry query parameters worth keeping
/// out of logs.
fn without_url(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else if err.is_redirect() {
        "too many redirects"
    } else {
        "request failed"
    };
    match std::error::Error::source(err) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.to_string(),
    }
}
