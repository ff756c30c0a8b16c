//! Per-client rate limits on the endpoints that need no token: `depot login`'s
//! StartLogin and FinishLogin, the approval page, and builder registration. A caller
//! past its budget gets 429 (Connect `resource_exhausted`, gRPC `RESOURCE_EXHAUSTED`)
//! before any database work. Limits are per replica, keyed by client address (IPv6 by
//! /64, since one host holds a whole prefix).
//!
//! Behind a reverse proxy, the client's address comes from `limits.client_ip_header`,
//! but only when the TCP peer is one of `limits.trusted_proxies`, and then it is the
//! rightmost address that is not itself a trusted proxy: everything left of that was
//! written by the client and proves nothing.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::config::LimitsConfig;
use crate::error::Error;

pub struct ClientLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    ip_header: Option<HeaderName>,
    trusted_proxies: Vec<IpNet>,
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
            trusted_proxies: config.trusted_proxy_networks(),
        }
    }

    fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The address the proxy header names, if the peer is a trusted proxy: the
    /// rightmost entry that is not a trusted proxy (the leftmost if all of them are).
    fn forwarded_for(&self, headers: &HeaderMap, peer: IpAddr) -> Option<IpAddr> {
        let name = self.ip_header.as_ref()?;
        if !self.is_trusted_proxy(peer) {
            return None;
        }
        // Several header lines form one list, in order (RFC 9110 §5.3).
        let hops: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = None;
        for hop in hops.iter().rev() {
            let ip = parse_hop(hop)?;
            client = Some(ip);
            if !self.is_trusted_proxy(ip) {
                break;
            }
        }
        client
    }

    /// The client's address: the TCP peer, or what a trusted proxy says the client was.
    pub fn client_ip(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> IpAddr {
        let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        match canonical(self.forwarded_for(headers, peer).unwrap_or(peer)) {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
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

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One entry of a forwarding header: an address, possibly with a port (`1.2.3.4:5`,
/// `[2001:db8::1]:5`), as proxies write them.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// The caller's address as the per-client limits see it ([`ClientLimiter::client_ip`]):
/// the TCP peer the server recorded (absent only in unit tests), or what a trusted proxy
/// says. Every limiter is built from the same `[limits]`, so any gives the same answer.
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        Ok(ClientAddr(app.limiter.client_ip(&parts.headers, peer)))
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

    fn limiter(header: &str, proxies: &[&str]) -> ClientLimiter {
        ClientLimiter::new(&LimitsConfig {
            unauthenticated_per_minute: 60,
            unauthenticated_burst: 3,
            client_ip_header: header.into(),
            trusted_proxies: proxies.iter().map(|p| p.to_string()).collect(),
            refusal_audits_per_minute: 60,
            live_streams_per_session: 8,
            live_streams_total: 100,
        })
    }

    #[test]
    fn a_client_gets_its_burst_then_waits() {
        let l = limiter("", &[]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            l.check(ip).unwrap();
        }
        let wait = l.check(ip).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        l.check("10.0.0.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        let l = limiter("", &[]);
        let a: SocketAddr = "[2001:db8:1:2::1]:5".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:ffff::9]:5".parse().unwrap();
        let headers = HeaderMap::new();
        assert_eq!(
            l.client_ip(&headers, Some(a)),
            l.client_ip(&headers, Some(b))
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert_eq!(
            l.client_ip(&headers, Some(mapped)),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn the_header_counts_only_from_trusted_proxies_and_from_the_right() {
        let l = limiter("x-forwarded-for", &["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let proxy: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.9:443".parse().unwrap();
        // A client behind nginx or an ALB writes what it likes on the left; the proxy
        // appends the address it saw.
        let spoofed = forwarded(&["1.2.3.4, 203.0.113.7"]);
        assert_eq!(l.client_ip(&spoofed, Some(proxy)), ip("203.0.113.7"));
        // Chained proxies: every trusted hop is skipped.
        let chained = forwarded(&["1.2.3.4, 203.0.113.7, 10.1.1.1", "10.2.2.2"]);
        assert_eq!(l.client_ip(&chained, Some(proxy)), ip("203.0.113.7"));
        // Ports, IPv6 and IPv4-mapped peers.
        let ported = forwarded(&["[2001:db8:1:2::7]:5555"]);
        assert_eq!(l.client_ip(&ported, Some(proxy)), ip("2001:db8:1:2::"));
        let mapped_proxy: SocketAddr = "[::ffff:10.0.0.1]:443".parse().unwrap();
        assert_eq!(l.client_ip(&spoofed, Some(mapped_proxy)), ip("203.0.113.7"));
        // From anyone else the header means nothing.
        assert_eq!(l.client_ip(&spoofed, Some(stranger)), ip("198.51.100.9"));
        // Only proxies in the list: the leftmost of them.
        let all_proxies = forwarded(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(l.client_ip(&all_proxies, Some(proxy)), ip("10.9.9.9"));
        // Garbage from a trusted proxy: its own address.
        let garbage = forwarded(&["not-an-address"]);
        assert_eq!(l.client_ip(&garbage, Some(proxy)), ip("10.0.0.1"));
        // No header: the peer.
        assert_eq!(l.client_ip(&HeaderMap::new(), Some(proxy)), ip("10.0.0.1"));
    }

    #[test]
    fn endpoints_that_need_no_token_are_limited() {
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
