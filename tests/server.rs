//! The HTTP port itself: h2c with prior knowledge, TLS with ALPN, graceful shutdown.
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use kiln::api::server::{ServeOptions, serve};
use kiln::config::TlsConfig;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use common::{TestDb, tenant};

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(router: Router, tls: Option<Arc<rustls::ServerConfig>>, grace: Duration) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let options = ServeOptions {
        grace,
        h2_max_concurrent_streams: 100,
    };
    let done = tokio::spawn(serve(listener, router, tls, options, async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        done,
    }
}

#[tokio::test]
async fn cleartext_port_speaks_http1_and_h2c_prior_knowledge() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let mut server = start(
        kiln::api::router(common::app(&db)),
        None,
        Duration::from_secs(5),
    )
    .await;
    let url = format!("http://{}/api/v1/me", server.addr);

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let res = h2
        .get(&url)
        .bearer_auth(&t.user_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);

    let h1 = reqwest::Client::builder().http1_only().build().unwrap();
    let res = h1
        .get(&url)
        .bearer_auth(&t.user_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert_eq!(res.status(), 200);

    server.stop.take().unwrap().send(()).unwrap();
    server.done.await.unwrap().unwrap();
}

#[tokio::test]
async fn tls_port_negotiates_h2_with_alpn() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = TestDb::new().await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let tls = kiln::api::server::tls_config(&TlsConfig {
        cert_path,
        key_path,
    })
    .unwrap();
    let mut server = start(
        kiln::api::router(common::app(&db)),
        tls,
        Duration::from_secs(5),
    )
    .await;

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", server.addr)
        .build()
        .unwrap();
    let res = client
        .get(format!("https://localhost:{}/healthz", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick h2"
    );

    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", server.addr)
        .http1_only()
        .build()
        .unwrap();
    let res = h1
        .get(format!("https://localhost:{}/healthz", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);

    // Plain HTTP to the TLS port fails rather than being served in clear.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    server.stop.take().unwrap().send(()).unwrap();
    server.done.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let router = {
        let entered = entered.clone();
        let release = release.clone();
        Router::new().route(
            "/slow",
            get(move || {
                let entered = entered.clone();
                let release = release.clone();
                async move {
                    entered.notify_one();
                    release.notified().await;
                    "finished"
                }
            }),
        )
    };
    let mut server = start(router, None, Duration::from_secs(30)).await;
    let url = format!("http://{}/slow", server.addr);
    let in_flight =
        tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("request reached the handler");

    server.stop.take().unwrap().send(()).unwrap();
    // The listener closes: new connections are refused while the old request runs.
    let addr = server.addr;
    common::wait_for(
        "the listener to close",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(
        !server.done.is_finished(),
        "serve returned before the in-flight request finished"
    );

    release.notify_one();
    let body = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, "finished");
    tokio::time::timeout(Duration::from_secs(10), server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
