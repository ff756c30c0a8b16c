//! Calling the in-process router: REST JSON and Connect (binary protobuf) requests.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use prost::Message;
use serde_json::Value;
use tower::ServiceExt;

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub content_type: String,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    /// The body as JSON, or as a JSON string when it is not JSON.
    pub fn json_or_text(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&self.body).into()))
    }
}

/// Sends `req` through the router.
pub async fn send(router: &axum::Router, req: Request<Body>) -> Reply {
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        content_type,
        body,
    }
}

/// A POST with a body of the given content type.
pub async fn post(
    router: &axum::Router,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, content_type);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    send(router, req.body(body.into()).unwrap()).await
}

/// A unary Connect call in binary protobuf: the answer, or the Connect error JSON.
pub async fn unary<Req: Message, Resp: Message + Default>(
    router: &axum::Router,
    method: &str,
    token: &str,
    req: &Req,
) -> Result<Resp, Value> {
    let reply = post(
        router,
        &format!("/{method}"),
        Some(token),
        "application/proto",
        req.encode_to_vec(),
    )
    .await;
    if reply.status == StatusCode::OK {
        assert_eq!(reply.content_type, "application/proto");
        Ok(Resp::decode(reply.body).unwrap())
    } else {
        Err(reply.json())
    }
}

/// A request with an optional JSON body.
pub async fn request(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    send(router, req).await
}

/// A REST call: the status and the body parsed as JSON (or as a JSON string).
pub async fn rest(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let reply = request(router, method, path, token, body).await;
    (reply.status, reply.json_or_text())
}
