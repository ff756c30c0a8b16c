//! Runs and watches BuildKit for the agent: writes the TLS files and buildkitd.toml of
//! the current task, starts the configured command, restarts it if it dies, and says
//! whether it serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use super::volume::{self, AttachedVolume};
use super::write_private;
use crate::proto::kiln::agent::v1 as pb;

/// What decides whether BuildKit must restart at once: not the certificates, which Kiln
/// re-issues with every directive, nor the volume's size, which grows in place, nor the
/// GC limit that follows it (applied at the next moment BuildKit has no client).
#[derive(Debug, Clone, PartialEq)]
struct TaskKey {
    project_id: String,
    platform: String,
    server_name: String,
    volume: Option<(String, String, String)>,
    max_parallelism: u32,
}

pub struct Supervisor {
    machine_id: String,
    state_dir: PathBuf,
    listen: String,
    command: Vec<String>,
    /// The directive generation applied (what health reports echo).
    generation: u64,
    /// The task Kiln wants served, and its generation, until it is applied.
    desired: Option<(u64, pb::BuildKitTask)>,
    last_attempt: Option<Instant>,
    failures: u32,
    task: Option<TaskKey>,
    /// The GC limit BuildKit runs with, and a newer one waiting for an idle moment.
    gc_keep_bytes: u64,
    pending_gc_keep_bytes: Option<u64>,
    volume: Option<AttachedVolume>,
    child: Option<Child>,
    started_at: Option<Instant>,
    restarts: u32,
}

pub struct Report {
    pub generation: u64,
    pub buildkit_up: bool,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    /// A task is applied but BuildKit does not answer yet.
    pub applied_but_starting: bool,
    /// A task waits to be applied (its volume is not free yet, say).
    pub waiting: bool,
}

fn task_key(task: &pb::BuildKitTask) -> TaskKey {
    TaskKey {
        project_id: task.project_id.clone(),
        platform: task.platform.clone(),
        server_name: task.server_name.clone(),
        volume: task
            .cache
            .as_ref()
            .filter(|c| volume::is_volume(Some(c)))
            .map(|c| (c.volume_id.clone(), c.kind.clone(), c.source.clone())),
        max_parallelism: task.max_parallelism,
    }
}

impl Supervisor {
    pub fn new(
        machine_id: String,
        state_dir: PathBuf,
        listen: String,
        command: Vec<String>,
    ) -> Self {
        Supervisor {
            machine_id,
            state_dir,
            listen,
            command,
            generation: 0,
            desired: None,
            last_attempt: None,
            failures: 0,
            task: None,
            gc_keep_bytes: 0,
            pending_gc_keep_bytes: None,
            volume: None,
            child: None,
            started_at: None,
            restarts: 0,
        }
    }

    /// BuildKit's state: on the attached volume, else on the machine's disk.
    fn root(&self) -> PathBuf {
        match &self.volume {
            Some(volume) => volume.root.clone(),
            None => self.state_dir.join("buildkit"),
        }
    }

    /// Serves `task` from now on. Applied at once when possible; otherwise (its volume
    /// is still locked by a draining builder, say) `keep_alive` keeps trying, and health
    /// reports the old generation until it is.
    pub async fn serve(&mut self, generation: u64, task: pb::BuildKitTask) -> anyhow::Result<()> {
        self.desired = Some((generation, task));
        self.failures = 0;
        self.converge().await
    }

    async fn converge(&mut self) -> anyhow::Result<()> {
        let Some((generation, task)) = self.desired.clone() else {
            return Ok(());
        };
        self.last_attempt = Some(Instant::now());
        let key = task_key(&task);
        let wanted = task.cache.as_ref().filter(|c| volume::is_volume(Some(c)));
        let attached = self.volume.as_ref().map(|v| v.volume_id.clone());
        if attached.as_deref() != wanted.map(|c| c.volume_id.as_str()) {
            self.stop_buildkit().await;
            self.task = None;
            if let Some(old) = self.volume.take() {
                old.detach().await;
            }
            if let Some(spec) = wanted {
                let attached = AttachedVolume::attach(spec, &self.machine_id, &self.state_dir)
                    .await
                    .context("attaching the cache volume")?;
                tracing::info!(volume_id = %spec.volume_id, root = %attached.root.display(), "cache volume attached");
                self.volume = Some(attached);
            }
        }
        if let (Some(spec), Some(volume)) = (wanted, self.volume.as_mut())
            && spec.size_bytes > volume.size_bytes
        {
            volume.grow(spec.size_bytes).await?;
        }
        if self.task.as_ref() == Some(&key) && self.running() {
            if task.gc_keep_bytes != self.gc_keep_bytes {
                // Restarting BuildKit now would kill running builds.
                self.pending_gc_keep_bytes = Some(task.gc_keep_bytes);
            }
            self.generation = generation;
            self.desired = None;
            return Ok(());
        }
        self.stop_buildkit().await;
        self.write_task(&task)?;
        self.gc_keep_bytes = task.gc_keep_bytes;
        self.pending_gc_keep_bytes = None;
        self.task = Some(key);
        self.restarts = 0;
        self.start()?;
        self.generation = generation;
        self.desired = None;
        Ok(())
    }

