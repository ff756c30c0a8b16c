//! Runs and watches BuildKit for the agent: writes the TLS files and buildkitd.toml of
//! the current task, starts the configured command, restarts it if it dies, and says
//! whether it serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use super::write_private;
use crate::proto::kiln::agent::v1 as pb;

/// What decides whether BuildKit must restart: not the certificates, which Kiln
/// re-issues with every directive.
#[derive(Debug, Clone, PartialEq)]
struct TaskKey {
    project_id: String,
    platform: String,
    server_name: String,
    cache: Option<pb::CacheVolume>,
    gc_keep_bytes: u64,
    max_parallelism: u32,
}

pub struct Supervisor {
    state_dir: PathBuf,
    listen: String,
    command: Vec<String>,
    generation: u64,
    task: Option<TaskKey>,
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
}

impl Supervisor {
    pub fn new(state_dir: PathBuf, listen: String, command: Vec<String>) -> Self {
        Supervisor {
            state_dir,
            listen,
            command,
            generation: 0,
            task: None,
            child: None,
            started_at: None,
            restarts: 0,
        }
    }

    fn root(&self) -> PathBuf {
        self.state_dir.join("buildkit")
    }

    /// Serves `task`, restarting BuildKit only if what it serves changed.
    pub async fn serve(&mut self, generation: u64, task: pb::BuildKitTask) -> anyhow::Result<()> {
        let key = TaskKey {
            project_id: task.project_id.clone(),
            platform: task.platform.clone(),
            server_name: task.server_name.clone(),
            cache: task.cache.clone(),
            gc_keep_bytes: task.gc_keep_bytes,
            max_parallelism: task.max_parallelism,
        };
        if self.task.as_ref() == Some(&key) && self.running() {
            self.generation = generation;
            return Ok(());
        }
        self.stop().await;
        self.write_task(&task)?;
        self.task = Some(key);
        self.restarts = 0;
        self.start()?;
        self.generation = generation;
        Ok(())
    }

    pub async fn standby(&mut self, generation: u64) {
        self.stop().await;
        self.task = None;
        self.generation = generation;
    }

    fn write_task(&self, task: &pb::BuildKitTask) -> anyhow::Result<()> {
        let tls = self.state_dir.join("tls");
        std::fs::create_dir_all(&tls).with_context(|| format!("creating {tls:?}"))?;
        // The cache issue attaches a volume here; until then BuildKit's state is local.
        let root = match task.cache.as_ref() {
            Some(cache) if !cache.mount_path.is_empty() => PathBuf::from(&cache.mount_path),
            _ => self.root(),
        };
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

    fn start(&mut self) -> anyhow::Result<()> {
        let tls = self.state_dir.join("tls");
        let path = |p: PathBuf| p.display().to_string();
        let args: Vec<String> = self
            .command
            .iter()
            .map(|a| {
                a.replace("{config}", &path(self.state_dir.join("buildkitd.toml")))
                    .replace("{listen}", &self.listen)
                    .replace("{cert}", &path(tls.join("tls.crt")))
                    .replace("{key}", &path(tls.join("tls.key")))
                    .replace("{ca}", &path(tls.join("tlsca.crt")))
                    .replace("{root}", &path(self.root()))
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

    /// Restarts BuildKit if it died while a task is applied, backing off on crash loops.
    pub async fn keep_alive(&mut self) {
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

    /// Stops BuildKit: SIGTERM, then SIGKILL after 10 seconds.
    pub async fn stop(&mut self) {
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
        let (free, total) = disk_space(&self.state_dir);
        Report {
            generation: self.generation,
            buildkit_up: up,
            disk_free_bytes: free,
            disk_total_bytes: total,
            applied_but_starting: self.task.is_some() && !up,
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

fn disk_space(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return (0, 0);
    }
    let block = stat.f_frsize as u64;
    (stat.f_bavail as u64 * block, stat.f_blocks as u64 * block)
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
