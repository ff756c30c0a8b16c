//! The `local` provider: each builder is a process on 127.0.0.1 serving BuildKit's API
//! over mTLS (a real buildkitd, or the test stand-in). For `kiln dev` and the tests.
//! With `builders.local.agent` (the default) the process is `kiln agent`, which
//! registers with this server and supervises the BuildKit command, as on EC2.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use futures_util::future::BoxFuture;
use tokio::process::{Child, Command};

use super::provider::{ComputeProvider, LaunchSpec, Launched};
use crate::config::LocalBuildersConfig;
use crate::error::{Error, Result};

pub struct LocalProvider {
    command: Vec<String>,
    state_dir: PathBuf,
    /// `Some(kiln binary)` when builders run under `kiln agent`.
    agent_binary: Option<PathBuf>,
    children: Mutex<HashMap<String, (Child, Launched)>>,
}

impl LocalProvider {
    pub fn new(config: &LocalBuildersConfig) -> Self {
        let command = if config.command.is_empty() {
            // The stand-in is built next to kiln; fall back to PATH.
            let standin = std::env::current_exe()
                .map(|exe| exe.with_file_name("buildkitd-standin"))
                .ok()
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("buildkitd-standin"));
            vec![
                standin.display().to_string(),
                "--listen".into(),
                "{listen}".into(),
                "--cert".into(),
                "{cert}".into(),
                "--key".into(),
                "{key}".into(),
                "--ca".into(),
                "{ca}".into(),
            ]
        } else {
            config.command.clone()
        };
        let state_dir = if config.state_dir.as_os_str().is_empty() {
            std::env::temp_dir().join(format!("kiln-builders-{}", std::process::id()))
        } else {
            config.state_dir.clone()
        };
        let agent_binary = config.agent.then(|| {
            if config.kiln_binary.as_os_str().is_empty() {
                std::env::current_exe().unwrap_or_else(|_| PathBuf::from("kiln"))
            } else {
                config.kiln_binary.clone()
            }
        });
        LocalProvider {
            command,
            state_dir,
            agent_binary,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn write_private(path: &std::path::Path, contents: &str) -> Result<()> {
        crate::agent::write_private(path, contents).map_err(Error::internal)
    }

    async fn start(&self, spec: LaunchSpec) -> Result<Launched> {
        if let Some(existing) = self
            .children
            .lock()
            .ok()
            .and_then(|c| c.get(&spec.machine_id).map(|(_, l)| l.clone()))
        {
            return Ok(existing);
        }
        let dir = self.state_dir.join(&spec.machine_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(anyhow::anyhow!("creating {dir:?}: {e}")))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::internal(anyhow::anyhow!("finding a port: {e}")))?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut command = match (&self.agent_binary, &spec.agent) {
            (Some(kiln), Some(bootstrap)) => {
                let mut command = Command::new(kiln);
                command
                    .arg("agent")
                    .arg("--api-url")
                    .arg(&bootstrap.api_url)
                    .arg("--machine-id")
                    .arg(&spec.machine_id)
                    .arg("--state-dir")
                    .arg(&dir)
                    .arg("--buildkit-listen")
                    .arg(&listen);
                if let Some(pem) = &bootstrap.api_ca_pem {
                    let path = dir.join("api-ca.pem");
                    Self::write_private(&path, pem)?;
                    command.arg("--api-ca-file").arg(path);
                }
                command.arg("--").args(&self.command).env(
                    "KILN_AGENT_REGISTRATION_TOKEN",
                    &bootstrap.registration_token,
                );
                // The agent gets nothing of this server's configuration (database URL,
                // key-encryption key): on EC2 it would not have it either.
                for (name, _) in std::env::vars_os() {
                    if name.to_string_lossy().starts_with("KILN_")
                        && name != "KILN_AGENT_REGISTRATION_TOKEN"
                    {
                        command.env_remove(&name);
                    }
                }
                command
            }
            _ => self.direct_command(&spec, &dir, &listen)?,
        };
        let log = std::fs::File::create(dir.join("builder.log"))
            .map_err(|e| Error::internal(anyhow::anyhow!("creating builder log: {e}")))?;
        // SAFETY: prctl is async-signal-safe; local builders must not outlive this kiln
        // (a killed test server, say), since nothing else would ever stop them.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| Error::internal(anyhow::anyhow!("{e}")))?,
            )
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::internal(anyhow::anyhow!("starting builder: {e}")))?;
        let launched = Launched {
            provider_ref: format!("{}{}", self.ref_prefix(), child.id().unwrap_or_default()),
            endpoint: format!("tcp://{listen}"),
        };
        if let Ok(mut children) = self.children.lock() {
            children.insert(spec.machine_id.clone(), (child, launched.clone()));
        }
        tracing::info!(machine_id = %spec.machine_id, endpoint = %launched.endpoint, agent = spec.agent.is_some(), "local builder started");
        Ok(launched)
    }

    /// BuildKit started directly, with the certificates written here.
    fn direct_command(
        &self,
        spec: &LaunchSpec,
        dir: &std::path::Path,
        listen: &str,
    ) -> Result<Command> {
        let (cert, key, ca) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        Self::write_private(&cert, &spec.server_cert.cert_pem)?;
        Self::write_private(&key, &spec.server_cert.key_pem)?;
        Self::write_private(&ca, &spec.ca_pem)?;
        let args: Vec<String> = self
            .command
            .iter()
            .map(|a| {
                a.replace("{listen}", listen)
                    .replace("{cert}", &cert.display().to_string())
                    .replace("{key}", &key.display().to_string())
                    .replace("{ca}", &ca.display().to_string())
            })
            .collect();
        let Some((program, rest)) = args.split_first() else {
            return Err(Error::FailedPrecondition(
                "builders.local.command is empty".into(),
            ));
        };
        let mut command = Command::new(program);
        command.args(rest);
        Ok(command)
    }
}