    pub async fn standby(&mut self, generation: u64) {
        self.stop().await;
        self.desired = None;
        self.generation = generation;
    }

    fn write_task(&self, task: &pb::BuildKitTask) -> anyhow::Result<()> {
        let tls = self.state_dir.join("tls");
        std::fs::create_dir_all(&tls).with_context(|| format!("creating {tls:?}"))?;
        let root = self.root();
        std::fs::create_dir_all(&root).with_context(|| format!("creating {root:?}"))?;
        write_private(&tls.join("tls.crt"), &task.server_cert_pem)?;
        write_private(&tls.join("tls.key"), &task.server_key_pem)?;
        write_private(&tls.join("tlsca.crt"), &task.ca_cert_pem)?;
        let config = buildkitd_toml(
            &root,
            &self.listen,
            &tls,
            task.gc_keep_bytes,
            task.max_parallelism.max(1),
        );
        write_private(&self.state_dir.join("buildkitd.toml"), &config)
    }

    /// Rewrites buildkitd.toml with a new GC limit (BuildKit reads it when it starts).
    fn rewrite_gc(&self, keep_bytes: u64) -> anyhow::Result<()> {
        let Some(task) = &self.task else {
            return Ok(());
        };
        let config = buildkitd_toml(
            &self.root(),
            &self.listen,
            &self.state_dir.join("tls"),
            keep_bytes,
            task.max_parallelism.max(1),
        );
        write_private(&self.state_dir.join("buildkitd.toml"), &config)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let tls = self.state_dir.join("tls");
        let path = |p: PathBuf| p.display().to_string();
        let root = self.root();
        let args: Vec<String> = self
            .command
            .iter()
            .map(|a| {
                a.replace("{config}", &path(self.state_dir.join("buildkitd.toml")))
                    .replace("{listen}", &self.listen)
                    .replace("{cert}", &path(tls.join("tls.crt")))
                    .replace("{key}", &path(tls.join("tls.key")))
                    .replace("{ca}", &path(tls.join("tlsca.crt")))
                    .replace("{root}", &path(root.clone()))
            })
            .collect();
        let (program, rest) = args
            .split_first()
            .context("the BuildKit command is empty")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("buildkitd.log"))
            .context("opening buildkitd.log")?;
        let mut command = Command::new(program);
        command
            .args(rest)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal the child
        // when the agent dies, so BuildKit never outlives its supervisor.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting BuildKit ({program})"))?;
        tracing::info!(pid = child.id(), program, "BuildKit started");
        self.child = Some(child);
        self.started_at = Some(Instant::now());
        Ok(())
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Keeps the machine on its directive: retries a task that could not be applied yet
    /// (backing off), grows the volume's filesystem while BuildKit has no client when it
    /// could not grow online, and restarts BuildKit if it died.
    pub async fn keep_alive(&mut self) {
        if self.desired.is_some() {
            let backoff = Duration::from_millis(500 << self.failures.min(4));
            if self.last_attempt.is_none_or(|at| at.elapsed() >= backoff) {
                match self.converge().await {
                    Ok(()) => self.failures = 0,
                    Err(err) => {
                        self.failures += 1;
                        tracing::warn!(error = %format!("{err:#}"), attempt = self.failures, "cannot serve the directive yet; retrying");
                    }
                }
            }
            return;
        }
        let grow = self.volume.as_ref().is_some_and(|v| v.grow_pending);
        if (grow || self.pending_gc_keep_bytes.is_some()) && !self.in_use() {
            // Maintenance that needs BuildKit stopped, done while no client uses it.
            self.stop_buildkit().await;
            if grow
                && let Some(volume) = self.volume.as_mut()
                && let Err(err) = volume.grow_offline().await
            {
                tracing::error!(error = %format!("{err:#}"), "could not grow the cache filesystem");
            }
            if let Some(keep) = self.pending_gc_keep_bytes.take() {
                self.gc_keep_bytes = keep;
                if let Err(err) = self.rewrite_gc(keep) {
                    tracing::error!(error = %format!("{err:#}"), "could not update BuildKit's GC limit");
                }
            }
            if self.task.is_some()
                && let Err(err) = self.start()
            {
                tracing::error!(error = %format!("{err:#}"), "could not restart BuildKit");
            }
            return;
        }
        if self.task.is_none() || self.running() {
            return;
        }
        let backoff = Duration::from_secs(1u64 << self.restarts.min(6));
        if self.started_at.is_some_and(|at| at.elapsed() < backoff) {
            return;
        }
        tracing::warn!(restarts = self.restarts, "BuildKit exited; restarting it");
        self.restarts += 1;
        if let Err(err) = self.start() {
            tracing::error!(error = %format!("{err:#}"), "could not restart BuildKit");
        }
    }

