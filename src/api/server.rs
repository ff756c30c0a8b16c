//! The one HTTP port: HTTP/1.1 and HTTP/2 (h2c with prior knowledge on cleartext, ALPN
//! over TLS), with graceful shutdown that lets in-flight requests finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::TlsConfig;

#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long in-flight requests may run after shutdown begins.
    pub grace: Duration,
    pub h2_max_concurrent_streams: u32,
}

/// Loads the configured certificate and key into a rustls config that offers h2 and
/// http/1.1 over ALPN. `None` when TLS is not configured.
pub fn tls_config(config: &TlsConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    tls_config_named(config, "server.tls")
}

/// Like [`tls_config`], naming the settings under `key` in errors.
pub fn tls_config_named(
    config: &TlsConfig,
    setting: &str,
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    if !config.enabled() {
        return Ok(None);
    }
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&config.cert_path)
            .with_context(|| format!("{setting}.cert_path {:?}: cannot open", config.cert_path))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| {
        format!(
            "{setting}.cert_path {:?}: not a PEM certificate chain",
            config.cert_path
        )
    })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{setting}.cert_path {:?}: contains no certificate",
        config.cert_path
    );
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&config.key_path)
            .with_context(|| format!("{setting}.key_path {:?}: cannot open", config.key_path))?,
    ))
    .with_context(|| {
        format!(
            "{setting}.key_path {:?}: not a PEM private key",
            config.key_path
        )
    })?
    .with_context(|| {
        format!(
            "{setting}.key_path {:?}: contains no private key",
            config.key_path
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol setup")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("{setting}: the certificate and key do not match"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// Accepts connections until `shutdown` resolves, then stops accepting and waits up to
/// `options.grace` for open requests to complete.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = connection_service(router.clone(), peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(options.grace) => {
            tracing::warn!(grace = ?options.grace, "grace period over; closing remaining connections");
        }
    }
    Ok(())
}

type IncomingRequest = http::Request<hyper::body::Incoming>;

/// The router for one connection, with the peer address available as `ConnectInfo`.
fn connection_service(
    router: Router,
    peer: SocketAddr,
) -> TowerToHyperService<
    tower::util::MapRequest<Router, impl FnMut(IncomingRequest) -> IncomingRequest + Clone>,
> {
    TowerToHyperService::new(router.map_request(move |mut req: IncomingRequest| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    }))
}
