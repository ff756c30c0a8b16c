//! The model registry's read-only OCI distribution API at `/v2/`. Transport only: paths
//! are parsed by `registry::reference`, what they name is resolved by
//! `registry::models::Models`, and bytes come from `registry::store::ModelStore`.
//!
//! HEAD is answered explicitly (axum would turn a GET into a HEAD with a zero
//! `Content-Length` for streamed bodies), there is no compression on these routes (a
//! `Content-Encoding` makes clients hash different bytes), and a valid multi-range request
//! gets a multipart 206, never a 416.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::app::AppState;
use crate::auth::Principal;
use crate::config::ModelPullAuth;
use crate::error::Error;
use crate::registry::errors::{ErrorCode, RegistryError};
use crate::registry::image::{INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE};
use crate::registry::models::is_manifest;
use crate::registry::range::{self, Ranges};
use crate::registry::reference::{self, Digest, Name, Reference, Route};

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
/// Listings return at most this many entries per page, whatever `n` asks.
const MAX_PAGE: i64 = 1000;
/// Lifetime announced for the registry tokens `/v2/_token` hands out.
const TOKEN_SECONDS: u64 = 300;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", any(v2))
        .route("/v2/", any(v2))
        .route("/v2/{*rest}", any(v2))
}

/// One answer of the `/v2/` API.
enum Answer {
    Ok(Response),
    Err(RegistryError),
    /// An authentication challenge.
    Challenge(String),
}

impl From<RegistryError> for Answer {
    fn from(err: RegistryError) -> Answer {
        Answer::Err(err)
    }
}

async fn v2(State(app): State<AppState>, req: Request) -> Response {
    let (req, _) = req.into_parts();
    let method = req.method.clone();
    let head = method == Method::HEAD;
    let answer = if !app.config.models.enabled {
        Answer::Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this server does not serve the model registry (models.enabled = false)",
        ))
    } else {
        serve(&app, &req).await
    };
    let mut response = match answer {
        Answer::Ok(response) => response,
        Answer::Err(err) => error_response(&err, head),
        Answer::Challenge(message) => {
            let mut response =
                error_response(&RegistryError::new(ErrorCode::Unauthorized, message), head);
            let realm = app.config.public_link("/v2/_token");
            let challenge = format!("Bearer realm=\"{realm}\",service=\"kiln\"");
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            response
        }
    };
    response
        .headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    response
}

async fn serve(app: &AppState, req: &Parts) -> Answer {
    let path = req.uri.path();
    let rest = path
        .strip_prefix("/v2/")
        .or_else(|| path.strip_prefix("/v2"))
        .unwrap_or("");
    if rest == "_token" {
        return token(app, req).await;
    }
    if req.method != Method::GET && req.method != Method::HEAD {
        let mut err = RegistryError::new(
            ErrorCode::Unsupported,
            "this registry is read-only: only GET and HEAD are served; import models with `kiln models import`",
        );
        err.detail = Some(serde_json::json!({ "method": req.method.as_str() }));
        let mut response = error_response(&err, false);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Answer::Ok(response);
    }
    let route = match reference::route(rest) {
        Ok(route) => route,
        Err(err) => return RegistryError::from(err).into(),
    };
    if let Err(answer) = authorize(app, &req.headers).await {
        return answer;
    }
    let result = match route {
        Route::Base => Ok(Answer::Ok(json_response(
            StatusCode::OK,
            "{}".into(),
            req.method == Method::HEAD,
        ))),
        Route::Manifest(name, reference) => manifest(app, req, &name, &reference).await,
        Route::Blob(name, digest) => blob(app, req, &name, &digest).await,
        Route::Tags(name) => tags(app, req, &name).await,
        Route::Catalog => catalog(app, req).await,
    };
    result.unwrap_or_else(domain_error)
}

/// The caller's principal, when pulls need one.
async fn authorize(app: &AppState, headers: &HeaderMap) -> Result<Option<Arc<Principal>>, Answer> {
    if app.config.models.auth == ModelPullAuth::Anonymous {
        return Ok(None);
    }
    let principal = match presented_token(headers) {
        Some(token) => match app.auth.verify(&token).await {
            Ok(principal) => Some(principal),
            Err(Error::Internal(err)) => return Err(domain_error(Error::Internal(err))),
            Err(err) => return Err(Answer::Challenge(err.public_message())),
        },
        None => None,
    };
    match app.models.authorize_pull(principal.as_deref()) {
        Ok(()) => Ok(principal),
        Err(Error::Unauthenticated(message)) => Err(Answer::Challenge(message)),
        Err(err) => Err(domain_error(err)),
    }
}

/// A Kiln token from `Authorization: Bearer <token>` or `Basic <user:token>`.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string()).filter(|t| !t.is_empty());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_string()).filter(|t| !t.is_empty())
}

