//! Connect protocol framing: content types, envelopes, compression, timeouts and the
//! error body. Pure functions, so they can be fuzzed and unit-tested on their own.

use std::io::Read;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;

use crate::error::{Error, Result};

/// Envelope flags of the Connect streaming protocol.
pub const FLAG_COMPRESSED: u8 = 0x01;
pub const FLAG_END_STREAM: u8 = 0x02;
const ENVELOPE_HEADER: usize = 5;

/// Responses smaller than this are sent uncompressed even when gzip is accepted.
pub const COMPRESS_MIN_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Unary,
    Streaming,
}

impl Codec {
    pub fn content_type(self, framing: Framing) -> &'static str {
        match (framing, self) {
            (Framing::Unary, Codec::Proto) => "application/proto",
            (Framing::Unary, Codec::Json) => "application/json",
            (Framing::Streaming, Codec::Proto) => "application/connect+proto",
            (Framing::Streaming, Codec::Json) => "application/connect+json",
        }
    }
}

/// Parses a request content type for the given framing. Parameters (`; charset=utf-8`)
/// are ignored; `None` means the type is not one this framing accepts.
pub fn parse_content_type(value: Option<&str>, framing: Framing) -> Option<Codec> {
    let essence = value?.split(';').next()?.trim().to_ascii_lowercase();
    match (framing, essence.as_str()) {
        (Framing::Unary, "application/proto") => Some(Codec::Proto),
        (Framing::Unary, "application/json") => Some(Codec::Json),
        (Framing::Streaming, "application/connect+proto") => Some(Codec::Proto),
        (Framing::Streaming, "application/connect+json") => Some(Codec::Json),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Identity,
    Gzip,
}

/// Reads a (connect-)content-encoding header. Unknown encodings are `unimplemented`, as
/// the Connect protocol asks.
pub fn parse_encoding(value: Option<&str>) -> Result<Compression> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => Ok(Compression::Identity),
        Some("gzip") => Ok(Compression::Gzip),
        Some(other) => Err(Error::Unimplemented(format!(
            "unsupported compression {other:?}; use gzip or identity"
        ))),
    }
}

/// True if an accept-encoding style header lists gzip.
pub fn accepts_gzip(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        v.split(',').any(|part| {
            part.split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
        })
    })
}

/// Parses `connect-timeout-ms`: at most 10 digits, as the protocol specifies.
pub fn parse_timeout(headers: &HeaderMap) -> Result<Option<Duration>> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(
            "connect-timeout-ms",
            "must be 1 to 10 digits of milliseconds",
        ));
    }
    let ms: u64 = text
        .parse()
        .map_err(|_| Error::invalid("connect-timeout-ms", "not a number"))?;
    Ok(Some(Duration::from_millis(ms)))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 2),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// Inflates `data`, refusing output larger than `limit` (a small gzip bomb must not
/// exhaust memory).
pub fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(data).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| Error::invalid("body", format!("malformed gzip data: {e}")))?;
    if out.len() > limit {
        return Err(Error::PayloadTooLarge { limit });
    }
    Ok(out)
}

pub fn decompress(data: Bytes, compression: Compression, limit: usize) -> Result<Bytes> {
    match compression {
        Compression::Identity => Ok(data),
        Compression::Gzip => gunzip(&data, limit).map(Bytes::from),
    }
}

/// One frame of the streaming protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub data: Bytes,
}

/// Frames a message (or end-of-stream payload).
pub fn encode_envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(ENVELOPE_HEADER + data.len());
    out.put_u8(flags);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// Incremental envelope parser: feed bytes as they arrive, take whole frames out.
#[derive(Debug, Default)]
pub struct EnvelopeReader {
    buffer: BytesMut,
    limit: usize,
}

impl EnvelopeReader {
    pub fn new(limit: usize) -> Self {
        EnvelopeReader {
            buffer: BytesMut::new(),
            limit,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error for a
    /// frame larger than the limit or with unknown flags.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>> {
        if self.buffer.len() < ENVELOPE_HEADER {
            return Ok(None);
        }
        let flags = self.buffer[0];
        if flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
            return Err(Error::invalid(
                "envelope",
                format!("unknown flags 0x{flags:02x}"),
            ));
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > self.limit {
            return Err(Error::PayloadTooLarge { limit: self.limit });
        }
        if self.buffer.len() < ENVELOPE_HEADER + len {
            return Ok(None);
        }
        self.buffer.advance(ENVELOPE_HEADER);
        let data = self.buffer.split_to(len).freeze();
        Ok(Some(Envelope { flags, data }))
    }

    /// Bytes received that do not form a whole frame: at end of body, a truncated frame.
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }
}

