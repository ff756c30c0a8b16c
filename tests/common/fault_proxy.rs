//! A fault-injecting HTTP/1.1 proxy for EC2 Query-protocol endpoints (moto_server in
//! tests). It listens on 127.0.0.1 only, records every request (action, parameters,
//! arrival time) and, by rule, answers with an EC2 error instead of (or after) forwarding.
//!
//! ```ignore
//! let proxy = FaultProxy::start(&moto_url).await;
//! proxy.inject(Fault::error("RunInstances", "InsufficientInstanceCapacity", 500).times(1));
//! // point the client under test at proxy.url
//! assert_eq!(proxy.count("RunInstances"), 2);
//! ```
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

/// How long a `hang` fault holds a request before answering anyway (bounded, so nothing
/// outlives a test for long).
const HANG: Duration = Duration::from_secs(120);

/// One injection rule. The first rule that matches a request and has `count` left is
/// used, and its count goes down by one.
#[derive(Debug, Clone)]
pub struct Fault {
    /// `Action` parameter to match, or `"*"` for any.
    pub action: String,
    /// EC2 error code to answer with, e.g. `InsufficientInstanceCapacity`.
    pub code: String,
    pub message: String,
    /// HTTP status of the error answer.
    pub status: u16,
    /// How many matching requests get this fault; `usize::MAX` = all of them.
    pub count: usize,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Match only requests whose form parameter `.0` equals `.1`, e.g.
    /// `("InstanceType", "c6i.large")` or `("SubnetId", id)`.
    pub only_if: Option<(String, String)>,
    /// Never answer (for client timeouts); the request is still recorded.
    pub hang: bool,
    /// Forward the request upstream first and throw the real answer away, as if the
    /// response were lost after EC2 acted on it.
    pub after_forward: bool,
}

impl Fault {
    /// One error answer for `action`.
    pub fn error(action: &str, code: &str, status: u16) -> Fault {
        Fault {
            action: action.to_string(),
            code: code.to_string(),
            message: format!("{code} injected by the test proxy"),
            status,
            count: 1,
            delay: Duration::ZERO,
            only_if: None,
            hang: false,
            after_forward: false,
        }
    }

    /// One request to `action` that never gets an answer.
    pub fn hang(action: &str) -> Fault {
        Fault {
            hang: true,
            ..Fault::error(action, "Hang", 504)
        }
    }

    pub fn times(mut self, n: usize) -> Fault {
        self.count = n;
        self
    }

    pub fn always(self) -> Fault {
        self.times(usize::MAX)
    }

    pub fn only_if(mut self, param: &str, value: &str) -> Fault {
        self.only_if = Some((param.to_string(), value.to_string()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Fault {
        self.delay = delay;
        self
    }

    pub fn after_forward(mut self) -> Fault {
        self.after_forward = true;
        self
    }

    fn matches(&self, action: &str, params: &[(String, String)]) -> bool {
        self.count > 0
            && (self.action == "*" || self.action == action)
            && self
                .only_if
                .as_ref()
                .is_none_or(|(k, v)| param(params, k) == Some(v.as_str()))
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub action: String,
    /// Every form parameter of the request, decoded, in order.
    pub params: Vec<(String, String)>,
    /// The code of the fault injected into this request, if any.
    pub injected: Option<String>,
    /// Whether the request reached the upstream.
    pub forwarded: bool,
    /// When the request arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn param(&self, name: &str) -> Option<&str> {
        param(&self.params, name)
    }

    pub fn instance_type(&self) -> Option<&str> {
        self.param("InstanceType")
    }

    pub fn subnet_id(&self) -> Option<&str> {
        self.param("SubnetId")
    }

    pub fn client_token(&self) -> Option<&str> {
        self.param("ClientToken")
    }
}

struct State {
    upstream: String,
    http: reqwest::Client,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<Recorded>>,
    connections: Mutex<Vec<AbortHandle>>,
    request_ids: AtomicU64,
}

/// The running proxy; it stops when dropped.
pub struct FaultProxy {
    /// Base URL to point a client at, `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port that forwards to `upstream`
    /// (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fault proxy: bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("fault proxy: HTTP client"),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
            request_ids: AtomicU64::new(1),
        });
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn_state = accept_state.clone();
                let task = tokio::spawn(async move {
                    let service = service_fn(move |req| handle(conn_state.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut connections = accept_state.connections.lock().unwrap();
                connections.retain(|c| !c.is_finished());
                connections.push(task.abort_handle());
            }
        });
        FaultProxy { url, state, accept }
    }

    /// Adds a rule after the existing ones.
    pub fn inject(&self, fault: Fault) {
        self.state.faults.lock().unwrap().push(fault);
    }

    /// Removes every rule (recorded requests are kept).
    pub fn clear(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests so far with this `Action`.
    pub fn requests_for(&self, action: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.action == action)
            .collect()
    }

    /// How many requests with this `Action` arrived so far.
    pub fn count(&self, action: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.action == action)
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.state.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => return Ok(text(400, format!("fault proxy: reading the body: {err}"))),
    };
    let params = parse_form(&body);
    let action = param(&params, "Action").unwrap_or_default().to_string();

    let fault = {
        let mut faults = state.faults.lock().unwrap();
        faults
            .iter_mut()
            .find(|f| f.matches(&action, &params))
            .map(|f| {
                if f.count != usize::MAX {
                    f.count -= 1;
                }
                f.clone()
            })
    };
    let forward = fault.as_ref().is_none_or(|f| f.after_forward);
    state.log.lock().unwrap().push(Recorded {
        action,
        params,
        injected: fault.as_ref().map(|f| f.code.clone()),
        forwarded: forward,
        at: Instant::now(),
    });

    if let Some(fault) = &fault
        && !fault.delay.is_zero()
    {
        tokio::time::sleep(fault.delay).await;
    }
    let upstream = if forward {
        Some(forward_upstream(&state, &parts, body).await)
    } else {
        None
    };
    match fault {
        Some(fault) => {
            if fault.hang {
                tokio::time::sleep(HANG).await;
            }
            let request_id = state.request_ids.fetch_add(1, Ordering::Relaxed);
            Ok(ec2_error(&fault, request_id))
        }
        None => Ok(upstream.expect("forwarded")),
    }
}

async fn forward_upstream(
    state: &State,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = state
        .http
        .request(parts.method.clone(), format!("{}{}", state.upstream, path))
        .body(body);
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            request = request.header(name, value);
        }
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => return text(502, format!("fault proxy: upstream: {err}")),
    };
    let mut out = Response::builder().status(response.status());
    for (name, value) in response.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            out = out.header(name, value);
        }
    }
    match response.bytes().await {
        Ok(bytes) => out.body(Full::new(bytes)).unwrap(),
        Err(err) => text(502, format!("fault proxy: upstream body: {err}")),
    }
}

fn ec2_error(fault: &Fault, request_id: u64) -> Response<Full<Bytes>> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>fault-proxy-{request_id:08}</RequestID>\
         </Response>",
        xml_escape(&fault.code),
        xml_escape(&fault.message),
    );
    Response::builder()
        .status(fault.status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(xml)))
        .unwrap()
}

fn text(status: u16, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(message)))
        .unwrap()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The first value of a form parameter.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Decodes an `application/x-www-form-urlencoded` body.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut kv = pair.splitn(2, |&b| b == b'=');
            let key = percent_decode(kv.next().unwrap_or_default());
            let value = percent_decode(kv.next().unwrap_or_default());
            (key, value)
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
