//! Reading answers from servers Kiln calls out to (GitHub, CI providers' key sets, model
//! hubs): a body is read chunk by chunk and refused the moment it passes its bound, so a
//! hostile or broken upstream cannot make Kiln hold more than that.

/// Why a bounded body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("answered a body over the {0}-byte limit")]
    TooLarge(usize),
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
}

/// The body of `response`, up to `limit` bytes: refused up front when its Content-Length
/// says more, else as soon as the bytes read pass it.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
