//! Cursor pagination shared by every listing (Connect and REST): page sizes checked the
//! same way everywhere, and opaque page tokens that name the listing they belong to, so a
//! token of one listing is refused by another. Listings use keyset cursors (the last
//! row's sort key), never OFFSET, so every page costs the same.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// The most rows one page may ask for.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// A requested page size: absent or 0 means `default`; negative or over
/// [`MAX_PAGE_SIZE`] is refused.
pub fn page_size(requested: Option<i64>, default: i64) -> Result<i64> {
    match requested.unwrap_or(0) {
        0 => Ok(default),
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        n if n > MAX_PAGE_SIZE => Err(Error::invalid(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n),
    }
}

fn bad_token() -> Error {
    Error::invalid(
        "page_token",
        "is not a page token of this listing; start from the first page",
    )
}

/// Encodes a cursor for `listing`.
pub fn encode(listing: &str, cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{listing}:{cursor}"))
}

/// Decodes a token of `listing`: `None` for the first page (empty token).
pub fn decode(listing: &str, token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > 400 {
        return Err(bad_token());
    }
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad_token())?;
    let text = String::from_utf8(raw).map_err(|_| bad_token())?;
    let cursor = text
        .strip_prefix(listing)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(bad_token)?;
    Ok(Some(cursor.to_string()))
}

/// A (time, id) cursor: newest-first listings.
pub fn encode_time_id(listing: &str, at: DateTime<Utc>, id: &str) -> String {
    encode(listing, &format!("{}:{id}", at.timestamp_micros()))
}

pub fn decode_time_id(listing: &str, token: &str) -> Result<Option<(DateTime<Utc>, String)>> {
    let Some(cursor) = decode(listing, token)? else {
        return Ok(None);
    };
    let (micros, id) = cursor.split_once(':').ok_or_else(bad_token)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad_token)?;
    if id.is_empty() || id.len() > 64 {
        return Err(bad_token());
    }
    Ok(Some((at, id.to_string())))
}

/// A numeric cursor (a position or sequence number).
pub fn encode_number(listing: &str, n: i64) -> String {
    encode(listing, &n.to_string())
}

pub fn decode_number(listing: &str, token: &str) -> Result<i64> {
    match decode(listing, token)? {
        None => Ok(0),
        Some(n) => n
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(bad_token),
    }
}

/// A string cursor (an id).
pub fn decode_string(listing: &str, token: &str) -> Result<Option<String>> {
    match decode(listing, token)? {
        Some(s) if s.is_empty() || s.len() > 64 => Err(bad_token()),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_are_checked_the_same_everywhere() {
        assert_eq!(page_size(None, 50).unwrap(), 50);
        assert_eq!(page_size(Some(0), 50).unwrap(), 50);
        assert_eq!(page_size(Some(7), 50).unwrap(), 7);
        assert!(page_size(Some(-1), 50).is_err());
        assert!(page_size(Some(1001), 50).is_err());
    }

    #[test]
    fn tokens_belong_to_their_listing_and_reject_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let token = encode_time_id("builds", at, "abc");
        assert_eq!(
            decode_time_id("builds", &token).unwrap(),
            Some((at, "abc".to_string()))
        );
        assert!(decode_time_id("steps", &token).is_err());
        assert_eq!(decode_time_id("builds", "").unwrap(), None);
        for bad in ["!!!", "eA", &"A".repeat(500)] {
            assert!(decode_time_id("builds", bad).is_err(), "{bad}");
        }
        assert_eq!(
            decode_number("logs", &encode_number("logs", 42)).unwrap(),
            42
        );
        assert!(decode_number("logs", &encode("logs", "-3")).is_err());
    }
}
