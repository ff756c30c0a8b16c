//! The Connect protocol on axum: unary calls (binary protobuf or JSON), server and
//! client streams, Connect error JSON, `connect-timeout-ms`, gzip, and any path prefix
//! in `DEPOT_API_URL` (a call is routed by its last two path segments).
//!
//! Services register typed handlers (`unary`, `server_stream`, `client_stream`); this
//! module owns every byte of framing so handlers only see prost messages.

pub mod codec;
pub mod convert;
pub mod services;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Error, Result};
use codec::{Codec, Compression, Framing};

/// What a handler gets besides its request message.
#[derive(Clone)]
pub struct Call {
    pub app: AppState,
    pub headers: HeaderMap,
}

impl Call {
    /// Authenticates the bearer token of this call.
    pub async fn principal(&self) -> Result<Arc<Principal>> {
        self.app.auth.authenticate_headers(&self.headers).await
    }
}

type UnaryFn = Arc<dyn Fn(Call, Bytes) -> BoxFuture<'static, Result<Vec<u8>>> + Send + Sync>;
type ServerStreamFn = Arc<
    dyn Fn(Call, Bytes) -> BoxFuture<'static, Result<BoxStream<'static, Result<Vec<u8>>>>>
        + Send
        + Sync,
>;
type ClientStreamFn = Arc<
    dyn Fn(Call, BoxStream<'static, Result<Bytes>>) -> BoxFuture<'static, Result<Vec<u8>>>
        + Send
        + Sync,
>;

#[derive(Clone)]
pub enum Handler {
    Unary(UnaryFn),
    ServerStream(ServerStreamFn),
    ClientStream(ClientStreamFn),
}

impl Handler {
    fn framing(&self) -> Framing {
        match self {
            Handler::Unary(_) => Framing::Unary,
            _ => Framing::Streaming,
        }
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| Error::invalid("message", format!("malformed protobuf: {e}")))
}

pub fn unary<Req, Resp, F, Fut>(f: F) -> Handler
where
    Req: Message + Default + 'static,
    Resp: Message + 'static,
    F: Fn(Call, Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler::Unary(Arc::new(move |call, bytes| {
        let f = f.clone();
        Box::pin(async move {
            let req: Req = decode(&bytes)?;
            Ok(f(call, req).await?.encode_to_vec())
        })
    }))
}

pub fn server_stream<Req, Resp, F, Fut, S>(f: F) -> Handler
where
    Req: Message + Default + 'static,
    Resp: Message + 'static,
    F: Fn(Call, Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S>> + Send + 'static,
    S: futures_util::Stream<Item = Result<Resp>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler::ServerStream(Arc::new(move |call, bytes| {
        let f = f.clone();
        Box::pin(async move {
            let req: Req = decode(&bytes)?;
            let stream = f(call, req).await?;
            Ok(stream.map(|item| item.map(|m| m.encode_to_vec())).boxed())
        })
    }))
}

pub fn client_stream<Req, Resp, F, Fut>(f: F) -> Handler
where
    Req: Message + Default + 'static,
    Resp: Message + 'static,
    F: Fn(Call, BoxStream<'static, Result<Req>>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler::ClientStream(Arc::new(move |call, raw| {
        let f = f.clone();
        Box::pin(async move {
            let typed = raw
                .map(|item| item.and_then(|bytes| decode::<Req>(&bytes)))
                .boxed();
            Ok(f(call, typed).await?.encode_to_vec())
        })
    }))
}

struct Method {
    handler: Handler,
    input: MessageDescriptor,
    output: MessageDescriptor,
    /// A tighter bound than `server.max_body_bytes`, for methods anyone may call.
    max_body_bytes: Option<usize>,
}

/// All registered Connect methods, keyed `package.Service/Method`.
pub struct ConnectRouter {
    methods: HashMap<String, Method>,
    pool: DescriptorPool,
}

impl ConnectRouter {
    pub fn new() -> Self {
        let pool = DescriptorPool::decode(crate::proto::DESCRIPTORS)
            .expect("descriptor set compiled by build.rs is valid");
        ConnectRouter {
            methods: HashMap::new(),
            pool,
        }
    }

