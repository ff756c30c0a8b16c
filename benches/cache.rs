//! Layer-cache allocator benchmarks against a real Ceph cluster (started by
//! scripts/bench-cache.sh), each Kiln figure beside the `rbd` CLI doing the same work on
//! the same cluster in the same run.
//!
//! - `ops`: create, grow, usage, reset and delete of one volume, N times each. Kiln's
//!   figure is the whole operation: its database writes and the job's storage calls
//!   (in process, librbd); the CLI's is the `rbd` commands a script would run.
//! - `meter`: one metering pass over N volumes (usage of each, as `rbd du` reports it,
//!   written back), against `rbd du` over the same namespaces.
//! - `fuse`: sequential write and read throughput of a volume attached the way the agent
//!   attaches it here (rbd-fuse, loop device, ext4).
//!
//! Env: BENCH_DATABASE_URL, CEPH_CONF, CEPH_POOL, BENCH_MODE, BENCH_ITERATIONS,
//! BENCH_VOLUMES, BENCH_FUSE_MIB.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::auth::Principal;
use kiln::cache::{Cache, GIB, Grant, ImageRef};
use kiln::config::Config;
use kiln::db::volumes::{self as rows, NewVolume};
use kiln::projects::{ProjectSettings, Projects};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(label: &str, kiln: &mut [Duration], cli: &mut [Duration]) {
    let (k50, k99) = (percentile(kiln, 0.5), percentile(kiln, 0.99));
    let (c50, c99) = (percentile(cli, 0.5), percentile(cli, 0.99));
    println!(
        "| {label} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.2}x |",
        ms(k50),
        ms(k99),
        ms(c50),
        ms(c99),
        ms(k50) / ms(c50)
    );
}

/// Runs the `rbd` CLI and returns how long it took.
fn rbd(args: &[&str]) -> Duration {
    timed("rbd", args)
}

