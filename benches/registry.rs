//! HTTP/1.1 load generator for scripts/bench-registry.sh: `BENCH_CONNECTIONS` keep-alive
//! connections, each sending one request after the other for `BENCH_SECONDS` (after
//! `BENCH_WARMUP_SECONDS` unmeasured), reading every body to its end. Prints one JSON
//! line: requests, requests/s, MB/s of bodies, latency percentiles (request sent to last
//! body byte, as wrk measures), non-2xx answers and errors.
//!
//! The script uses it for manifest HEADs, which wrk 4.1 cannot send: its parser waits for
//! the body a HEAD answer's Content-Length announces (wg/wrk#198), so every connection
//! stalls on its first request. It also runs the config blob GET beside wrk, so its
//! figures can be compared with wrk's.
//!
//! Env: BENCH_URL (http://host:port/path), BENCH_METHOD (GET or HEAD; default GET),
//! BENCH_HEADERS (`Name: value` lines), BENCH_CONNECTIONS (default 1), BENCH_SECONDS
//! (default 15), BENCH_WARMUP_SECONDS (default 3), BENCH_THREADS (default 2).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Default)]
struct Tally {
    /// Microseconds per completed request.
    latencies: Vec<u32>,
    body_bytes: u64,
    non_2xx: u64,
    errors: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target() -> anyhow::Result<Target> {
    let url = url::Url::parse(&std::env::var("BENCH_URL")?)?;
    anyhow::ensure!(url.scheme() == "http", "only http:// URLs");
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let addr = format!("{host}:{port}")
        .parse()
        .map_err(|e| anyhow::anyhow!("{host}:{port} is not an address: {e}"))?;
    let path = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    };
    let method = Method::from_bytes(
        std::env::var("BENCH_METHOD")
            .unwrap_or_else(|_| "GET".into())
            .as_bytes(),
    )?;
    let mut headers = Vec::new();
    for line in std::env::var("BENCH_HEADERS").unwrap_or_default().lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        headers.push((
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        ));
    }
    Ok(Target {
        addr,
        host: format!("{host}:{port}"),
        path,
        method,
        headers,
    })
}

/// One connection: requests one after the other until `until`; the tally counts those
/// that finish after `measure_from`. A failed connection is replaced.
async fn connection(target: &Target, measure_from: Instant, until: Instant) -> Tally {
    let mut tally = Tally::default();
    'connect: while Instant::now() < until {
        let stream = match tokio::net::TcpStream::connect(target.addr).await {
            Ok(stream) => stream,
            Err(_) => {
                tally.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await else {
            tally.errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            let mut request = Request::builder()
                .method(target.method.clone())
                .uri(&target.path)
                .header(http::header::HOST, &target.host);
            for (name, value) in &target.headers {
                request = request.header(name, value);
            }
            let Ok(request) = request.body(Empty::<Bytes>::new()) else {
                tally.errors += 1;
                return tally;
            };
            if sender.ready().await.is_err() {
                tally.errors += 1;
                continue 'connect;
            }
            let started = Instant::now();
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(_) => {
                    tally.errors += 1;
                    continue 'connect;
                }
            };
            let ok = response.status().is_success();
            let mut body = response.into_body();
            let mut bytes = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            bytes += data.len() as u64;
                        }
                    }
                    Err(_) => {
                        tally.errors += 1;
                        continue 'connect;
                    }
                }
            }
            let finished = Instant::now();
            if finished >= measure_from && finished <= until {
                let micros = finished.duration_since(started).as_micros();
                tally
                    .latencies
                    .push(micros.min(u128::from(u32::MAX)) as u32);
                tally.body_bytes += bytes;
                if !ok {
                    tally.non_2xx += 1;
                }
            }
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

fn main() -> anyhow::Result<()> {
    let target = Box::leak(Box::new(target()?));
    let connections: usize = env_or("BENCH_CONNECTIONS", 1);
    let seconds: f64 = env_or("BENCH_SECONDS", 15.0);
    let warmup: f64 = env_or("BENCH_WARMUP_SECONDS", 3.0);
    let threads: usize = env_or("BENCH_THREADS", 2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let until = measure_from + Duration::from_secs_f64(seconds);
    let tallies = runtime.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                let target: &'static Target = target;
                tokio::spawn(async move { connection(target, measure_from, until).await })
            })
            .collect();
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await.unwrap_or_default());
        }
        tallies
    });
    let mut all = Tally::default();
    for tally in tallies {
        all.latencies.extend(tally.latencies);
        all.body_bytes += tally.body_bytes;
        all.non_2xx += tally.non_2xx;
        all.errors += tally.errors;
    }
    all.latencies.sort_unstable();
    let requests = all.latencies.len() as f64;
    let report = serde_json::json!({
        "method": target.method.as_str(),
        "connections": connections,
        "seconds": seconds,
        "requests": all.latencies.len(),
        "requests_per_s": requests / seconds,
        "mb_per_s": all.body_bytes as f64 / seconds / 1e6,
        "p50_ms": percentile(&all.latencies, 50.0),
        "p90_ms": percentile(&all.latencies, 90.0),
        "p99_ms": percentile(&all.latencies, 99.0),
        "max_ms": percentile(&all.latencies, 100.0),
        "non_2xx": all.non_2xx,
        "errors": all.errors,
    });
    println!("{report}");
    Ok(())
}
