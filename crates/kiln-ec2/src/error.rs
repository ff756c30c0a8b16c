//! Errors, and how EC2 error codes are classified.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What went wrong with an EC2 call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ec2Error {
    /// Every (instance type, subnet) combination failed with a capacity error. `tried`
    /// lists them in the order tried, as `type` or `type/subnet`.
    #[error("no EC2 capacity; tried {}", tried.join(", "))]
    NoCapacity { tried: Vec<String> },
    /// EC2 kept answering RequestLimitExceeded after every retry.
    #[error("EC2 API requests throttled; retries exhausted")]
    Throttled,
    /// An account limit (InstanceLimitExceeded, VcpuLimitExceeded). Trying another type or
    /// subnet won't help.
    #[error("EC2 quota reached ({code}): {message}")]
    Quota { code: String, message: String },
    /// Any other error EC2 answered with.
    #[error("EC2 error {code}: {message}")]
    Api { code: String, message: String },
    /// No usable answer: a timeout, a connection failure or an unreadable response.
    #[error("EC2 request failed: {0}")]
    Transport(String),
    /// The fleet has no launch template (or no instance type) for the requested architecture.
    #[error("not configured: {0}")]
    NotConfigured(String),
    /// The instance exists but does not carry this cluster's ownership tag; it was left alone.
    #[error("instance {0} is not owned by this cluster")]
    NotOwned(String),
}

/// Codes that mean "no capacity for this type in this subnet/AZ right now": try the next
/// combination.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
];

/// Whether an EC2 error code means "no capacity here right now".
pub(crate) fn is_capacity_code(code: &str) -> bool {
    CAPACITY_CODES.contains(&code)
}

/// Account limits: no other combination will do better.
const QUOTA_CODES: &[&str] = &["InstanceLimitExceeded", "VcpuLimitExceeded"];

const THROTTLE_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];

fn is_server_code(code: &str) -> bool {
    matches!(
        code,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
    )
}

/// How a failed RunInstances call is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Definitely not launched, and this combination has no capacity: try the next one.
    Capacity,
    /// Definitely not launched; an account limit: stop.
    Quota,
    /// Definitely not launched; back off and retry the same combination.
    Throttle,
    /// Definitely not launched for another reason (a 4xx client error, or a request that
    /// could not be built): stop and report it.
    Definite,
    /// Maybe launched (timeout, transport failure, 5xx with an unknown code): never move to
    /// another combination.
    Ambiguous,
}

/// The parts of an SDK error that decide what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub class: Class,
    pub error: Ec2Error,
}

pub(crate) fn classify_code(code: &str, status: Option<u16>) -> Class {
    if CAPACITY_CODES.contains(&code) {
        Class::Capacity
    } else if QUOTA_CODES.contains(&code) {
        Class::Quota
    } else if THROTTLE_CODES.contains(&code) {
        Class::Throttle
    } else if status.is_some_and(|s| s >= 500) || is_server_code(code) {
        Class::Ambiguous
    } else {
        Class::Definite
    }
}

/// Classifies an SDK error from RunInstances.
pub(crate) fn classify<E>(err: &SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = match ctx.err().code() {
                Some(code) if !code.is_empty() => code.to_string(),
                _ => format!("HTTP {status}"),
            };
            let message = ctx.err().message().unwrap_or_default().to_string();
            let class = classify_code(&code, Some(status));
            let error = match class {
                Class::Quota => Ec2Error::Quota { code, message },
                Class::Throttle => Ec2Error::Throttled,
                _ => Ec2Error::Api { code, message },
            };
            Failure { class, error }
        }
        SdkError::ConstructionFailure(_) => Failure {
            class: Class::Definite,
            error: Ec2Error::Transport(DisplayErrorContext(err).to_string()),
        },
        // TimeoutError, DispatchFailure, ResponseError and anything added later: the
        // request may have reached EC2.
        _ => Failure {
            class: Class::Ambiguous,
            error: Ec2Error::Transport(DisplayErrorContext(err).to_string()),
        },
    }
}

/// Maps an SDK error from a call that the SDK already retried (Describe, Terminate).
pub(crate) fn map_sdk<E>(err: SdkError<E>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    classify(&err).error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            classify_code("InsufficientInstanceCapacity", Some(500)),
            Class::Capacity
        );
        assert_eq!(classify_code("Unsupported", Some(400)), Class::Capacity);
        assert_eq!(
            classify_code("InsufficientFreeAddressesInSubnet", Some(400)),
            Class::Capacity
        );
        assert_eq!(classify_code("VcpuLimitExceeded", Some(400)), Class::Quota);
        assert_eq!(
            classify_code("RequestLimitExceeded", Some(503)),
            Class::Throttle
        );
        assert_eq!(classify_code("Throttling", Some(400)), Class::Throttle);
        assert_eq!(classify_code("InternalError", Some(500)), Class::Ambiguous);
        assert_eq!(classify_code("SomethingNew", Some(503)), Class::Ambiguous);
        assert_eq!(
            classify_code("InvalidParameterValue", Some(400)),
            Class::Definite
        );
    }
}
