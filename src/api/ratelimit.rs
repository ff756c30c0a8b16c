//! Per-client rate limits on the endpoints that need no token: `depot login`'s
//! StartLogin and FinishLogin, the approval page, and builder registration. A caller
//! past its budget gets 429 (Connect `resource_exhausted`, gRPC `RESOURCE_EXHAUSTED`)
//! before any database work. Limits are per replica, keyed by client address (IPv6 by
//! /64, since one host holds a whole prefix).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::config::LimitsConfig;
use crate::error::Error;

pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    ip_header: Option<HeaderName>,
}

/// Which limited endpoint a path is, if any.
pub fn limited_endpoint(path: &str) -> Option<&'static str> {
    if path.starts_with("/login/") || path == "/dashboard/sign-in" {
        return Some("login_page");
    }
    if path == "/kiln.agent.v1.MachineAgentService/Register" {
        return Some("agent_register");
    }
    if path.ends_with("/depot.cli.v1beta1.LoginService/StartLogin") {
        return Some("start_login");
    }
    if path.ends_with("/depot.cli.v1beta1.LoginService/FinishLogin") {
        return Some("finish_login");
    }
    // Checks a token sent by anyone (clients ask once per pull and reuse the answer).
    if path == "/v2/_token" {
        return Some("registry_token");
    }
    None
}

impl ClientLimiter {
    pub fn new(config: &LimitsConfig) -> Self {
        Self::with_quota(
            config.unauthenticated_per_minute,
            config.unauthenticated_burst,
            config,
        )
    }

    /// A limiter with its own budget, keyed by client address as `config` says.
    pub fn with_quota(per_minute: u32, burst: u32, config: &LimitsConfig) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        ClientLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_minute(per_minute).allow_burst(burst),
            ),
            ip_header: (!config.client_ip_header.is_empty())
                .then(|| HeaderName::from_bytes(config.client_ip_header.as_bytes()).ok())
                .flatten(),
        }
    }

    /// The client's address: from the configured proxy header, else the TCP peer.
    pub fn client_ip(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> IpAddr {
        let forwarded = self.ip_header.as_ref().and_then(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            value.split(',').next()?.trim().parse::<IpAddr>().ok()
        });
        let ip = forwarded
            .or(peer.map(|p| p.ip()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or([0, 0, 0, 0].into())),
            v4 => v4,
        }
    }

    /// Takes one request from `ip`'s budget; `Err` with the wait when it is spent.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.limiter.check_key(&ip).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }

    /// Forgets clients whose budget is full again, so the table stays small.
    pub async fn run_pruner(&self, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = cancel.cancelled() => return,
            }
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            metrics::gauge!("kiln_rate_limited_clients").set(self.limiter.len() as f64);
        }
    }
}

/// Middleware: applies the per-client limit to the unauthenticated endpoints.
pub async fn limit_unauthenticated(
    State(app): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(endpoint) = limited_endpoint(req.uri().path()) else {
        return next.run(req).await;
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = app.limiter.client_ip(req.headers(), peer);
    match app.limiter.check(ip) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            metrics::counter!("kiln_rate_limited_total", "endpoint" => endpoint).increment(1);
            tracing::debug!(endpoint, "rate limited a client");
            limited_response(&req, endpoint, wait)
        }
    }
}

fn limited_response(req: &Request, endpoint: &str, wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    let message = format!("too many requests from your address; retry in {seconds} s");
    let mut response = if crate::api::agent::is_grpc(req.headers()) {
        tonic::Status::resource_exhausted(message).into_http::<axum::body::Body>()
    } else if endpoint == "login_page" {
        (
            StatusCode::TOO_MANY_REQUESTS,
            axum::response::Html(crate::api::dashboard::message_page(
                "Too many requests",
                &message,
            )),
        )
            .into_response()
    } else {
        let is_stream = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/connect+"));
        crate::api::connect::error_response(is_stream, Error::ResourceExhausted(message))
    };
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(header: &str) -> ClientLimiter {
        ClientLimiter::new(&LimitsConfig {
            unauthenticated_per_minute: 60,
            unauthenticated_burst: 3,
            client_ip_header: header.into(),
            refusal_audits_per_minute: 60,
        })
    }

    #[test]
    fn a_client_gets_its_burst_then_waits() {
        let l = limiter("");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            l.check(ip).unwrap();
        }
        let wait = l.check(ip).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        l.check("10.0.0.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn ipv6_clients_share_their_prefix_and_proxies_are_honoured() {
        let l = limiter("x-forwarded-for");
        let a: SocketAddr = "[2001:db8:1:2::1]:5".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:ffff::9]:5".parse().unwrap();
        let headers = HeaderMap::new();
        assert_eq!(
            l.client_ip(&headers, Some(a)),
            l.client_ip(&headers, Some(b))
        );
        let mut forwarded = HeaderMap::new();
        forwarded.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        assert_eq!(
            l.client_ip(&forwarded, Some(a)),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            limited_endpoint("/prefix/depot.cli.v1beta1.LoginService/StartLogin"),
            Some("start_login")
        );
        assert_eq!(limited_endpoint("/api/v1/projects"), None);
        assert_eq!(limited_endpoint("/v2/_token"), Some("registry_token"));
        // Pulls themselves are never throttled by address.
        assert_eq!(limited_endpoint("/v2/acme/tiny/blobs/sha256:0"), None);
    }
}
