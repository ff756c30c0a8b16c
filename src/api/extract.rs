//! Extractors that turn request parts into domain values or a Kiln [`Error`].

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::Error;

/// The authenticated caller. Rejects with 401 and a message that says what to fix.
pub struct Auth(pub Arc<Principal>);

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        state
            .auth
            .authenticate_headers(&parts.headers)
            .await
            .map(Auth)
    }
}

/// JSON body whose rejections are Kiln errors (413 for oversized, 400 naming the problem).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(map_json_rejection(
                rejection,
                state.config.server.max_body_bytes,
            )),
        }
    }
}

fn map_json_rejection(rejection: JsonRejection, limit: usize) -> Error {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            Error::invalid("content-type", "send the body as application/json")
        }
        JsonRejection::JsonSyntaxError(e) => {
            Error::invalid("body", format!("malformed JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => Error::invalid("body", e.body_text()),
        JsonRejection::BytesRejection(e)
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
        {
            Error::PayloadTooLarge { limit }
        }
        other => Error::invalid("body", other.body_text()),
    }
}

/// Query string whose rejections are Kiln errors (400 naming the problem).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(Error::invalid("query", rejection.body_text())),
        }
    }
}
