//! `buildkitd-standin`: a test-only stand-in for BuildKit's daemon.
//!
//! It serves the BuildKit gRPC calls that the unmodified depot CLI makes during
//! `depot build` (Control and LLBBridge, BuildKit v0.11 wire format) over HTTP/2 with
//! mutual TLS, like a real builder, so that Kiln's tests can run the CLI end to end on a
//! machine without BuildKit. It builds nothing: every build succeeds once the client has
//! delivered its result. Each gRPC call is logged to stderr as one `grpc <path>` line.
//!
//! Usage: `buildkitd-standin --listen 127.0.0.1:PORT --cert server.pem --key server.key
//! --ca ca.pem [--plaintext] [--gateway-return] [--root DIR]`

mod service;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::Parser;
use kiln::proto::moby::buildkit::v1::control_server::ControlServer;
use kiln::proto::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridgeServer;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};
use tokio_rustls::TlsAcceptor;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

use crate::service::Standin;
use crate::tls::Conn;

/// A client that connects but never finishes its TLS handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open Session streams keep a graceful shutdown waiting; exit anyway after this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "buildkitd-standin",
    about = "Test stand-in for buildkitd: plays the BuildKit gRPC protocol of `depot build`"
)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:4443.
    #[arg(long)]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long, required_unless_present = "plaintext")]
    cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, required_unless_present = "plaintext")]
    key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that client certificates must chain to.
    #[arg(long, required_unless_present = "plaintext")]
    ca: Option<PathBuf>,
    /// Serve gRPC over cleartext HTTP/2 (h2c) without TLS. For debugging only.
    #[arg(long)]
    plaintext: bool,
    /// Advertise the gateway `return` capability, so clients end builds with
    /// LLBBridge/Return instead of a final LLBBridge/Solve.
    #[arg(long)]
    gateway_return: bool,
    /// BuildKit's state directory: finished solves are recorded in `solves.log` there.
    #[arg(long)]
    root: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("buildkitd-standin: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Installed first, so that a signal during startup still ends the process cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let acceptor = if args.plaintext {
        None
    } else {
        let (Some(cert), Some(key), Some(ca)) = (&args.cert, &args.key, &args.ca) else {
            return Err(anyhow!(
                "--cert, --key and --ca are required without --plaintext"
            ));
        };
        Some(TlsAcceptor::from(Arc::new(tls::server_config(
            cert, key, ca,
        )?)))
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "standin: listening on {} ({})",
        listener.local_addr()?,
        if acceptor.is_some() { "mTLS" } else { "h2c" }
    );

    let (conns_tx, conns_rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, acceptor, conns_tx));
    let incoming = futures_util::stream::unfold(conns_rx, |mut rx| async move {
        let conn = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(conn), rx))
    });

    let standin = Standin::new(args.gateway_return, args.root.clone());
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    // The depot CLI compresses requests with gzip when Kiln hands it `gzip{}`.
    let mut server = tokio::spawn(
        Server::builder()
            .trace_fn(log_call)
            .add_service(
                ControlServer::new(standin.clone()).accept_compressed(CompressionEncoding::Gzip),
            )
            .add_service(LlbBridgeServer::new(standin).accept_compressed(CompressionEncoding::Gzip))
            .serve_with_incoming_shutdown(incoming, async move { stopped.notified().await }),
    );

    let signal_name = tokio::select! {
        served = &mut server => {
            served.context("server task")?.context("serving gRPC")?;
            return Ok(());
        }
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    eprintln!("standin: {signal_name}, shutting down");
    stop.notify_one();
    if let Ok(served) = tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        served.context("server task")?.context("serving gRPC")?;
    }
    Ok(())
}

/// Accepts TCP connections and hands them to tonic, after a TLS handshake (run in its own
/// task, so one slow client does not hold up others) unless serving plaintext.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    conns: mpsc::Sender<Conn>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // E.g. out of file descriptors: back off instead of spinning.
                eprintln!("standin: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            if conns.send(Conn::Plain(tcp)).await.is_err() {
                return;
            }
            continue;
        };
        let conns = conns.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = conns.send(Conn::Tls(Box::new(tls))).await;
                }
                Ok(Err(err)) => eprintln!("standin: TLS handshake with {peer} failed: {err}"),
                Err(_) => eprintln!("standin: TLS handshake with {peer} timed out"),
            }
        });
    }
}

/// One stderr line per gRPC call, with the build ref that gateway calls carry and the
/// request compression, if any.
fn log_call(request: &http::Request<()>) -> tracing::Span {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let mut line = format!("grpc {}", request.uri().path());
    if let Some(build) = header("buildkit-controlapi-buildid") {
        line.push_str(&format!(" build={build}"));
    }
    if let Some(encoding) = header("grpc-encoding").filter(|e| *e != "identity") {
        line.push_str(&format!(" encoding={encoding}"));
    }
    eprintln!("{line}");
    tracing::Span::none()
}