/// The registry token endpoint: a client that logged in with a Kiln token (as the
/// password) gets it back as its bearer token, once it is known to be valid.
async fn token(app: &AppState, req: &Parts) -> Answer {
    if app.config.models.auth == ModelPullAuth::Anonymous {
        // Nothing to prove: any client gets a token that every request ignores.
        return Answer::Ok(token_response("anonymous"));
    }
    let Some(token) = presented_token(&req.headers) else {
        return Answer::Challenge(
            "log in with any user name and a Kiln token as the password (e.g. from `depot pull-token`)".into(),
        );
    };
    match app.auth.verify(&token).await {
        Ok(principal) => match app.models.authorize_pull(Some(&principal)) {
            Ok(()) => Answer::Ok(token_response(&token)),
            Err(err) => domain_error(err),
        },
        Err(Error::Internal(err)) => domain_error(Error::Internal(err)),
        Err(err) => Answer::Challenge(err.public_message()),
    }
}

fn token_response(token: &str) -> Response {
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": TOKEN_SECONDS,
        // Clients renew before every request when this is stale: always the real time.
        "issued_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    let mut response = json_response(StatusCode::OK, body.to_string(), false);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn domain_error(err: Error) -> Answer {
    let code = match &err {
        Error::Unauthenticated(_) => return Answer::Challenge(err.public_message()),
        Error::PermissionDenied(_) => ErrorCode::Denied,
        Error::NotFound(_) => ErrorCode::NameUnknown,
        Error::ResourceExhausted(_) => ErrorCode::TooManyRequests,
        Error::InvalidArgument { .. } => ErrorCode::NameInvalid,
        _ => {
            err.log();
            return Answer::Ok(
                json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"errors": [{"code": "UNKNOWN", "message": err.public_message()}]})
                        .to_string(),
                    false,
                ),
            );
        }
    };
    Answer::Err(RegistryError::new(code, err.public_message()))
}

fn error_response(err: &RegistryError, head: bool) -> Response {
    json_response(err.status(), err.body(), head)
}

/// A JSON answer; for HEAD the same status and headers with no body.
fn json_response(status: StatusCode, body: String, head: bool) -> Response {
    let length = body.len();
    let mut response = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body))
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

fn etag(digest: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{digest}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// Whether `If-None-Match` names `digest` (or `*`).
fn not_modified(headers: &HeaderMap, digest: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|v| v == digest || v == "*")
}

/// The media types an `Accept` header allows; `None`: anything.
fn accepted(headers: &HeaderMap) -> Option<Vec<String>> {
    let mut types = Vec::new();
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let media = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if media == "*/*" || media == "application/*" {
                return None;
            }
            if !media.is_empty() {
                types.push(media);
            }
        }
    }
    (!types.is_empty()).then_some(types)
}

async fn manifest(
    app: &AppState,
    req: &Parts,
    name: &Name,
    reference: &Reference,
) -> Result<Answer, Error> {
    let head = req.method == Method::HEAD;
    let Some(mut found) = app.models.manifest(name, reference).await? else {
        return Ok(unknown_manifest(app, name, reference).await?.into());
    };
    let mut by_digest = matches!(reference, Reference::Digest(_));
    if let Some(types) = accepted(&req.headers)
        && !types.contains(&found.media_type)
    {
        // A client that reads image manifests but not indexes gets the linux/amd64
        // manifest when it asked by tag, as the reference registry does for schema 2
        // clients; a digest names exact bytes, so that is refused instead.
        let wants_manifest = types.iter().any(|t| t == MANIFEST_MEDIA_TYPE);
        let fallback = if found.media_type == INDEX_MEDIA_TYPE && wants_manifest && !by_digest {
            first_platform_manifest(app, name, &found.digest).await?
        } else {
            None
        };
        match fallback {
            Some(manifest) => {
                found = manifest;
                by_digest = true;
            }
            None => {
                return Ok(RegistryError::new(
                    ErrorCode::ManifestUnknown,
                    format!(
                        "the manifest is a {}, which the Accept header does not allow",
                        found.media_type
                    ),
                )
                .with_detail(serde_json::json!({ "accept": types }))
                .into());
            }
        }
    }
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&found.media_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&found.digest) {
        headers.insert("docker-content-digest", value);
    }
    headers.insert(header::ETAG, etag(&found.digest));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if by_digest {
            "max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    if not_modified(&req.headers, &found.digest) {
        return Ok(Answer::Ok(
            (StatusCode::NOT_MODIFIED, headers).into_response(),
        ));
    }
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(found.size_bytes as u64),
    );
    if head {
        return Ok(Answer::Ok(
            (StatusCode::OK, headers, Body::empty()).into_response(),
        ));
    }
    let bytes = app.models.stored_bytes(&found.digest).await?;
    if found.media_type == INDEX_MEDIA_TYPE {
        app.models.count_pull(name.as_str());
    }
    Ok(Answer::Ok(
        (StatusCode::OK, headers, Body::from(bytes)).into_response(),
    ))
}

