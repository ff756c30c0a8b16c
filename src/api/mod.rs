//! Transport only: routing, middleware, and the mapping of requests onto the domain.

pub mod agent;
pub mod connect;
pub mod dashboard;
pub mod extract;
pub mod health;
pub mod oidc;
pub mod ratelimit;
pub mod registry;
pub mod rest;
pub mod server;

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::app::AppState;
use crate::error::Error;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The complete router of the HTTP port.
pub fn router(state: AppState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    let deadline = Duration::from_secs(state.config.server.request_timeout_seconds);
    let bounded = Router::new()
        .nest("/api/v1", rest::routes())
        .merge(oidc::routes(&state.oidc.path_prefix()))
        .merge(dashboard::routes())
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            within_deadline(deadline, req, next)
        }));
    Router::new()
        .merge(health::routes())
        // Blob downloads take as long as they take: outside the request deadline.
        .merge(registry::routes())
        .merge(bounded)
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(
            agent::routes(state.clone()),
            agent::dispatch,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit_unauthenticated,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), reject_oversized))
        .layer(middleware::from_fn(record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION, header::COOKIE]))
                .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, RandomRequestId))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let request_id = req
                                .headers()
                                .get(REQUEST_ID_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!("request", method = %req.method(), path = %loggable_path(req.uri().path()), request_id)
                        })
                        .on_request(())
                        .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
                .layer(CatchPanicLayer::custom(|_panic| {
                    Error::internal(anyhow::anyhow!("request handler panicked")).into_response()
                })),
        )
        .with_state(state)
}

/// A request path as logs may show it: the user code of a `depot login` approval page
/// (`/login/<code>`) is a secret of sorts and never logged.
pub fn loggable_path(path: &str) -> &str {
    if path.starts_with("/login/") {
        "/login/<redacted>"
    } else if path.contains("/exchange/") {
        // The exchange URL of an OIDC claim is its bearer secret.
        "/exchange/<redacted>"
    } else {
        path
    }
}

/// Bounds a REST or dashboard request by `server.request_timeout_seconds`, answering
/// `deadline_exceeded` like Connect calls do.
async fn within_deadline(deadline: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(response) => response,
        Err(_) => Error::DeadlineExceeded(format!(
            "the request did not finish within the server's {} s limit; retry",
            deadline.as_secs()
        ))
        .into_response(),
    }
}

/// Connect calls are routed by their last two path segments, so any prefix in
/// DEPOT_API_URL works; everything else unknown is a JSON 404.
async fn fallback(State(state): State<AppState>, req: Request) -> Response {
    if req.method() == http::Method::POST
        && connect::ConnectRouter::route_key(req.uri().path()).is_some()
    {
        return state.connect.serve(state.clone(), req).await;
    }
    Error::NotFound("no such route; see the API reference in the README".into()).into_response()
}

/// Rejects a declared Content-Length over the limit before reading the body, with the
/// same JSON error as bodies that turn out too large while streaming.
async fn reject_oversized(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.server.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Error::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let response = next.run(req).await;
    let elapsed: Duration = started.elapsed();
    let status = response.status().as_u16().to_string();
    metrics::counter!("kiln_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("kiln_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    response
}

#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _req: &http::Request<B>) -> Option<RequestId> {
        let id = crate::db::ids::random_alphanumeric(20);
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}
