//! The BuildKit Control and LLBBridge services of the stand-in.
//!
//! `depot build` drives a build through BuildKit's gateway client: it opens Status,
//! Session and Control/Solve for a fresh build ref, then runs its build function locally,
//! which sends LLBBridge calls tagged with that ref (`buildkit-controlapi-buildid`). The
//! build is over when the client delivers its result: a final LLBBridge/Solve
//! (`final = true`, the pre-`return` protocol) or LLBBridge/Return. Control/Solve and
//! Status wait for that moment. Nothing is executed; the stand-in only plays the protocol.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{Stream, StreamExt, stream};
use kiln::proto::moby::buildkit::v1::apicaps::ApiCap;
use kiln::proto::moby::buildkit::v1::control_server::Control;
use kiln::proto::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridge;
use kiln::proto::moby::buildkit::v1::frontend::{
    PingRequest, PongResponse, Ref, Result as GatewayResult, ReturnRequest, ReturnResponse,
    SolveRequest as GatewaySolveRequest, SolveResponse as GatewaySolveResponse, result,
};
use kiln::proto::moby::buildkit::v1::types::{BuildkitVersion, WorkerRecord};
use kiln::proto::moby::buildkit::v1::{
    BytesMessage, InfoRequest, InfoResponse, ListWorkersRequest, ListWorkersResponse, SolveRequest,
    SolveResponse, StatusRequest, StatusResponse,
};
use kiln::proto::pb::Platform;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status, Streaming};

/// The gRPC metadata key on which BuildKit's client tags gateway calls with the build ref.
const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";

/// How a build ended: `Err` carries the gRPC code and message for Control/Solve.
type Outcome = Result<(), (Code, String)>;

/// Builds by ref. An entry is created by whichever call names the ref first (Solve,
/// Status and the gateway calls race on the client side) and records the outcome once.
/// Entries are kept after the build so that a late Status still ends at once; a
/// stand-in process lives for one test, so this does not grow without bound in practice.
#[derive(Default)]
struct Builds {
    by_ref: Mutex<HashMap<String, watch::Sender<Option<Outcome>>>>,
}

impl Builds {
    fn slot(&self, build_ref: &str) -> watch::Sender<Option<Outcome>> {
        let mut by_ref = self.by_ref.lock().unwrap_or_else(PoisonError::into_inner);
        by_ref
            .entry(build_ref.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Records the outcome of `build_ref`; only the first one counts.
    fn finish(&self, build_ref: &str, outcome: Outcome) {
        let text = match &outcome {
            Ok(()) => "ok".to_owned(),
            Err((code, message)) => format!("{code:?}: {message}"),
        };
        let first = self.slot(build_ref).send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(outcome);
            true
        });
        if first {
            eprintln!("standin: build {build_ref} finished: {text}");
        }
    }

    async fn wait(&self, build_ref: &str) -> Outcome {
        let mut rx = self.slot(build_ref).subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(slot) => slot.clone().unwrap_or(Ok(())),
            // The map keeps a sender alive, so this cannot happen; fail the build if it does.
            Err(_) => Err((Code::Internal, "build state lost".to_owned())),
        }
    }
}

/// Marks a build canceled if Control/Solve is dropped before the build ended (the client
/// went away), so that its Status stream ends too. A no-op after a normal end.
struct CancelOnDrop {
    builds: Arc<Builds>,
    build_ref: String,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.builds.finish(
            &self.build_ref,
            Err((Code::Cancelled, "the client canceled the solve".to_owned())),
        );
    }
}

type NoMessages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A response stream that sends nothing and ends when `done` completes.
fn silent_until<T: Send + 'static>(
    done: impl Future<Output = ()> + Send + 'static,
) -> NoMessages<T> {
    Box::pin(stream::once(done).filter_map(|()| async { None }))
}

/// Both services share one instance.
#[derive(Clone)]
pub struct Standin {
    builds: Arc<Builds>,
    next_ref: Arc<AtomicU64>,
    /// Advertise the gateway `return` capabilities (see `--gateway-return`).
    gateway_return: bool,
    /// BuildKit's state directory (`--root`): each finished solve is recorded in
    /// `solves.log` there, as a real builder's cache would keep its layers.
    root: Option<std::path::PathBuf>,
}

impl Standin {
    pub fn new(gateway_return: bool, root: Option<std::path::PathBuf>) -> Standin {
        Standin {
            builds: Arc::default(),
            next_ref: Arc::default(),
            gateway_return,
            root,
        }
    }

    /// Appends the solve to `<root>/solves.log`.
    fn record(&self, build_ref: &str) {
        use std::io::Write;
        let Some(root) = &self.root else { return };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("solves.log"))
            .and_then(|mut f| writeln!(f, "{build_ref}").and_then(|()| f.sync_all()));
        if let Err(err) = written {
            eprintln!(
                "standin: cannot record the solve in {}: {err}",
                root.display()
            );
        }
    }
}

fn platform(architecture: &str) -> Platform {
    Platform {
        architecture: architecture.to_owned(),
        os: "linux".to_owned(),
        ..Default::default()
    }
}