/// The first platform manifest an index lists (linux/amd64 for Kiln's images).
async fn first_platform_manifest(
    app: &AppState,
    name: &Name,
    index_digest: &str,
) -> Result<Option<crate::db::models::StoredBlob>, Error> {
    let bytes = app.models.stored_bytes(index_digest).await?;
    let index: serde_json::Value = serde_json::from_slice(&bytes).map_err(Error::internal)?;
    let Some(first) = index["manifests"]
        .as_array()
        .and_then(|m| m.first())
        .and_then(|m| m["digest"].as_str())
    else {
        return Ok(None);
    };
    let Ok(first) = Digest::parse(first) else {
        return Ok(None);
    };
    app.models.manifest(name, &Reference::Digest(first)).await
}

async fn unknown_manifest(
    app: &AppState,
    name: &Name,
    reference: &Reference,
) -> Result<RegistryError, Error> {
    if app.models.model_exists(name).await?.is_none() {
        return Ok(unknown_name(name));
    }
    let detail = match reference {
        Reference::Tag(tag) => serde_json::json!({ "Tag": tag.as_str() }),
        Reference::Digest(digest) => serde_json::json!({ "Digest": digest.as_str() }),
    };
    Ok(
        RegistryError::new(ErrorCode::ManifestUnknown, "manifest unknown to registry")
            .with_detail(detail),
    )
}

fn unknown_name(name: &Name) -> RegistryError {
    RegistryError::new(
        ErrorCode::NameUnknown,
        format!("no model named {name} here; see /v2/_catalog or the dashboard's model list"),
    )
    .with_detail(serde_json::json!({ "name": name.as_str() }))
}

async fn blob(app: &AppState, req: &Parts, name: &Name, digest: &Digest) -> Result<Answer, Error> {
    let head = req.method == Method::HEAD;
    let Some(found) = app.models.blob(name, digest).await? else {
        if app.models.model_exists(name).await?.is_none() {
            return Ok(unknown_name(name).into());
        }
        return Ok(
            RegistryError::new(ErrorCode::BlobUnknown, "blob unknown to registry")
                .with_detail(serde_json::json!(digest.as_str()))
                .into(),
        );
    };
    let size = found.size_bytes as u64;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        if is_manifest(&found.media_type) {
            HeaderValue::from_str(&found.media_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream"))
        } else {
            HeaderValue::from_static("application/octet-stream")
        },
    );
    if let Ok(value) = HeaderValue::from_str(&found.digest) {
        headers.insert("docker-content-digest", value);
    }
    headers.insert(header::ETAG, etag(&found.digest));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000, immutable"),
    );
    if not_modified(&req.headers, &found.digest) {
        return Ok(Answer::Ok(
            (StatusCode::NOT_MODIFIED, headers).into_response(),
        ));
    }
    if head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        return Ok(Answer::Ok(
            (StatusCode::OK, headers, Body::empty()).into_response(),
        ));
    }
    if app.config.models.redirect_blobs {
        let valid_for = Duration::from_secs(app.config.models.presigned_url_seconds);
        if let Some(url) = app
            .models
            .store()?
            .presigned_blob_url(digest, valid_for)
            .await
            .map_err(Error::internal)?
        {
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            if let Ok(location) = HeaderValue::from_str(url.as_str()) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response.headers_mut().insert(
                "docker-content-digest",
                headers["docker-content-digest"].clone(),
            );
            return Ok(Answer::Ok(response));
        }
    }
    let range_header = req.headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // If-Range with anything but this blob's ETag: the whole blob, as RFC 9110 says.
    let if_range_ok = req
        .headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim().trim_matches('"') == found.digest);
    let ranges = if if_range_ok {
        range::parse(range_header, size)
    } else {
        Ranges::Whole
    };
    let store = app.models.store()?;
    let open = |range| async move {
        store
            .blob_stream(digest, range)
            .await
            .map_err(Error::internal)
    };
    let response = match ranges {
        Ranges::Whole => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            (
                StatusCode::OK,
                headers,
                Body::from_stream(open(None).await?),
            )
                .into_response()
        }
        Ranges::One(range) => {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(range.end - range.start),
            );
            if let Ok(value) = HeaderValue::from_str(&range::content_range(&range, size)) {
                headers.insert(header::CONTENT_RANGE, value);
            }
            (
                StatusCode::PARTIAL_CONTENT,
                headers,
                Body::from_stream(open(Some(range)).await?),
            )
                .into_response()
        }
        Ranges::Many(ranges) => {
            let boundary = format!("kiln-{}", crate::db::ids::random_alphanumeric(24));
            let mut parts = Vec::with_capacity(ranges.len());
            let mut length = 0u64;
            for range in &ranges {
                let part_head = format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: {}\r\n\r\n",
                    range::content_range(range, size)
                );
                length += part_head.len() as u64 + (range.end - range.start);
                parts.push((Bytes::from(part_head), range.clone()));
            }
            let closing = Bytes::from(format!("\r\n--{boundary}--\r\n"));
            length += closing.len() as u64;
            let mut streams = Vec::with_capacity(parts.len() + 1);
            for (part_head, range) in parts {
                streams.push(futures_util::stream::once(async move { Ok(part_head) }).boxed());
                streams.push(open(Some(range)).await?);
            }
            streams.push(futures_util::stream::once(async move { Ok(closing) }).boxed());
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            if let Ok(value) =
                HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
            {
                headers.insert(header::CONTENT_TYPE, value);
            }
            (
                StatusCode::PARTIAL_CONTENT,
                headers,
                Body::from_stream(futures_util::stream::iter(streams).flatten()),
            )
                .into_response()
        }
        Ranges::Unsatisfiable => {
            let mut response = error_response(
                &RegistryError::new(
                    ErrorCode::BlobUnknown,
                    format!("the range is beyond the blob's {size} bytes"),
                ),
                false,
            );
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            response
        }
    };
    Ok(Answer::Ok(response))
}

