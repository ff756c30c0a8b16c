//! The `buildkitd-standin` binary: mutual TLS (only clients with a certificate from the
//! configured CA get in), the gateway build protocol the depot CLI plays against it,
//! UNIMPLEMENTED for methods it does not serve, and a clean exit on SIGTERM.
mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::wait_for;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use kiln::proto::moby::buildkit::v1::control_client::ControlClient;
use kiln::proto::moby::buildkit::v1::frontend::PingRequest;
use kiln::proto::moby::buildkit::v1::frontend::SolveRequest as GatewaySolveRequest;
use kiln::proto::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient;
use kiln::proto::moby::buildkit::v1::{
    BytesMessage, ListWorkersRequest, ListWorkersResponse, SolveRequest, StatusRequest,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

const SERVER_NAME: &str = "buildkitd.standin";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A CA that signs leaf certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key, both PEM.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "standin test");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The stand-in running with fresh certificates, and a client certificate from its CA.
struct Standin {
    child: Child,
    log: tempfile::NamedTempFile,
    port: u16,
    ca_pem: String,
    client: (String, String),
    _dir: tempfile::TempDir,
}

impl Standin {
    async fn start() -> Standin {
        let ca = Ca::new("standin test CA");
        let (server_cert, server_key) = ca.leaf(
            &[SERVER_NAME, "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ca.leaf(&["depot-cli-client"], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .write_all(contents.as_bytes())
                .unwrap();
            path
        };
        let (cert, key, ca_path) = (
            write("server.pem", &server_cert),
            write("server.key", &server_key),
            write("ca.pem", &ca.pem),
        );
        let log = tempfile::NamedTempFile::new().unwrap();
        // Port 0: the stand-in logs the port it got, so no other process can race for it.
        let child = Command::new(env!("CARGO_BIN_EXE_buildkitd-standin"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(&ca_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut standin = Standin {
            child,
            log,
            port: 0,
            ca_pem: ca.pem,
            client,
            _dir: dir,
        };
        let log_path = standin.log.path().to_owned();
        wait_for("the stand-in to listen", TIMEOUT, || {
            let log_path = log_path.clone();
            async move { listening_port(&log_path).is_some() }
        })
        .await;
        standin.port = listening_port(&log_path).unwrap();
        standin
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A gRPC channel over TLS trusting the stand-in's CA, presenting `client` if given.
    async fn channel(
        &self,
        client: Option<(&str, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let roots = {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            roots
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let port = self.port;
        // The connector does TLS itself; an https URI would make tonic want its own.
        Endpoint::from_static("http://buildkitd.standin")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    let name = ServerName::try_from(SERVER_NAME).unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
    }

    async fn valid_channel(&self) -> Channel {
        let (cert, key) = &self.client;
        self.channel(Some((cert, key))).await.unwrap()
    }

    async fn wait_for_log(&self, what: &str) {
        let path = self.log.path().to_owned();
        wait_for(&format!("{what:?} in the stand-in's log"), TIMEOUT, || {
            let path = path.clone();
            let what = what.to_owned();
            async move {
                std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .contains(&what)
            }
        })
        .await;
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_port(log: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("standin: listening on "))?;
    let addr = line.split_whitespace().nth(3)?;
    addr.rsplit(':').next()?.parse().ok()
}

/// Calls ListWorkers on a fresh connection; any failure (handshake or call) is an error.
async fn list_workers(
    standin: &Standin,
    client: Option<(&str, &str)>,
) -> Result<ListWorkersResponse, String> {
    let channel = standin
        .channel(client)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    ControlClient::new(channel)
        .list_workers(ListWorkersRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("call: {e:?}"))
}

fn with_build<T>(message: T, build: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("buildkit-controlapi-buildid", build.parse().unwrap());
    request
}

#[tokio::test]
async fn a_client_with_a_certificate_from_the_ca_lists_the_workers() {
    let standin = Standin::start().await;
    let (cert, key) = &standin.client;
    let workers = list_workers(&standin, Some((cert, key))).await.unwrap();
    assert_eq!(workers.record.len(), 1);
    let platforms: Vec<(&str, &str)> = workers.record[0]
        .platforms
        .iter()
        .map(|p| (p.os.as_str(), p.architecture.as_str()))
        .collect();
    assert_eq!(platforms, [("linux", "amd64"), ("linux", "arm64")]);
    standin
        .wait_for_log("grpc /moby.buildkit.v1.Control/ListWorkers")
        .await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let standin = Standin::start().await;
    let result = list_workers(&standin, None).await;
    assert!(result.is_err(), "got {result:?}");
    standin.wait_for_log("peer sent no certificates").await;
    assert!(!standin.logs().contains("grpc /"), "{}", standin.logs());
}

#[tokio::test]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let standin = Standin::start().await;
    let other = Ca::new("another CA");
    let (cert, key) = other.leaf(&["depot-cli-client"], ExtendedKeyUsagePurpose::ClientAuth);
    let result = list_workers(&standin, Some((&cert, &key))).await;
    assert!(result.is_err(), "got {result:?}");
    standin.wait_for_log("UnknownIssuer").await;
    assert!(!standin.logs().contains("grpc /"), "{}", standin.logs());
}

/// The sequence `depot build` plays (default capabilities): Control/Solve and Status stay
/// open until the gateway client's final Solve for the same build ref.
#[tokio::test]
async fn a_gateway_build_ends_with_the_final_solve() {
    let standin = Standin::start().await;
    let channel = standin.valid_channel().await;
    let mut control = ControlClient::new(channel.clone());
    let mut bridge = LlbBridgeClient::new(channel);
    let build = "build-one";

    let solve = tokio::spawn({
        let mut control = control.clone();
        async move {
            control
                .solve(SolveRequest {
                    r#ref: build.to_owned(),
                    session: "session-one".to_owned(),
                    ..Default::default()
                })
                .await
        }
    });
    let mut status = control
        .status(StatusRequest {
            r#ref: build.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();

    let pong = bridge
        .ping(with_build(PingRequest {}, build))
        .await
        .unwrap()
        .into_inner();
    // No capability lists: the client falls back to the final-Solve protocol.
    assert!(pong.frontend_api_caps.is_empty());
    let first = bridge
        .solve(with_build(
            GatewaySolveRequest {
                frontend: "dockerfile.v0".to_owned(),
                allow_result_return: true,
                ..Default::default()
            },
            build,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.r#ref.is_empty());
    assert!(first.result.is_none());
    assert!(
        !solve.is_finished(),
        "Control/Solve ended before the result"
    );

    bridge
        .solve(with_build(
            GatewaySolveRequest {
                frontend: "dockerfile.v0".to_owned(),
                r#final: true,
                ..Default::default()
            },
            build,
        ))
        .await
        .unwrap();
    let solved = tokio::time::timeout(TIMEOUT, solve).await.unwrap().unwrap();
    assert!(solved.unwrap().into_inner().exporter_response.is_empty());
    let next = tokio::time::timeout(TIMEOUT, status.message())
        .await
        .unwrap();
    assert!(matches!(next, Ok(None)), "status: {next:?}");

    let err = bridge
        .solve(GatewaySolveRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn methods_it_does_not_serve_are_unimplemented() {
    let standin = Standin::start().await;
    let mut grpc = tonic::client::Grpc::new(standin.valid_channel().await);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<ListWorkersRequest, ListWorkersResponse, _>(
            Request::new(ListWorkersRequest::default()),
            PathAndQuery::from_static("/moby.buildkit.v1.Control/DiskUsage"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn sigterm_ends_it_cleanly_even_with_a_session_open() {
    let mut standin = Standin::start().await;
    let mut control = ControlClient::new(standin.valid_channel().await);
    let (_tx, rx) = tokio::sync::mpsc::channel::<BytesMessage>(1);
    let _session = control
        .session(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))
        .await
        .unwrap();
    standin
        .wait_for_log("grpc /moby.buildkit.v1.Control/Session")
        .await;

    // SAFETY: signalling our own child process.
    unsafe { libc::kill(standin.child.id() as i32, libc::SIGTERM) };
    let child = &mut standin.child;
    let mut status = None;
    wait_for("the stand-in to exit", TIMEOUT, || {
        status = child.try_wait().unwrap();
        std::future::ready(status.is_some())
    })
    .await;
    assert!(status.unwrap().success(), "{}", standin.logs());
}