/// The Connect error JSON: `{"code":"…","message":"…"}`.
pub fn error_json(err: &Error) -> serde_json::Value {
    serde_json::json!({ "code": err.code().as_str(), "message": err.public_message() })
}

/// The end-of-stream payload: `{}` or `{"error":{…}}`.
pub fn end_stream_json(err: Option<&Error>) -> Vec<u8> {
    let value = match err {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": error_json(e) }),
    };
    serde_json::to_vec(&value).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_by_framing() {
        assert_eq!(
            parse_content_type(Some("application/proto"), Framing::Unary),
            Some(Codec::Proto)
        );
        assert_eq!(
            parse_content_type(Some("Application/JSON; charset=utf-8"), Framing::Unary),
            Some(Codec::Json)
        );
        assert_eq!(
            parse_content_type(Some("application/connect+proto"), Framing::Unary),
            None
        );
        assert_eq!(
            parse_content_type(Some("application/connect+proto"), Framing::Streaming),
            Some(Codec::Proto)
        );
        assert_eq!(
            parse_content_type(Some("application/grpc"), Framing::Streaming),
            None
        );
        assert_eq!(parse_content_type(None, Framing::Unary), None);
    }

    #[test]
    fn envelopes_round_trip_across_chunk_boundaries() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode_envelope(0, b"hello"));
        wire.extend_from_slice(&encode_envelope(0, b""));
        wire.extend_from_slice(&encode_envelope(FLAG_END_STREAM, b"{}"));
        let mut reader = EnvelopeReader::new(1024);
        let mut frames = Vec::new();
        for byte in wire {
            reader.push(&[byte]);
            while let Some(env) = reader.next_envelope().unwrap() {
                frames.push(env);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0].data[..], b"hello");
        assert!(frames[1].data.is_empty());
        assert_eq!(frames[2].flags, FLAG_END_STREAM);
        assert!(!reader.has_partial());
    }

    #[test]
    fn oversized_and_bad_frames_are_rejected() {
        let mut reader = EnvelopeReader::new(4);
        reader.push(&encode_envelope(0, b"too long"));
        assert!(matches!(
            reader.next_envelope(),
            Err(Error::PayloadTooLarge { .. })
        ));
        let mut reader = EnvelopeReader::new(100);
        reader.push(&[0x80, 0, 0, 0, 0]);
        assert!(reader.next_envelope().is_err());
    }

    #[test]
    fn gzip_round_trips_and_bombs_are_capped() {
        let data = vec![b'a'; 10_000];
        let packed = gzip(&data);
        assert_eq!(gunzip(&packed, 10_000).unwrap(), data);
        assert!(matches!(
            gunzip(&packed, 9_999),
            Err(Error::PayloadTooLarge { .. })
        ));
        assert!(gunzip(b"not gzip", 100).is_err());
    }

    #[test]
    fn timeouts_follow_the_protocol() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_timeout(&h).unwrap(), None);
        h.insert("connect-timeout-ms", "4999".parse().unwrap());
        assert_eq!(
            parse_timeout(&h).unwrap(),
            Some(Duration::from_millis(4999))
        );
        h.insert("connect-timeout-ms", "12345678901".parse().unwrap());
        assert!(parse_timeout(&h).is_err());
        h.insert("connect-timeout-ms", "-1".parse().unwrap());
        assert!(parse_timeout(&h).is_err());
    }

    #[test]
    fn encodings() {
        assert_eq!(parse_encoding(None).unwrap(), Compression::Identity);
        assert_eq!(parse_encoding(Some("GZIP")).unwrap(), Compression::Gzip);
        assert!(matches!(
            parse_encoding(Some("br")),
            Err(Error::Unimplemented(_))
        ));
        assert!(accepts_gzip(Some("identity, gzip;q=0.5")));
        assert!(!accepts_gzip(Some("identity")));
    }
}