impl LocalProvider {
    /// `local:<kiln pid>:` — builders belong to the kiln process that started them.
    fn ref_prefix(&self) -> String {
        format!("local:{}:", std::process::id())
    }

    /// Whether the kiln process that started a builder still runs.
    pub fn owner_alive(provider_ref: &str) -> bool {
        provider_ref
            .strip_prefix("local:")
            .and_then(|rest| rest.split(':').next())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    }
}

impl ComputeProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn uses_agent(&self) -> bool {
        self.agent_binary.is_some()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<super::provider::Instance>>> {
        Box::pin(async move {
            let Ok(mut children) = self.children.lock() else {
                return Ok(Vec::new());
            };
            Ok(children
                .iter_mut()
                .map(|(id, (child, _))| super::provider::Instance {
                    machine_id: id.clone(),
                    running: matches!(child.try_wait(), Ok(None)),
                })
                .collect())
        })
    }

    fn owns(&self, provider_ref: &str) -> bool {
        provider_ref.starts_with(&self.ref_prefix())
    }

    /// Ready when the process accepts TCP connections on its endpoint.
    fn wait_ready<'a>(
        &'a self,
        machine_id: &'a str,
        launched: &'a Launched,
        deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let address = launched.endpoint.trim_start_matches("tcp://");
            loop {
                if tokio::net::TcpStream::connect(address).await.is_ok() {
                    return Ok(());
                }
                let alive = self.is_alive(machine_id).await.unwrap_or(false);
                if !alive || tokio::time::Instant::now() >= deadline {
                    return Err(Error::Unavailable(format!(
                        "builder {machine_id} did not accept connections at {address}{}",
                        if alive {
                            ""
                        } else {
                            " (its process exited; see builder.log)"
                        }
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Launched>> {
        Box::pin(self.start(spec))
    }

    fn is_alive(&self, machine_id: &str) -> BoxFuture<'_, Result<bool>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let Ok(mut children) = self.children.lock() else {
                return Ok(false);
            };
            Ok(match children.get_mut(&machine_id) {
                Some((child, _)) => matches!(child.try_wait(), Ok(None)),
                None => false,
            })
        })
    }

    fn terminate(&self, machine_id: &str) -> BoxFuture<'_, Result<()>> {
        let machine_id = machine_id.to_string();
        Box::pin(async move {
            let child = self
                .children
                .lock()
                .ok()
                .and_then(|mut c| c.remove(&machine_id));
            if let Some((mut child, _)) = child {
                // SIGTERM first: an agent stops its BuildKit and reports its shutdown.
                if let Some(pid) = child.id() {
                    // SAFETY: signalling our own child by pid.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                }
                // It also detaches its cache volume, which takes BuildKit's exit first.
                if tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
            let dir = self.state_dir.join(&machine_id);
            // A killed agent may leave its volume mounted there: unmount it rather than
            // delete the cache through it.
            release_mounts_under(&dir).await;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
    }
}

/// Unmounts (lazily) every filesystem mounted under `dir`, deepest first, and detaches
/// the loop devices behind them.
async fn release_mounts_under(dir: &std::path::Path) {
    let prefix = dir.display().to_string();
    let mut found: Vec<(String, String)> = crate::agent::volume::mounts()
        .into_iter()
        .filter(|(_, target)| *target == prefix || target.starts_with(&format!("{prefix}/")))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.1.len()));
    for (source, target) in found {
        let _ = Command::new("umount").arg("-l").arg(&target).status().await;
        if source.starts_with("/dev/loop") {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&source)
                .status()
                .await;
        }
    }
}