fn version() -> BuildkitVersion {
    BuildkitVersion {
        package: "kiln/buildkitd-standin".to_owned(),
        version: "v0.11.6-standin".to_owned(),
        revision: String::new(),
    }
}

/// The one worker: the CLI picks builders by the platforms their workers list.
fn worker() -> WorkerRecord {
    WorkerRecord {
        id: "standin".to_owned(),
        labels: HashMap::from([(
            "org.mobyproject.buildkit.worker.executor".to_owned(),
            "standin".to_owned(),
        )]),
        platforms: vec![platform("amd64"), platform("arm64")],
        gc_policy: Vec::new(),
        buildkit_version: Some(version()),
    }
}

fn cap(id: &str) -> ApiCap {
    ApiCap {
        id: id.to_owned(),
        enabled: true,
        ..Default::default()
    }
}

fn build_id<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .metadata()
        .get(BUILD_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| Status::invalid_argument(format!("missing {BUILD_ID_HEADER} metadata")))
}

#[tonic::async_trait]
impl Control for Standin {
    async fn solve(
        &self,
        request: Request<SolveRequest>,
    ) -> Result<Response<SolveResponse>, Status> {
        let request = request.into_inner();
        if request.r#ref.is_empty() {
            return Err(Status::invalid_argument("solve without a ref"));
        }
        // With a frontend or a definition, buildkitd would run the build by itself; no
        // gateway calls follow, so there is nothing to wait for.
        if !request.frontend.is_empty() || request.definition.is_some() {
            self.builds.finish(&request.r#ref, Ok(()));
            self.record(&request.r#ref);
            return Ok(Response::new(SolveResponse::default()));
        }
        let _cancel = CancelOnDrop {
            builds: self.builds.clone(),
            build_ref: request.r#ref.clone(),
        };
        match self.builds.wait(&request.r#ref).await {
            Ok(()) => {
                self.record(&request.r#ref);
                Ok(Response::new(SolveResponse::default()))
            }
            Err((code, message)) => Err(Status::new(code, message)),
        }
    }

    type StatusStream = NoMessages<StatusResponse>;

    /// Sends no progress and ends with the build: the client cancels a Status stream
    /// still open 3 s after its Solve returned, and reports that as a build failure.
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let build_ref = request.into_inner().r#ref;
        let builds = self.builds.clone();
        Ok(Response::new(silent_until(async move {
            let _ = builds.wait(&build_ref).await;
        })))
    }

    type SessionStream = NoMessages<BytesMessage>;

    /// Holds the client's session pipe open until the client closes it, never calling
    /// back into it: the stand-in needs no files, credentials or secrets.
    async fn session(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        Ok(Response::new(silent_until(async move {
            while let Ok(Some(_)) = inbound.message().await {}
        })))
    }

    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            record: vec![worker()],
        }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            buildkit_version: Some(version()),
        }))
    }
}

#[tonic::async_trait]
impl LlbBridge for Standin {
    async fn solve(
        &self,
        request: Request<GatewaySolveRequest>,
    ) -> Result<Response<GatewaySolveResponse>, Status> {
        let build_ref = build_id(&request)?;
        let request = request.into_inner();
        if request.r#final {
            // Pre-`return` protocol: re-sending the result's request with `final` ends
            // the build.
            self.builds.finish(&build_ref, Ok(()));
            return Ok(Response::new(GatewaySolveResponse::default()));
        }
        let id = format!(
            "standin-result-{}",
            self.next_ref.fetch_add(1, Ordering::Relaxed)
        );
        // The old protocol needs the bare `ref` (its final Solve looks the request up by
        // it); with `return` advertised, a structured result is the normal answer.
        let response = if self.gateway_return && request.allow_result_return {
            GatewaySolveResponse {
                r#ref: String::new(),
                result: Some(GatewayResult {
                    result: Some(result::Result::Ref(Ref { id, def: None })),
                    ..Default::default()
                }),
            }
        } else {
            GatewaySolveResponse {
                r#ref: id,
                result: None,
            }
        };
        Ok(Response::new(response))
    }

    /// Without capability lists the client assumes BuildKit's frozen default set
    /// (solve.base, solve.inlinereturn, resolveimage, readfile) and ends the build with a
    /// final Solve: the simplest protocol. `--gateway-return` advertises `return` and
    /// `proto.refarray` instead, so the client ends with LLBBridge/Return.
    async fn ping(&self, _request: Request<PingRequest>) -> Result<Response<PongResponse>, Status> {
        let frontend_api_caps = if self.gateway_return {
            [
                "solve.base",
                "resolveimage",
                "readfile",
                "return",
                "proto.refarray",
            ]
            .into_iter()
            .map(cap)
            .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(PongResponse {
            frontend_api_caps,
            llb_caps: Vec::new(),
            workers: vec![worker()],
        }))
    }

    async fn r#return(
        &self,
        request: Request<ReturnRequest>,
    ) -> Result<Response<ReturnResponse>, Status> {
        let build_ref = build_id(&request)?;
        let outcome = match request.into_inner().error {
            Some(error) if error.code != 0 => Err((Code::from_i32(error.code), error.message)),
            _ => Ok(()),
        };
        self.builds.finish(&build_ref, outcome);
        Ok(Response::new(ReturnResponse {}))
    }
}