/// Runs a Ceph CLI and returns how long it took.
fn timed(program: &str, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("running a Ceph CLI");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

struct Bench {
    pool: sqlx::PgPool,
    cache: Arc<Cache>,
    projects: Projects,
    ceph_pool: String,
    org: String,
}

async fn setup() -> Bench {
    let url = env("BENCH_DATABASE_URL", "");
    let ceph_pool = env("CEPH_POOL", "kiln-cache");
    let config = Config::load_from(
        None,
        [
            ("KILN_DATABASE__URL".to_string(), url.clone()),
            ("KILN_CACHE__PROVIDER".to_string(), "ceph".to_string()),
            (
                "KILN_CACHE__CEPH__CONF_PATH".to_string(),
                env("CEPH_CONF", ""),
            ),
            ("KILN_CACHE__CEPH__POOL".to_string(), ceph_pool.clone()),
            ("KILN_CACHE__CREATE_ON".to_string(), "project".to_string()),
            ("KILN_CACHE__CAPACITY_GB".to_string(), "1000000".to_string()),
        ],
    )
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .unwrap();
    kiln::db::migrate(&pool).await.unwrap();
    let cache = Arc::new(Cache::new(pool.clone(), &config));
    let auth = Arc::new(kiln::auth::Authenticator::new(pool.clone(), &config.auth));
    let orgs = kiln::orgs::Orgs::new(pool.clone(), auth.clone());
    let (org, _) = orgs
        .create(
            &operator(),
            &format!("bench {}", kiln::db::ids::new_id()),
            None,
        )
        .await
        .unwrap();
    Bench {
        projects: Projects::new(pool.clone(), auth, cache.clone()),
        pool,
        cache,
        ceph_pool,
        org: org.id,
    }
}

fn operator() -> Principal {
    Principal::operator("bench")
}

impl Bench {
    /// A project with its two volumes created; returns its amd64 volume.
    async fn project(&self) -> (String, rows::Volume) {
        let project = self
            .projects
            .create(
                &operator(),
                Some(&self.org),
                ProjectSettings {
                    name: Some(format!("p {}", kiln::db::ids::new_id())),
                    cache_size_gb_amd64: Some(1),
                    cache_size_gb_arm64: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let volumes = rows::of_project(&self.pool, &project.id).await.unwrap();
        for v in &volumes {
            self.cache.run_create(&v.id).await.unwrap();
        }
        let amd64 = volumes.into_iter().find(|v| v.platform == "amd64").unwrap();
        (project.id, amd64)
    }

    fn spec(&self, namespace: &str, image: &str) -> String {
        format!("{}/{namespace}/{image}", self.ceph_pool)
    }
}

async fn ops(b: &Bench) {
    let iterations: usize = env("BENCH_ITERATIONS", "30").parse().unwrap();
    let (mut create_k, mut create_c) = (Vec::new(), Vec::new());
    let (mut grow_k, mut grow_c) = (Vec::new(), Vec::new());
    let (mut usage_k, mut usage_c) = (Vec::new(), Vec::new());
    let (mut reset_k, mut reset_c) = (Vec::new(), Vec::new());
    let (mut delete_k, mut delete_c) = (Vec::new(), Vec::new());
    let (mut grant_k, mut grant_c) = (Vec::new(), Vec::new());
    let cli_ns = format!("proj-bench{}", kiln::db::ids::new_id());
    rbd(&["namespace", "create", &format!("{}/{cli_ns}", b.ceph_pool)]);
    for i in 0..iterations {
        // create: Kiln inserts the row (the allocator's transaction) and runs the job.
        let (project, volume) = b.project().await;
        let id = kiln::db::ids::new_id();
        let started = Instant::now();
        let new = rows::insert(
            &b.pool,
            &NewVolume {
                id: &id,
                kind: "ephemeral",
                project_id: Some(&project),
                organization_id: &b.org,
                platform: "amd64",
                generation: 0,
                namespace: &volume.namespace,
                image: &format!("bench-{id}"),
                size_bytes: GIB,
                parent_volume_id: None,
                snapshot: None,
                build_id: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
        b.cache.run_create(&new.id).await.unwrap();
        create_k.push(started.elapsed());
        let image = format!("img{i}");
        create_c.push(rbd(&["create", "--size", "1G", &b.spec(&cli_ns, &image)]));

        // grow
        let started = Instant::now();
        rows::request_grow(&b.pool, &volume.id, 2 * GIB)
            .await
            .unwrap();
        b.cache.run_resize(&volume.id).await.unwrap();
        grow_k.push(started.elapsed());
        grow_c.push(rbd(&["resize", "--size", "2G", &b.spec(&cli_ns, &image)]));

        // usage, after 8 MiB written to each
        let admin = b.cache.provider();
        let data = vec![1u8; 8 << 20];
        let ceph = kiln_ceph::Ceph::connect(Path::new(&env("CEPH_CONF", "")), "admin")
            .await
            .unwrap();
        ceph.rbd(&b.ceph_pool, &volume.namespace)
            .write(&volume.image, 0, data.clone())
            .await
            .unwrap();
        ceph.rbd(&b.ceph_pool, &cli_ns)
            .write(&image, 0, data)
            .await
            .unwrap();
        let started = Instant::now();
        let used = admin
            .used(&ImageRef::new(&volume.namespace, &volume.image))
            .await
            .unwrap();
        usage_k.push(started.elapsed());
        assert_eq!(used, 8 << 20);
        usage_c.push(rbd(&["du", &b.spec(&cli_ns, &image)]));

        // reset: Kiln's reset transaction, the new image's creation, the old one's
        // deletion; the CLI creates a new image and trashes and purges the old one.
        let started = Instant::now();
        let reset = b.cache.reset(&operator(), Some(&project)).await.unwrap();
        assert!(reset.took_effect);
        for v in rows::of_project(&b.pool, &project).await.unwrap() {
            match v.state.as_str() {
                "creating" if v.platform == "amd64" => b.cache.run_create(&v.id).await.unwrap(),
                "resetting" if v.platform == "amd64" => b.cache.run_delete(&v.id).await.unwrap(),
                _ => {}
            }
        }
        reset_k.push(started.elapsed());
        let started = Instant::now();
        rbd(&[
            "create",
            "--size",
            "1G",
            &b.spec(&cli_ns, &format!("{image}-g1")),
        ]);
        rbd(&["trash", "mv", &b.spec(&cli_ns, &image)]);
        let trash = Command::new("rbd")
            .args([
                "trash",
                "ls",
                "--pool",
                &b.ceph_pool,
                "--namespace",
                &cli_ns,
                "--format",
                "json",
            ])
            .output()
            .unwrap();
        let entries: serde_json::Value = serde_json::from_slice(&trash.stdout).unwrap();
        for entry in entries.as_array().unwrap() {
            rbd(&[
                "trash",
                "rm",
                "--pool",
                &b.ceph_pool,
                "--namespace",
                &cli_ns,
                entry["id"].as_str().unwrap(),
            ]);
        }
        reset_c.push(started.elapsed());

        // delete: the ephemeral volume from above (nothing holds it)
        let started = Instant::now();
        rows::transition(&b.pool, &new.id, &["available"], "deleting")
            .await
            .unwrap();
        b.cache.run_delete(&new.id).await.unwrap();
        delete_k.push(started.elapsed());
        delete_c.push(rbd(&[
            "rm",
            "--no-progress",
            &b.spec(&cli_ns, &format!("{image}-g1")),
        ]));

        // grant: a machine's cephx key scoped to the project's namespace (a monitor
        // write, on the path of every assignment), beside `ceph auth get-or-create`.
        let machine = format!("bench{}", kiln::db::ids::new_id());
        let started = Instant::now();
        admin
            .grant(Grant {
                machine_id: &machine,
                writable: &volume.namespace,
                readable: None,
            })
            .await
            .unwrap();
        grant_k.push(started.elapsed());
        admin.revoke(&machine).await.unwrap();
        let entity = format!("client.kiln-cli-{i}");
        let osd = format!("profile rbd pool={} namespace={cli_ns}", b.ceph_pool);
        grant_c.push(timed(
            "ceph",
            &[
                "auth",
                "get-or-create",
                &entity,
                "mon",
                "profile rbd",
                "osd",
                &osd,
            ],
        ));
        timed("ceph", &["auth", "rm", &entity]);
    }
    println!(
        "| operation ({iterations} each) | Kiln p50 / p99 | rbd CLI p50 / p99 | Kiln/CLI p50 |"
    );
    println!("|---|---|---|---|");
    report("create (1 GiB)", &mut create_k, &mut create_c);
    report("grow (1 -> 2 GiB)", &mut grow_k, &mut grow_c);
    report("usage (8 MiB written)", &mut usage_k, &mut usage_c);
    report(
        "reset (new image, old trashed + purged)",
        &mut reset_k,
        &mut reset_c,
    );
    report("delete", &mut delete_k, &mut delete_c);
    report(
        "grant (a machine's scoped key; CLI: ceph auth get-or-create)",
        &mut grant_k,
        &mut grant_c,
    );
}

async fn meter(b: &Bench) {
    let volumes: usize = env("BENCH_VOLUMES", "1000").parse().unwrap();
    let per_namespace = 100;
    println!("creating {volumes} volumes ({per_namespace} per namespace)…");
    let run = kiln::db::ids::new_id();
    let mut namespaces = Vec::new();
    let ceph = kiln_ceph::Ceph::connect(Path::new(&env("CEPH_CONF", "")), "admin")
        .await
        .unwrap();
    let started = Instant::now();
    for n in 0..volumes {
        let namespace = format!("proj-m{run}{}", n / per_namespace);
        if n % per_namespace == 0 {
            namespaces.push(namespace.clone());
        }
        let id = kiln::db::ids::new_id();
        let image = format!("cache-amd64-g0-{id}");
        rows::insert(
            &b.pool,
            &NewVolume {
                id: &id,
                kind: "ephemeral",
                project_id: None,
                organization_id: &b.org,
                platform: "amd64",
                generation: 0,
                namespace: &namespace,
                image: &image,
                size_bytes: GIB,
                parent_volume_id: None,
                snapshot: None,
                build_id: None,
            },
        )
        .await
        .unwrap();
        b.cache.run_create(&id).await.unwrap();
        if n % 10 == 0 {
            ceph.rbd(&b.ceph_pool, &namespace)
                .write(&image, 0, vec![1u8; 4 << 20])
                .await
                .unwrap();
        }
    }
    println!("created in {:.1} s", started.elapsed().as_secs_f64());
    let mut kiln_passes = Vec::new();
    let mut cli_passes = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let pass = b.cache.meter().await.unwrap();
        kiln_passes.push(started.elapsed());
        assert!(pass.volumes >= volumes, "{pass:?}");
        assert_eq!(pass.failures, 0);
        let started = Instant::now();
        for namespace in &namespaces {
            rbd(&["du", "--pool", &b.ceph_pool, "--namespace", namespace]);
        }
        cli_passes.push(started.elapsed());
    }
    println!(
        "| usage of {volumes} volumes | Kiln metering pass (measure + store) | rbd du per namespace ({} calls) |",
        namespaces.len()
    );
    println!("|---|---|---|");
    for (k, c) in kiln_passes.iter().zip(&cli_passes) {
        println!("| pass | {:.0} ms | {:.0} ms |", ms(*k), ms(*c));
    }
}

async fn fuse(b: &Bench) {
    let mib: usize = env("BENCH_FUSE_MIB", "512").parse().unwrap();
    let (_project, volume) = b.project().await;
    rows::request_grow(&b.pool, &volume.id, 4 * GIB)
        .await
        .unwrap();
    b.cache.run_resize(&volume.id).await.unwrap();
    let machine = kiln::db::ids::new_id();
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, project_id, managed_by_agent, state, volume_id)
         VALUES ($1, 'local', 'amd64', $2, true, 'assigned', $3)",
    )
    .bind(&machine)
    .bind(&volume.project_id)
    .bind(&volume.id)
    .execute(&b.pool)
    .await
    .unwrap();
    rows::attach(&b.pool, &volume.id, &machine).await.unwrap();
    let kiln::cache::MachineVolume::Ready {
        volume_id,
        size_bytes,
        attachment,
        ..
    } = b.cache.for_machine(&machine).await.unwrap()
    else {
        panic!("volume not ready");
    };
    let spec = kiln::proto::kiln::agent::v1::CacheVolume {
        kind: attachment.kind.into(),
        source: attachment.source,
        mount_path: String::new(),
        options: attachment.options.into_iter().collect(),
        volume_id,
        size_bytes,
    };
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let attached = kiln::agent::volume::AttachedVolume::attach(&spec, &machine, state.path())
        .await
        .unwrap();
    println!(
        "attach (lease, rbd-fuse, losetup, mkfs.ext4, mount): {:.0} ms",
        ms(started.elapsed())
    );
    let file = attached.root.join("throughput");
    let dd = |args: &[&str]| {
        let out = Command::new("dd").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    let of = format!("of={}", file.display());
    let count = format!("count={}", mib / 4);
    println!(
        "write {mib} MiB (bs=4M, conv=fsync): {}",
        dd(&["if=/dev/zero", &of, "bs=4M", &count, "conv=fsync"])
    );
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let input = format!("if={}", file.display());
    println!(
        "read {mib} MiB (bs=4M, iflag=direct): {}",
        dd(&[&input, "of=/dev/null", "bs=4M", "iflag=direct"])
    );
    let started = Instant::now();
    attached.detach().await;
    println!("detach: {:.0} ms", ms(started.elapsed()));

    // Attaching the formatted volume again, as a builder taking the project does.
    let rounds: usize = env("BENCH_ATTACH_ROUNDS", "20").parse().unwrap();
    let (mut attach, mut detach) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let attached = kiln::agent::volume::AttachedVolume::attach(&spec, &machine, state.path())
            .await
            .unwrap();
        attach.push(started.elapsed());
        let started = Instant::now();
        attached.detach().await;
        detach.push(started.elapsed());
    }
    println!(
        "attach a formatted volume (lease, rbd-fuse, losetup, probe, mount), {rounds} rounds: p50 {:.0} ms, p99 {:.0} ms",
        ms(percentile(&mut attach, 0.5)),
        ms(percentile(&mut attach, 0.99))
    );
    println!(
        "detach, {rounds} rounds: p50 {:.0} ms, p99 {:.0} ms",
        ms(percentile(&mut detach, 0.5)),
        ms(percentile(&mut detach, 0.99))
    );
}

#[tokio::main]
async fn main() {
    // RUST_LOG=kiln=info shows each attach's steps.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let b = setup().await;
    match env("BENCH_MODE", "ops").as_str() {
        "ops" => ops(&b).await,
        "meter" => meter(&b).await,
        "fuse" => fuse(&b).await,
        other => eprintln!("unknown BENCH_MODE {other}"),
    }
}
