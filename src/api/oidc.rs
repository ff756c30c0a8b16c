//! The OIDC issuer's public endpoints: discovery, JWKS, the OAuth endpoints strict
//! discovery must name (they answer an OAuth error: tokens come from the claim flow), and
//! the fork pull request claim flow (`POST /claim`, `POST /exchange/<secret>`), also
//! served on a listener of its own (`oidc.claims.listen`).

use std::net::IpAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::api::ratelimit::{ClientAddr, ClientLimiter};
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::oidc::claims::{ClaimError, Exchange, MAX_CLAIM_BODY_BYTES};

/// Verifiers cache these; a new key is published a day before it signs, and verifiers
/// refetch on an unknown kid anyway.
const CACHE_CONTROL: &str = "public, max-age=300";

pub fn routes(prefix: &str) -> Router<AppState> {
    Router::new()
        .route(
            &format!("{prefix}/.well-known/openid-configuration"),
            get(discovery),
        )
        .route(&format!("{prefix}/.well-known/jwks"), get(jwks))
        .route(&format!("{prefix}/.well-known/jwks.json"), get(jwks))
        .route(
            &format!("{prefix}/oauth/authorize"),
            get(authorize).post(authorize),
        )
        .route(&format!("{prefix}/oauth/token"), get(token).post(token))
        .merge(claim_routes(prefix))
}

fn claim_routes(prefix: &str) -> Router<AppState> {
    Router::new()
        .route(&format!("{prefix}/claim"), post(claim))
        .route(&format!("{prefix}/exchange/{{secret}}"), post(exchange))
        .layer(DefaultBodyLimit::max(MAX_CLAIM_BODY_BYTES))
}

/// The router of `oidc.claims.listen`: the claim flow and the issuer's documents at the
/// root, as the depot CLI's hard-coded `https://actions-public-oidc.depot.dev` expects.
pub fn claim_listener_router(state: AppState) -> Router {
    let deadline = Duration::from_secs(state.config.server.request_timeout_seconds);
    Router::new()
        .route("/", get(|| async { axum::Json(json!({ "ok": true })) }))
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/jwks", get(jwks))
        .route("/.well-known/jwks.json", get(jwks))
        .merge(claim_routes(""))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "error": "not found" })),
            )
        })
        .layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                match tokio::time::timeout(deadline, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => claim_error(ClaimError::Unavailable {
                        message: "the request took too long; retry".into(),
                        retry_after: 1,
                    }),
                }
            },
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_panic| {
            Error::internal(anyhow::anyhow!("request handler panicked")).into_response()
        }))
        .with_state(state)
}

fn limited(limiter: &ClientLimiter, ip: IpAddr, what: &'static str) -> Option<Response> {
    let wait = limiter.check(ip).err()?;
    metrics::counter!("kiln_rate_limited_total", "endpoint" => what).increment(1);
    Some(claim_error(ClaimError::TooMany {
        message: format!(
            "too many requests from your address; retry in {} s",
            wait.as_secs().max(1)
        ),
        retry_after: wait.as_secs().max(1),
    }))
}

async fn claim(
    State(app): State<AppState>,
    ClientAddr(ip): ClientAddr,
    body: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Some(refused) = limited(&app.claim_limiter, ip, "oidc_claim") {
        return refused;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
            let message = if too_large {
                format!("the claim is over {MAX_CLAIM_BODY_BYTES} bytes")
            } else {
                format!("the claim's body could not be read: {rejection}")
            };
            return (rejection.status(), axum::Json(json!({ "error": message }))).into_response();
        }
    };
    match app.claims.create(&ip.to_string(), &body).await {
        Ok(created) => axum::Json(created).into_response(),
        Err(err) => claim_error(err),
    }
}

async fn exchange(
    State(app): State<AppState>,
    ClientAddr(ip): ClientAddr,
    Path(secret): Path<String>,
) -> Response {
    if let Some(refused) = limited(&app.exchange_limiter, ip, "oidc_exchange") {
        return refused;
    }
    match app.claims.exchange(&secret).await {
        Ok(Exchange::Token(token)) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            token,
        )
            .into_response(),
        Ok(Exchange::Pending {
            retry_after,
            detail,
        }) => with_retry_after(
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "status": "pending", "detail": detail })),
            )
                .into_response(),
            retry_after,
        ),
        Err(err) => claim_error(err),
    }
}

fn with_retry_after(mut response: Response, seconds: u64) -> Response {
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// `{"error": "..."}` with the status the refusal calls for (Depot's clients read
/// `error`); internal causes are logged, never shown.
fn claim_error(err: ClaimError) -> Response {
    let (status, retry_after) = match &err {
        ClaimError::BadRequest(_) => (StatusCode::BAD_REQUEST, None),
        ClaimError::Refused(_) => (StatusCode::UNPROCESSABLE_ENTITY, None),
        ClaimError::UnknownClaim => (StatusCode::NOT_FOUND, None),
        ClaimError::Gone(_) => (StatusCode::GONE, None),
        ClaimError::TooMany { retry_after, .. } => {
            (StatusCode::TOO_MANY_REQUESTS, Some(*retry_after))
        }
        ClaimError::Unavailable { retry_after, .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(*retry_after))
        }
        ClaimError::BudgetSpent => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
        ClaimError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
    };
    let message = match &err {
        ClaimError::Internal(inner) => {
            if let Error::Internal(cause) = inner {
                tracing::error!(error = %format!("{cause:#}"), "OIDC claim failed");
            }
            inner.public_message()
        }
        other => other.to_string(),
    };
    let response = (status, axum::Json(json!({ "error": message }))).into_response();
    match retry_after {
        Some(seconds) => with_retry_after(response, seconds),
        None => response,
    }
}

fn cached(body: serde_json::Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    response
}

async fn discovery(State(app): State<AppState>) -> Response {
    cached(app.oidc.discovery())
}

async fn jwks(State(app): State<AppState>) -> Result<Response> {
    Ok(cached(app.oidc.jwks().await?))
}

async fn authorize() -> Response {
    oauth_error(
        "unsupported_response_type",
        "Kiln's issuer has no authorization flow: it issues tokens to GitHub Actions fork pull requests through POST /claim",
    )
}

async fn token() -> Response {
    oauth_error(
        "unsupported_grant_type",
        "Kiln's issuer grants no OAuth tokens: GitHub Actions fork pull requests get theirs through POST /claim",
    )
}

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}
