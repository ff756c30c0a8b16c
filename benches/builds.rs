//! Build-path benchmarks against a running `kiln serve` (started by scripts/bench-builds.sh):
//!
//! - `ttb`: time to builder with an idle builder: CreateBuild, then GetBuildKitConnection
//!   until `active`, then FinishBuild (which hands the builder back). Reports the time from
//!   sending CreateBuild to receiving `active`, over loopback HTTP/2.
//! - `cold`: time to builder when the builder must first boot, for the configured
//!   connection mode (long-poll vs `pending{wait_ms}`), driving the loop like the CLI.
//! - `health`: ReportBuildHealth from N concurrent builds at a fixed total rate.
//!
//! Env: BENCH_URL, BENCH_TOKEN (user token), BENCH_PROJECT, BENCH_MODE, and per mode
//! BENCH_ITERATIONS, BENCH_BUILDS, BENCH_RATE, BENCH_SECONDS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::proto::depot::cli::v1 as pb;
use prost::Message;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

struct Api {
    client: reqwest::Client,
    url: String,
}

impl Api {
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        token: &str,
        req: &Req,
    ) -> Result<Resp, String> {
        let res = self
            .client
            .post(format!("{}/depot.cli.v1.BuildService/{method}", self.url))
            .bearer_auth(token)
            .header("content-type", "application/proto")
            .body(req.encode_to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = res.status();
        let body = res.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!(
                "{method}: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Resp::decode(body).map_err(|e| e.to_string())
    }

    async fn create(&self, token: &str, project: &str) -> pb::CreateBuildResponse {
        self.call(
            "CreateBuild",
            token,
            &pb::CreateBuildRequest {
                project_id: Some(project.into()),
                ..Default::default()
            },
        )
        .await
        .expect("CreateBuild")
    }

    async fn finish(&self, build: &pb::CreateBuildResponse) {
        let req = pb::FinishBuildRequest {
            build_id: build.build_id.clone(),
            result: Some(pb::finish_build_request::Result::Success(Default::default())),
        };
        let _: pb::FinishBuildResponse = self
            .call("FinishBuild", &build.build_token, &req)
            .await
            .expect("FinishBuild");
    }

    /// Loops like the CLI: on `pending`, sleep `wait_ms` and ask again.
    async fn connect(&self, build: &pb::CreateBuildResponse) -> u32 {
        let req = pb::GetBuildKitConnectionRequest {
            build_id: build.build_id.clone(),
            platform: pb::BuilderPlatform::Amd64 as i32,
        };
        let mut calls = 0;
        loop {
            calls += 1;
            let res: pb::GetBuildKitConnectionResponse = self
                .call("GetBuildKitConnection", &build.build_token, &req)
                .await
                .expect("GetBuildKitConnection");
            match res.connection {
                Some(pb::get_build_kit_connection_response::Connection::Active(_)) => return calls,
                Some(pb::get_build_kit_connection_response::Connection::Pending(p)) => {
                    tokio::time::sleep(Duration::from_millis(p.wait_ms.max(1) as u64)).await
                }
                None => panic!("empty connection"),
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 90.0)),
        ms(percentile(&samples, 99.0)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
    );
}

async fn time_to_builder(api: &Api, token: &str, project: &str) {
    let iterations: usize = env("BENCH_ITERATIONS", "500").parse().unwrap();
    // Warm up: the first build launches the builder.
    let first = api.create(token, project).await;
    api.connect(&first).await;
    api.finish(&first).await;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let build = api.create(token, project).await;
        let calls = api.connect(&build).await;
        samples.push(started.elapsed());
        assert_eq!(
            calls, 1,
            "an idle builder must be handed out on the first call"
        );
        api.finish(&build).await;
    }
    report(
        "time to builder (idle builder, CreateBuild → active)",
        samples,
    );
}

async fn cold_start(api: &Api, token: &str) {
    let iterations: usize = env("BENCH_ITERATIONS", "20").parse().unwrap();
    let projects: Vec<String> = env("BENCH_PROJECTS", "")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let mut samples = Vec::new();
    let mut calls_total = 0;
    for project in projects.iter().take(iterations) {
        let started = Instant::now();
        let build = api.create(token, project).await;
        calls_total += api.connect(&build).await;
        samples.push(started.elapsed());
        api.finish(&build).await;
    }
    println!(
        "GetBuildKitConnection calls per build: {:.1}",
        calls_total as f64 / samples.len().max(1) as f64
    );
    report(
        &format!(
            "time to builder (builder boots, {})",
            env("BENCH_LABEL", "")
        ),
        samples,
    );
}

async fn health(api: Arc<Api>, token: &str, project: &str) {
    let builds: usize = env("BENCH_BUILDS", "5000").parse().unwrap();
    let rate: f64 = env("BENCH_RATE", "10000").parse().unwrap();
    let seconds: f64 = env("BENCH_SECONDS", "20").parse().unwrap();
    println!("creating {builds} builds…");
    let mut created = Vec::with_capacity(builds);
    let mut handles = Vec::new();
    for chunk in 0..builds.div_ceil(100) {
        let api = api.clone();
        let token = token.to_string();
        let project = project.to_string();
        let n = 100.min(builds - chunk * 100);
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(api.create(&token, &project).await);
            }
            out
        }));
    }
    for h in handles {
        created.extend(h.await.unwrap());
    }
    let created = Arc::new(created);
    // Steady state: every build has reported before (its CLI started reporting when it
    // got its builder), so the measured run is not one burst of first calls.
    let mut warm = Vec::new();
    for chunk in created.chunks(created.len().div_ceil(64).max(1)) {
        let api = api.clone();
        let chunk: Vec<_> = chunk.to_vec();
        warm.push(tokio::spawn(async move {
            for build in chunk {
                let req = pb::ReportBuildHealthRequest {
                    build_id: build.build_id.clone(),
                    platform: pb::BuilderPlatform::Amd64 as i32,
                };
                let _ = api
                    .call::<_, pb::ReportBuildHealthResponse>(
                        "ReportBuildHealth",
                        &build.build_token,
                        &req,
                    )
                    .await;
            }
        }));
    }
    for w in warm {
        w.await.unwrap();
    }
    println!("sending ReportBuildHealth at {rate}/s for {seconds}s across {builds} builds…");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * seconds) as usize;
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let api = api.clone();
        let created = created.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let build = &created[i % created.len()];
            let req = pb::ReportBuildHealthRequest {
                build_id: build.build_id.clone(),
                platform: pb::BuilderPlatform::Amd64 as i32,
            };
            // Latency from the scheduled send time, so queueing delay is counted.
            let ok = api
                .call::<_, pb::ReportBuildHealthResponse>(
                    "ReportBuildHealth",
                    &build.build_token,
                    &req,
                )
                .await
                .is_ok();
            let _ = tx.send((due.elapsed(), ok));
        });
    }
    drop(tx);
    let mut samples = Vec::with_capacity(total);
    let mut errors = 0;
    while let Some((latency, ok)) = rx.recv().await {
        samples.push(latency);
        if !ok {
            errors += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "achieved {:.0} calls/s, {errors} errors",
        samples.len() as f64 / elapsed
    );
    report("ReportBuildHealth latency", samples);
}

#[tokio::main]
async fn main() {
    let url = env("BENCH_URL", "");
    if url.is_empty() {
        eprintln!("run through scripts/bench-builds.sh, which starts PostgreSQL and kiln");
        return;
    }
    let connections: usize = env("BENCH_CONNECTIONS", "8").parse().unwrap();
    let token = env("BENCH_TOKEN", "");
    let project = env("BENCH_PROJECT", "");
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let api = Arc::new(Api { client, url });
    match env("BENCH_MODE", "ttb").as_str() {
        "ttb" => time_to_builder(&api, &token, &project).await,
        "cold" => cold_start(&api, &token).await,
        "health" => health(api, &token, &project).await,
        other => eprintln!("unknown BENCH_MODE {other}"),
    }
}
