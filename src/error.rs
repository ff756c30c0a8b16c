//! The one error type of Kiln's domain.
//!
//! Every layer returns [`Error`]; the transports map it exactly once: HTTP JSON here
//! (`IntoResponse`), Connect and gRPC in `api::connect` and the agent service.
//! 4xx messages tell the caller what to do; internal causes are logged, never returned.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Error codes shared by every transport. Names and HTTP statuses follow the
/// Connect protocol's table so one mapping serves REST, Connect and gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// HTTP status from the Connect protocol's code table.
    pub fn http_status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// An `If-Match` that no longer matches: HTTP 412, `failed_precondition` elsewhere.
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("request body is larger than the limit of {limit} bytes; send a smaller body")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    /// Never shown to clients; logged with its cause chain.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

const INTERNAL_MESSAGE: &str = "internal error; it has been logged, retry later";

impl Error {
    pub fn not_found(what: &str, id: &str) -> Self {
        Error::NotFound(format!(
            "{what} {id:?} not found; check the id and that your token can access it"
        ))
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Error::Internal(err.into())
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::PreconditionFailed(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) | Error::PayloadTooLarge { .. } => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The message a client may see. Internal causes stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => INTERNAL_MESSAGE.to_string(),
            other => other.to_string(),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            other => other.code().http_status(),
        }
    }

    /// Logs server-side failures once, at the edge where the error leaves Kiln.
    pub fn log(&self) {
        match self {
            Error::Internal(cause) => tracing::error!(error = ?cause, "internal error"),
            Error::Unavailable(msg) => tracing::warn!(%msg, "service unavailable"),
            _ => {}
        }
    }
}

/// Whether a database error means the database is (for now) out of reach rather than
/// that the query is wrong: the caller should retry, so it answers `unavailable`.
fn database_unreachable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08…), shutdown and crash recovery (57P01-57P03), too
        // many connections (53300), serialization failures and deadlocks (40001, 40P01).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if database_unreachable(&err) {
            tracing::warn!(error = %err, "database unavailable");
            metrics::counter!("kiln_db_unavailable_total").increment(1);
            return Error::Unavailable("the database is unavailable; retry shortly".into());
        }
        Error::Internal(anyhow::Error::new(err).context("database query failed"))
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub code: &'a str,
    pub message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log();
        let status = self.http_status();
        let body = ErrorBody {
            code: self.code().as_str(),
            message: self.public_message(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Maps a unique-constraint violation to `AlreadyExists`, leaving other errors alone.
pub trait ConstraintExt<T> {
    fn on_unique(self, constraint: &str, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ConstraintExt<T> for std::result::Result<T, sqlx::Error> {
    fn on_unique(self, constraint: &str, message: impl FnOnce() -> String) -> Result<T> {
        match self {
            Err(sqlx::Error::Database(db)) if db.constraint() == Some(constraint) => {
                Err(Error::AlreadyExists(message()))
            }
            other => other.map_err(Error::from),
        }
    }
}

impl From<Error> for tonic::Status {
    /// gRPC status for the agent API; same codes and public messages as Connect.
    fn from(err: Error) -> Self {
        err.log();
        let code = match err.code() {
            Code::Canceled => tonic::Code::Cancelled,
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::Unimplemented => tonic::Code::Unimplemented,
            Code::Internal => tonic::Code::Internal,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
        };
        tonic::Status::new(code, err.public_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_cause() {
        let err = Error::internal(anyhow::anyhow!("password=hunter2 connection refused"));
        assert_eq!(err.code(), Code::Internal);
        assert!(!err.public_message().contains("hunter2"));
        assert_eq!(err.http_status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn payload_too_large_is_413_over_http_and_resource_exhausted_elsewhere() {
        let err = Error::PayloadTooLarge { limit: 10 };
        assert_eq!(err.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let err = Error::invalid("name", "must not be empty");
        assert_eq!(err.public_message(), "invalid name: must not be empty");
        assert_eq!(err.http_status(), StatusCode::BAD_REQUEST);
    }
}