    /// Registers `handler` for `service`/`method`. Panics on a name missing from the
    /// protos: that is a programming error caught by the first test that builds the router.
    pub fn register(&mut self, service: &str, method: &str, handler: Handler) -> &mut Self {
        let service_desc = self
            .pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("service {service} is not in proto/"));
        let method_desc = service_desc
            .methods()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("method {service}/{method} is not in proto/"));
        let expected = match (
            method_desc.is_client_streaming(),
            method_desc.is_server_streaming(),
        ) {
            (false, false) => matches!(handler, Handler::Unary(_)),
            (false, true) => matches!(handler, Handler::ServerStream(_)),
            (true, false) => matches!(handler, Handler::ClientStream(_)),
            (true, true) => false,
        };
        assert!(
            expected,
            "{service}/{method}: handler kind does not match the proto"
        );
        self.methods.insert(
            format!("{service}/{method}"),
            Method {
                handler,
                input: method_desc.input(),
                output: method_desc.output(),
                max_body_bytes: None,
            },
        );
        self
    }

    /// Bounds the request bodies of a registered method (below `server.max_body_bytes`):
    /// methods that need no token read no more than their messages can hold.
    pub fn limit_body(&mut self, service: &str, method: &str, max_bytes: usize) -> &mut Self {
        let key = format!("{service}/{method}");
        self.methods
            .get_mut(&key)
            .unwrap_or_else(|| panic!("{key} is not registered"))
            .max_body_bytes = Some(max_bytes);
        self
    }

    /// The method a request path names, accepting any prefix before `pkg.Service/Method`.
    pub fn route_key(path: &str) -> Option<&str> {
        let trimmed = path.trim_end_matches('/');
        let method_start = trimmed.rfind('/')?;
        let service_start = trimmed[..method_start].rfind('/')?;
        let key = &trimmed[service_start + 1..];
        let (service, method) = key.split_once('/')?;
        (service.contains('.') && !method.is_empty()).then_some(key)
    }

    pub fn is_connect_path(&self, path: &str) -> bool {
        Self::route_key(path).is_some_and(|key| self.methods.contains_key(key))
    }

    /// Serves one Connect call.
    pub async fn serve(&self, app: AppState, req: Request) -> Response {
        let key = Self::route_key(req.uri().path())
            .unwrap_or_default()
            .to_string();
        let Some(method) = self.methods.get(&key) else {
            return unary_error(Error::Unimplemented(format!(
                "{key:?} is not a method this server implements"
            )));
        };
        let framing = method.handler.framing();
        if req.method() != http::Method::POST {
            return unary_error(Error::Unimplemented("Connect calls must use POST".into()));
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let Some(codec) = codec::parse_content_type(content_type, framing) else {
            let expected = match framing {
                Framing::Unary => "application/proto or application/json",
                Framing::Streaming => "application/connect+proto or application/connect+json",
            };
            let err = Error::invalid(
                "content-type",
                format!("got {:?}; send {expected}", content_type.unwrap_or("")),
            );
            let mut response = unary_error(err);
            *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return response;
        };
        if let Some(v) = req.headers().get("connect-protocol-version")
            && v.as_bytes() != b"1"
        {
            return self.fail(
                framing,
                codec,
                Error::invalid("connect-protocol-version", "only version 1 is supported"),
            );
        }
        let client_timeout = match codec::parse_timeout(req.headers()) {
            Ok(t) => t,
            Err(err) => return self.fail(framing, codec, err),
        };
        // A unary call never outlives the server's bound; streams have bounds of their own.
        let timeout = match framing {
            Framing::Unary => {
                let bound = Duration::from_secs(app.config.server.request_timeout_seconds);
                Some(client_timeout.map_or(bound, |t| t.min(bound)))
            }
            Framing::Streaming => client_timeout,
        };
        let idle = Duration::from_secs(app.config.server.stream_idle_timeout_seconds);
        let limit = method
            .max_body_bytes
            .map_or(app.config.server.max_body_bytes, |m| {
                m.min(app.config.server.max_body_bytes)
            });
        let (parts, body) = req.into_parts();
        let call = Call {
            app,
            headers: parts.headers,
        };
        match &method.handler {
            Handler::Unary(handler) => {
                let accept_gzip = codec::accepts_gzip(
                    call.headers
                        .get(header::ACCEPT_ENCODING)
                        .and_then(|v| v.to_str().ok()),
                );
                let work = async {
                    let compression = codec::parse_encoding(header_str(
                        &call.headers,
                        header::CONTENT_ENCODING.as_str(),
                    ))?;
                    let raw = read_body(body, limit).await?;
                    let raw = codec::decompress(raw, compression, limit)?;
                    let input = to_binary(codec, &method.input, raw)?;
                    let output = handler(call.clone(), input).await?;
                    from_binary(codec, &method.output, output)
                };
                match with_deadline(timeout, work).await {
                    Ok(body) => unary_ok(codec, body, accept_gzip),
                    Err(err) => unary_error(err),
                }
            }
            Handler::ServerStream(handler) => {
                let work = async {
                    let compression = codec::parse_encoding(header_str(
                        &call.headers,
                        "connect-content-encoding",
                    ))?;
                    let raw = read_body(body, limit.saturating_add(5)).await?;
                    let mut reader = codec::EnvelopeReader::new(limit);
                    reader.push(&raw);
                    let envelope = reader
                        .next_envelope()?
                        .ok_or_else(|| Error::invalid("body", "expected one request envelope"))?;
                    if reader.has_partial() || envelope.flags & codec::FLAG_END_STREAM != 0 {
                        return Err(Error::invalid(
                            "body",
                            "expected exactly one request envelope",
                        ));
                    }
                    let data = open_envelope(envelope, compression, limit)?;
                    let input = to_binary(codec, &method.input, data)?;
                    handler(call.clone(), input).await
                };
                match with_deadline(timeout, work).await {
                    Ok(stream) => {
                        let output = method.output.clone();
                        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                        stream_response(codec, stream, output, deadline)
                    }
                    Err(err) => stream_error(codec, err),
                }
            }
            Handler::ClientStream(handler) => {
                let work = async {
                    let compression = codec::parse_encoding(header_str(
                        &call.headers,
                        "connect-content-encoding",
                    ))?;
                    let input_desc = method.input.clone();
                    let messages = envelope_stream(body, limit, idle)
                        .map(move |item| {
                            item.and_then(|env| open_envelope(env, compression, limit))
                                .and_then(|data| to_binary(codec, &input_desc, data))
                        })
                        .boxed();
                    let output = handler(call.clone(), messages).await?;
                    from_binary(codec, &method.output, output)
                };
                match with_deadline(timeout, work).await {
                    Ok(message) => {
                        let mut body = codec::encode_envelope(0, &message).to_vec();
                        body.extend_from_slice(&codec::encode_envelope(
                            codec::FLAG_END_STREAM,
                            &codec::end_stream_json(None),
                        ));
                        stream_headers(codec, Body::from(body))
                    }
                    Err(err) => stream_error(codec, err),
                }
            }
        }
    }

    fn fail(&self, framing: Framing, codec: Codec, err: Error) -> Response {
        match framing {
            Framing::Unary => unary_error(err),
            Framing::Streaming => stream_error(codec, err),
        }
    }
}

