//! A throwaway PostgreSQL cluster for `kiln dev`, run from the system's binaries.
//!
//! PostgreSQL refuses to run as root, so when Kiln runs as root the cluster is owned by
//! and run as the `postgres` system user (via runuser). The server listens on
//! 127.0.0.1 only, with password authentication.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    run_as: Option<String>,
    pub port: u16,
}

/// Debian puts the server binaries in /usr/lib/postgresql/<version>/bin, off PATH.
pub fn find_bin_dir(configured: &Path) -> anyhow::Result<PathBuf> {
    if !configured.as_os_str().is_empty() {
        anyhow::ensure!(
            configured.join("initdb").is_file(),
            "dev.postgres_bin_dir {configured:?} has no initdb"
        );
        return Ok(configured.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them with:\n    \
             sudo apt-get install -y postgresql\nor set KILN_DEV__POSTGRES_BIN_DIR, or set KILN_DATABASE__URL to use an existing server"
        )
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl EmbeddedPostgres {
    /// Prepares (but does not start) the cluster in `dir`, creating it on first use.
    pub async fn init(
        bin_dir: PathBuf,
        dir: &Path,
        superuser: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let run_as = is_root().then(|| "postgres".to_string());
        let data_dir = dir.join("data");
        let log_file = dir.join("postgres.log");
        let pg = EmbeddedPostgres {
            bin_dir,
            data_dir,
            log_file,
            run_as,
            port: 0,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
        if let Some(user) = &pg.run_as {
            pg.chown_to(user, dir).await?;
            pg.ensure_reachable(user, dir).await?;
        }
        if pg.data_dir.join("PG_VERSION").is_file() {
            return Ok(pg);
        }
        tracing::info!(dir = %pg.data_dir.display(), "creating a PostgreSQL cluster for kiln dev");
        let pwfile = dir.join("initdb.pw");
        std::fs::write(&pwfile, password).context("writing the initdb password file")?;
        restrict_permissions(&pwfile)?;
        if let Some(user) = &pg.run_as {
            pg.chown_to(user, &pwfile).await?;
        }
        let result = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data_dir)
            .arg("-U")
            .arg(superuser)
            .arg("--pwfile")
            .arg(&pwfile)
            .arg("--auth=scram-sha-256")
            .arg("--encoding=UTF8")
            .arg("--no-instructions")
            .output()
            .await;
        let _ = std::fs::remove_file(&pwfile);
        let output = result.context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        // Loopback TCP only; no Unix socket, whose directory may not exist here.
        let conf = "\n# kiln dev\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 200\n";
        let conf_path = pg.data_dir.join("postgresql.conf");
        let mut existing =
            std::fs::read_to_string(&conf_path).context("reading postgresql.conf")?;
        existing.push_str(conf);
        std::fs::write(&conf_path, existing).context("writing postgresql.conf")?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        };
        // Its own process group: a Ctrl-C meant for kiln must not stop Postgres before
        // kiln has drained its requests.
        cmd.process_group(0).stdin(Stdio::null());
        cmd
    }

    async fn chown_to(&self, user: &str, path: &Path) -> anyhow::Result<()> {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(path)
            .status()
            .await
            .context("running chown")?;
        anyhow::ensure!(status.success(), "chown {user} {path:?} failed");
        Ok(())
    }

    async fn ensure_reachable(&self, user: &str, dir: &Path) -> anyhow::Result<()> {
        let status = Command::new("runuser")
            .args(["-u", user, "--", "test", "-w"])
            .arg(dir)
            .status()
            .await
            .context("running runuser (util-linux)")?;
        anyhow::ensure!(
            status.success(),
            "the `{user}` user cannot reach {dir:?}, so PostgreSQL cannot run there; \
             set KILN_DEV__DATA_DIR to a directory under /var/tmp"
        );
        Ok(())
    }

    pub async fn is_running(&self) -> bool {
        matches!(
            self.command("pg_ctl").arg("status").arg("-D").arg(&self.data_dir).stdout(Stdio::null()).stderr(Stdio::null()).status().await,
            Ok(s) if s.success()
        )
    }

    /// Starts the server on a free loopback port and waits until it accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.is_running().await {
            // Left over from a kiln that was killed: restart it cleanly on a known port.
            tracing::warn!("a PostgreSQL from an earlier kiln dev is still running; restarting it");
            self.stop().await?;
        }
        self.port = free_port()?;
        self.start_on_port().await
    }

    /// The postmaster's pid, from its lock file, if that process is alive.
    fn postmaster_alive(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; no signal is sent.
        pid > 0 && unsafe { libc::kill(pid, 0) } == 0
    }

    /// Watches the server until `cancel` fires; when it dies, starts it again on the same
    /// port (the database URL Kiln uses stays valid), with backoff, and says so.
    pub async fn supervise(&self, cancel: tokio_util::sync::CancellationToken) {
        let mut backoff = std::time::Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
            if self.postmaster_alive() {
                continue;
            }
            tracing::warn!(
                port = self.port,
                "the dev PostgreSQL stopped unexpectedly; restarting it"
            );
            let mut attempt = 1;
            loop {
                match self.start_on_port().await {
                    Ok(()) => {
                        tracing::info!(port = self.port, attempt, "the dev PostgreSQL is back");
                        backoff = std::time::Duration::from_millis(500);
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(
                            attempt,
                            retry_in = ?backoff,
                            error = %format!("{err:#}"),
                            "could not restart the dev PostgreSQL yet"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = cancel.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                        attempt += 1;
                    }
                }
            }
        }
    }

    /// Starts the server on the port it had (or was given) and waits until it accepts
    /// connections.
    pub async fn start_on_port(&self) -> anyhow::Result<()> {
        let output = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .arg("-w")
            .arg("-t")
            .arg("60")
            .output()
            .await
            .context("running pg_ctl start")?;
        if !output.status.success() {
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            bail!(
                "PostgreSQL did not start: {}\n{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tracing::info!(port = self.port, "PostgreSQL started");
        Ok(())
    }

    /// Fast shutdown: disconnects clients and writes a checkpoint, so the next start is clean.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let output = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .output()
            .await
            .context("running pg_ctl stop")?;
        anyhow::ensure!(
            output.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        tracing::info!("PostgreSQL stopped");
        Ok(())
    }
}

pub fn restrict_permissions(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting permissions of {path:?}"))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
