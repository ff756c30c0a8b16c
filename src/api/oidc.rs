//! The OIDC issuer's public endpoints: discovery, JWKS, and the OAuth endpoints strict
//! discovery must name (they answer an OAuth error: tokens come from the claim flow).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::app::AppState;
use crate::error::Result;

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