impl Default for ConnectRouter {
    fn default() -> Self {
        Self::new()
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn with_deadline<T>(
    timeout: Option<Duration>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match timeout {
        None => work.await,
        Some(t) => tokio::time::timeout(t, work).await.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded(format!(
                "the call did not finish within its {} ms deadline",
                t.as_millis()
            )))
        }),
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Error::PayloadTooLarge { limit })
        }
        Err(err) => Err(Error::invalid(
            "body",
            format!("could not read the request body: {err}"),
        )),
    }
}

fn open_envelope(
    envelope: codec::Envelope,
    compression: Compression,
    limit: usize,
) -> Result<Bytes> {
    if envelope.flags & codec::FLAG_COMPRESSED != 0 {
        if compression == Compression::Identity {
            return Err(Error::invalid(
                "envelope",
                "compressed flag set without connect-content-encoding",
            ));
        }
        codec::decompress(envelope.data, compression, limit)
    } else {
        Ok(envelope.data)
    }
}

/// Request envelopes as they arrive. Ends at end of body; a client that resets the
/// stream simply ends it (what arrived before was already handled). A client silent for
/// `idle` ends it with `deadline_exceeded`.
fn envelope_stream(
    body: Body,
    limit: usize,
    idle: Duration,
) -> BoxStream<'static, Result<codec::Envelope>> {
    let state = (
        body.into_data_stream(),
        codec::EnvelopeReader::new(limit),
        false,
    );
    futures_util::stream::unfold(state, move |(mut body, mut reader, done)| async move {
        if done {
            return None;
        }
        loop {
            match reader.next_envelope() {
                Ok(Some(env)) if env.flags & codec::FLAG_END_STREAM != 0 => {
                    return Some((
                        Err(Error::invalid(
                            "envelope",
                            "clients must not send end-of-stream",
                        )),
                        (body, reader, true),
                    ));
                }
                Ok(Some(env)) => return Some((Ok(env), (body, reader, false))),
                Ok(None) => {}
                Err(err) => return Some((Err(err), (body, reader, true))),
            }
            let next = match tokio::time::timeout(idle, body.next()).await {
                Ok(next) => next,
                Err(_) => {
                    return Some((
                        Err(Error::DeadlineExceeded(format!(
                            "the stream sent nothing for {} s",
                            idle.as_secs()
                        ))),
                        (body, reader, true),
                    ));
                }
            };
            match next {
                Some(Ok(chunk)) => reader.push(&chunk),
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "client stream ended abruptly");
                    return None;
                }
                None if reader.has_partial() => {
                    return Some((
                        Err(Error::invalid(
                            "envelope",
                            "truncated envelope at end of stream",
                        )),
                        (body, reader, true),
                    ));
                }
                None => return None,
            }
        }
    })
    .boxed()
}

