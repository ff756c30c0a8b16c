//! The instance identity document from EC2's instance metadata service (IMDSv2: a
//! session token first, then the document and its signature).

use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::proto::kiln::agent::v1::InstanceIdentity;

const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// IMDS answers within milliseconds on EC2; anything slower is not EC2.
const TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BYTES: usize = 16 * 1024;

/// The endpoint, overridable like the AWS SDKs do.
pub fn endpoint() -> String {
    std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
        .trim_end_matches('/')
        .to_string()
}

pub async fn instance_identity(endpoint: &str) -> anyhow::Result<InstanceIdentity> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = |method: hyper::Method, path: &str, header: (&str, &str)| {
        hyper::Request::builder()
            .method(method)
            .uri(format!("{endpoint}{path}"))
            .header(header.0, header.1)
            .body(Empty::<Bytes>::new())
            .context("building an IMDS request")
    };
    let fetch = |req: hyper::Request<Empty<Bytes>>| {
        let client = client.clone();
        async move {
            let path = req.uri().path().to_string();
            let response = tokio::time::timeout(TIMEOUT, client.request(req))
                .await
                .with_context(|| format!("IMDS {path} timed out"))?
                .with_context(|| format!("IMDS {path}"))?;
            let status = response.status();
            let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
                .await
                .with_context(|| format!("IMDS {path} timed out"))?
                .with_context(|| format!("IMDS {path}"))?
                .to_bytes();
            anyhow::ensure!(status.is_success(), "IMDS {path} answered {status}");
            anyhow::ensure!(body.len() <= MAX_BYTES, "IMDS {path} answered too much");
            String::from_utf8(body.to_vec()).with_context(|| format!("IMDS {path} is not UTF-8"))
        }
    };
    let token = fetch(request(
        hyper::Method::PUT,
        "/latest/api/token",
        ("x-aws-ec2-metadata-token-ttl-seconds", "300"),
    )?)
    .await?;
    let token = token.trim();
    let document = fetch(request(
        hyper::Method::GET,
        "/latest/dynamic/instance-identity/document",
        ("x-aws-ec2-metadata-token", token),
    )?)
    .await?;
    let signature = fetch(request(
        hyper::Method::GET,
        "/latest/dynamic/instance-identity/signature",
        ("x-aws-ec2-metadata-token", token),
    )?)
    .await?;
    Ok(InstanceIdentity {
        document,
        signature: signature.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fake IMDS that requires the session token on the document calls.
    #[tokio::test]
    async fn reads_the_document_and_signature_with_a_session_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let body = if request.starts_with("put /latest/api/token")
                    && request.contains("x-aws-ec2-metadata-token-ttl-seconds")
                {
                    "session-1"
                } else if !request.contains("x-aws-ec2-metadata-token: session-1") {
                    ""
                } else if request.contains("/instance-identity/document") {
                    r#"{"instanceId":"i-1"}"#
                } else {
                    "c2ln\n"
                };
                let status = if body.is_empty() {
                    "401 Unauthorized"
                } else {
                    "200 OK"
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        let identity = instance_identity(&format!("http://{address}"))
            .await
            .unwrap();
        assert_eq!(identity.document, r#"{"instanceId":"i-1"}"#);
        assert_eq!(identity.signature, "c2ln");
    }
}