/// `n` and `last` of a listing.
fn page(req: &Parts) -> Result<(i64, Option<String>), RegistryError> {
    let mut n = None;
    let mut last = None;
    for (key, value) in url::form_urlencoded::parse(req.uri.query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "n" => {
                let parsed = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        RegistryError::new(
                            ErrorCode::PaginationNumberInvalid,
                            format!("n must be a whole number of at least 0, not {value:?}"),
                        )
                    })?;
                n = Some(parsed);
            }
            "last" => last = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok((n.unwrap_or(MAX_PAGE).min(MAX_PAGE), last))
}

fn listing(
    req: &Parts,
    key: &str,
    subject: Option<&str>,
    mut items: Vec<String>,
    limit: i64,
) -> Response {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let mut body = serde_json::Map::new();
    if let Some(name) = subject {
        body.insert("name".into(), name.into());
    }
    body.insert(key.into(), items.clone().into());
    let mut response = json_response(
        StatusCode::OK,
        serde_json::Value::Object(body).to_string(),
        req.method == Method::HEAD,
    );
    if more && let Some(last) = items.last() {
        let next: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &limit.to_string())
            .append_pair("last", last)
            .finish();
        let link = format!("<{}?{next}>; rel=\"next\"", req.uri.path());
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

async fn tags(app: &AppState, req: &Parts, name: &Name) -> Result<Answer, Error> {
    let (limit, last) = match page(req) {
        Ok(page) => page,
        Err(err) => return Ok(err.into()),
    };
    let Some(model_id) = app.models.model_exists(name).await? else {
        return Ok(unknown_name(name).into());
    };
    let items = if limit == 0 {
        Vec::new()
    } else {
        app.models
            .tags(&model_id, last.as_deref(), limit + 1)
            .await?
    };
    Ok(Answer::Ok(listing(
        req,
        "tags",
        Some(name.as_str()),
        items,
        limit,
    )))
}

async fn catalog(app: &AppState, req: &Parts) -> Result<Answer, Error> {
    let (limit, last) = match page(req) {
        Ok(page) => page,
        Err(err) => return Ok(err.into()),
    };
    let items = if limit == 0 {
        Vec::new()
    } else {
        app.models.names(last.as_deref(), limit + 1).await?
    };
    Ok(Answer::Ok(listing(req, "repositories", None, items, limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_and_wildcards() {
        let mut headers = HeaderMap::new();
        assert_eq!(accepted(&headers), None);
        headers.append(
            header::ACCEPT,
            HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
        );
        headers.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json; q=0.5, text/plain"),
        );
        assert_eq!(
            accepted(&headers).unwrap(),
            vec![MANIFEST_MEDIA_TYPE, INDEX_MEDIA_TYPE, "text/plain"]
        );
        headers.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert_eq!(accepted(&headers), None);
    }

    #[test]
    fn if_none_match_names_the_digest() {
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, "sha256:ab"));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", \"sha256:ab\""),
        );
        assert!(not_modified(&headers, "sha256:ab"));
        assert!(!not_modified(&headers, "sha256:cd"));
    }

    #[test]
    fn tokens_come_from_bearer_or_basic() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented_token(&headers).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("me:kiln_secret");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
        );
        assert_eq!(presented_token(&headers).as_deref(), Some("kiln_secret"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert_eq!(presented_token(&headers), None);
    }
}