fn to_binary(codec: Codec, desc: &MessageDescriptor, data: Bytes) -> Result<Bytes> {
    match codec {
        Codec::Proto => Ok(data),
        Codec::Json => {
            let text: &[u8] = if data.is_empty() { b"{}" } else { &data };
            let mut de = serde_json::Deserializer::from_slice(text);
            let message = DynamicMessage::deserialize(desc.clone(), &mut de).map_err(|e| {
                Error::invalid(
                    "message",
                    format!("malformed JSON for {}: {e}", desc.full_name()),
                )
            })?;
            de.end()
                .map_err(|e| Error::invalid("message", format!("trailing data after JSON: {e}")))?;
            Ok(Bytes::from(message.encode_to_vec()))
        }
    }
}

fn from_binary(codec: Codec, desc: &MessageDescriptor, data: Vec<u8>) -> Result<Vec<u8>> {
    match codec {
        Codec::Proto => Ok(data),
        Codec::Json => {
            let message = DynamicMessage::decode(desc.clone(), data.as_slice()).map_err(|e| {
                Error::internal(anyhow::anyhow!(
                    "response does not match {}: {e}",
                    desc.full_name()
                ))
            })?;
            serde_json::to_vec(&message)
                .map_err(|e| Error::internal(anyhow::anyhow!("encoding JSON: {e}")))
        }
    }
}

fn unary_ok(codec: Codec, body: Vec<u8>, accept_gzip: bool) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, codec.content_type(Framing::Unary));
    let body = if accept_gzip && body.len() >= codec::COMPRESS_MIN_BYTES {
        builder = builder.header(header::CONTENT_ENCODING, "gzip");
        codec::gzip(&body)
    } else {
        body
    };
    builder
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// An error answer in the framing the call used: a unary error, or HTTP 200 with an
/// end-of-stream frame carrying it.
pub fn error_response(streaming: bool, err: Error) -> Response {
    if streaming {
        stream_error(Codec::Proto, err)
    } else {
        unary_error(err)
    }
}

