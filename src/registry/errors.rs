//! Errors of the `/v2/` API in the distribution spec's format:
//! `{"errors": [{"code": "...", "message": "...", "detail": ...}]}` with the status the
//! spec gives each code (the same status and headers, without a body, for HEAD).

use axum::http::StatusCode;
use serde::Serialize;

use super::reference::ReferenceError;

/// The spec's error codes that a read-only registry answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    /// A bad `n` or `last` on a listing (the spec has no code of its own for it).
    PaginationNumberInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown | ErrorCode::ManifestUnknown | ErrorCode::NameUnknown => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::DigestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::TagInvalid
            | ErrorCode::PaginationNumberInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// One error of the `/v2/` API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RegistryError {
        RegistryError {
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> RegistryError {
        self.detail = Some(detail);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The response body.
    pub fn body(&self) -> String {
        serde_json::json!({ "errors": [self] }).to_string()
    }
}

impl From<ReferenceError> for RegistryError {
    fn from(err: ReferenceError) -> RegistryError {
        let code = match &err {
            ReferenceError::Name(_) => ErrorCode::NameInvalid,
            // Not an endpoint at all: nothing of that name here.
            ReferenceError::Path(_) => ErrorCode::NameUnknown,
            ReferenceError::Tag(_) => ErrorCode::TagInvalid,
            ReferenceError::Digest(_) => ErrorCode::DigestInvalid,
        };
        RegistryError::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::reference;

    #[test]
    fn errors_have_the_specs_shape_and_status() {
        let err = RegistryError::new(ErrorCode::ManifestUnknown, "manifest unknown")
            .with_detail(serde_json::json!({"tag": "latest"}));
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let body: serde_json::Value = serde_json::from_str(&err.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"errors": [{
                "code": "MANIFEST_UNKNOWN",
                "message": "manifest unknown",
                "detail": {"tag": "latest"}
            }]})
        );
        let plain: serde_json::Value =
            serde_json::from_str(&RegistryError::new(ErrorCode::Unsupported, "read-only").body())
                .unwrap();
        assert!(plain["errors"][0].get("detail").is_none());
    }

    #[test]
    fn bad_references_map_to_their_codes() {
        let cases = [
            ("Bad/manifests/latest", ErrorCode::NameInvalid),
            ("a/manifests/.x", ErrorCode::TagInvalid),
            ("a/blobs/sha256:0", ErrorCode::DigestInvalid),
        ];
        for (path, code) in cases {
            let err = RegistryError::from(reference::route(path).unwrap_err());
            assert_eq!(err.code, code, "{path}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
            assert!(!err.message.is_empty());
        }
        let unknown = RegistryError::from(reference::route("a/b").unwrap_err());
        assert_eq!(
            (unknown.code, unknown.status()),
            (ErrorCode::NameUnknown, StatusCode::NOT_FOUND)
        );
    }
}