    /// Whether a client is connected to BuildKit (a build may be running).
    fn in_use(&self) -> bool {
        self.listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| volume::has_clients(a.port()))
    }

    /// Stops BuildKit and lets go of the volume.
    pub async fn stop(&mut self) {
        self.stop_buildkit().await;
        self.task = None;
        if let Some(volume) = self.volume.take() {
            volume.detach().await;
        }
    }

    /// Stops BuildKit: SIGTERM, then SIGKILL after 10 seconds.
    async fn stop_buildkit(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        tracing::info!("BuildKit stopped");
    }

    pub async fn report(&mut self) -> Report {
        let running = self.running();
        let up = running && self.task.is_some() && accepts_connections(&self.listen).await;
        let (free, total) = match &self.volume {
            Some(volume) => volume.space(),
            None => crate::cache::local::filesystem_space(&self.state_dir).unwrap_or((0, 0)),
        };
        Report {
            generation: self.generation,
            buildkit_up: up,
            disk_free_bytes: free,
            disk_total_bytes: total,
            applied_but_starting: self.task.is_some() && !up,
            waiting: self.desired.is_some(),
        }
    }
}

async fn accepts_connections(listen: &str) -> bool {
    let Ok(mut address) = listen.parse::<SocketAddr>() else {
        return false;
    };
    if address.ip().is_unspecified() {
        address.set_ip(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(address)
        )
        .await,
        Ok(Ok(_))
    )
}

/// buildkitd's configuration: mTLS listener, state root, and a GC policy that keeps the
/// project's cache size (recent layers for 14 days first, then everything to the size).
fn buildkitd_toml(
    root: &Path,
    listen: &str,
    tls: &Path,
    keep_bytes: u64,
    parallelism: u32,
) -> String {
    format!(
        r#"# Written by kiln agent; replaced on every assignment.
root = "{root}"

[grpc]
address = ["tcp://{listen}"]

[grpc.tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[worker.oci]
enabled = true
gc = true
max-parallelism = {parallelism}

[[worker.oci.gcpolicy]]
keepDuration = "336h"
keepBytes = {keep_bytes}
filters = ["type==source.local", "type==exec.cachemount", "type==source.git.checkout"]

[[worker.oci.gcpolicy]]
all = true
keepBytes = {keep_bytes}
"#,
        root = root.display(),
        cert = tls.join("tls.crt").display(),
        key = tls.join("tls.key").display(),
        ca = tls.join("tlsca.crt").display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkitd_config_carries_tls_root_and_gc() {
        let text = buildkitd_toml(
            Path::new("/var/lib/buildkit"),
            "0.0.0.0:443",
            Path::new("/etc/kiln/tls"),
            50 << 30,
            12,
        );
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["root"].as_str(), Some("/var/lib/buildkit"));
        assert_eq!(
            parsed["grpc"]["address"][0].as_str(),
            Some("tcp://0.0.0.0:443")
        );
        assert_eq!(
            parsed["grpc"]["tls"]["ca"].as_str(),
            Some("/etc/kiln/tls/tlsca.crt")
        );
        let policies = parsed["worker"]["oci"]["gcpolicy"].as_array().unwrap();
        assert_eq!(policies[1]["keepBytes"].as_integer(), Some(50 << 30));
        assert_eq!(
            parsed["worker"]["oci"]["max-parallelism"].as_integer(),
            Some(12)
        );
    }
}