/// A unary error: the Connect code's HTTP status and `{"code","message"}` JSON.
pub fn unary_error(err: Error) -> Response {
    err.log();
    let status = err.code().http_status();
    let mut response = (status, axum::Json(codec::error_json(&err))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn stream_headers(codec: Codec, body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, codec.content_type(Framing::Streaming))
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A streaming error: HTTP 200 and an end-of-stream frame carrying the error.
fn stream_error(codec: Codec, err: Error) -> Response {
    err.log();
    let frame = codec::encode_envelope(codec::FLAG_END_STREAM, &codec::end_stream_json(Some(&err)));
    stream_headers(codec, Body::from(frame))
}

fn stream_response(
    codec: Codec,
    messages: BoxStream<'static, Result<Vec<u8>>>,
    output: MessageDescriptor,
    deadline: Option<tokio::time::Instant>,
) -> Response {
    let frames = async_stream(messages, codec, output, deadline);
    stream_headers(codec, Body::from_stream(frames))
}

/// Frames each message, then ends with `{}` or the error that stopped the stream.
fn async_stream(
    messages: BoxStream<'static, Result<Vec<u8>>>,
    codec: Codec,
    output: MessageDescriptor,
    deadline: Option<tokio::time::Instant>,
) -> BoxStream<'static, std::result::Result<Bytes, std::io::Error>> {
    let state = (messages, false);
    futures_util::stream::unfold(state, move |(mut messages, done)| {
        let output = output.clone();
        async move {
            if done {
                return None;
            }
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => Some(Err(Error::DeadlineExceeded(
                        "the stream outlived its deadline".into(),
                    ))),
                },
                None => messages.next().await,
            };
            let frame = match next {
                Some(Ok(message)) => match from_binary(codec, &output, message) {
                    Ok(data) => {
                        return Some((Ok(codec::encode_envelope(0, &data)), (messages, false)));
                    }
                    Err(err) => codec::encode_envelope(
                        codec::FLAG_END_STREAM,
                        &codec::end_stream_json(Some(&err)),
                    ),
                },
                Some(Err(err)) => {
                    err.log();
                    codec::encode_envelope(
                        codec::FLAG_END_STREAM,
                        &codec::end_stream_json(Some(&err)),
                    )
                }
                None => {
                    codec::encode_envelope(codec::FLAG_END_STREAM, &codec::end_stream_json(None))
                }
            };
            Some((Ok(frame), (messages, true)))
        }
    })
    .boxed()
}

/// Runs untrusted bytes through every decoding step of the Connect layer; used by the
/// fuzz target (fuzz/) and a unit test. Must never panic.
pub fn fuzz_decode(data: &[u8]) {
    use crate::proto::depot::cli::v1 as pb;
    let limit = 1 << 16;
    let mut reader = codec::EnvelopeReader::new(limit);
    let (head, tail) = data.split_at(data.len() / 2);
    reader.push(head);
    reader.push(tail);
    while let Ok(Some(envelope)) = reader.next_envelope() {
        let _ = open_envelope(envelope.clone(), Compression::Gzip, limit);
        let _ = pb::ReportStatusStreamRequest::decode(envelope.data.clone());
    }
    let _ = codec::gunzip(data, limit);
    let _ = pb::CreateBuildRequest::decode(data);
    let _ = pb::GetBuildKitConnectionRequest::decode(data);
    let _ = pb::FinishBuildRequest::decode(data);
    let text = String::from_utf8_lossy(data);
    let _ = codec::parse_content_type(Some(&text), Framing::Unary);
    let _ = codec::parse_encoding(Some(&text));
    let _ = ConnectRouter::route_key(&text);
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert("connect-timeout-ms", value);
        let _ = codec::parse_timeout(&headers);
    }
    static POOL: std::sync::OnceLock<DescriptorPool> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        DescriptorPool::decode(crate::proto::DESCRIPTORS).expect("valid descriptors")
    });
    if let Some(desc) = pool.get_message_by_name("depot.cli.v1.CreateBuildRequest") {
        if let Ok(bytes) = to_binary(Codec::Json, &desc, Bytes::copy_from_slice(data)) {
            let _ = from_binary(Codec::Json, &desc, bytes.to_vec());
        }
        let _ = from_binary(Codec::Json, &desc, data.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            fuzz_decode(&bytes);
        }
        fuzz_decode(br#"{"projectId": "x", "options": [{"command": "COMMAND_BUILD"}]}"#);
        fuzz_decode(&codec::encode_envelope(1, b"\x1f\x8b garbage"));
    }

    #[test]
    fn route_keys_ignore_any_prefix() {
        assert_eq!(
            ConnectRouter::route_key("/depot.cli.v1.BuildService/CreateBuild"),
            Some("depot.cli.v1.BuildService/CreateBuild")
        );
        assert_eq!(
            ConnectRouter::route_key("/some/prefix/depot.cli.v1.BuildService/CreateBuild"),
            Some("depot.cli.v1.BuildService/CreateBuild")
        );
        assert_eq!(ConnectRouter::route_key("/api/v1/projects"), None);
        assert_eq!(ConnectRouter::route_key("/healthz"), None);
    }
}
