//! Attaches the layer-cache volume BuildKit keeps its state on, and lets it go again.
//!
//! RBD images are mapped with krbd (`rbd device map`) where the kernel has it, else
//! exposed by rbd-fuse and attached to a loop device; either way the block device gets
//! an ext4 filesystem on first use and is mounted under the agent's state directory.
//! Directory volumes (the local provider) are used as they are. Before the device is
//! attached, the agent holds the volume's lease (a RADOS object lock whose cookie is the
//! machine id, or an `flock`), so a second builder gets a clear error instead of a
//! corrupt filesystem.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::write_private;
use crate::proto::kiln::agent::v1 as pb;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long rbd-fuse may take to show the image.
const FUSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether a directive's cache is a volume the agent attaches.
pub fn is_volume(cache: Option<&pb::CacheVolume>) -> bool {
    cache.is_some_and(|c| matches!(c.kind.as_str(), "directory" | "rbd"))
}

enum Lock {
    File(std::fs::File),
    Rbd {
        rbd: kiln_ceph::Rbd,
        image: String,
        cookie: String,
    },
}

enum Device {
    Krbd(String),
    Loop(String),
}

impl Device {
    fn path(&self) -> &str {
        match self {
            Device::Krbd(p) | Device::Loop(p) => p,
        }
    }
}

pub struct AttachedVolume {
    pub volume_id: String,
    /// BuildKit's root on the volume.
    pub root: PathBuf,
    pub size_bytes: u64,
    /// The filesystem must grow, which this kernel only allows unmounted.
    pub grow_pending: bool,
    mount: Option<PathBuf>,
    device: Option<Device>,
    fuse: Option<(Child, PathBuf)>,
    lock: Option<Lock>,
}

/// Runs a command to completion; its stderr becomes the error.
async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run_env(program, args, &[]).await
}

async fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .with_context(|| format!("{program} did not finish in {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn option<'a>(spec: &'a pb::CacheVolume, key: &str) -> anyhow::Result<&'a str> {
    spec.options
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .with_context(|| format!("the cache volume's directive lacks {key:?}"))
}

/// pool/namespace/image, each a plain name.
fn image_spec(source: &str) -> anyhow::Result<(String, String, String)> {
    let parts: Vec<&str> = source.split('/').collect();
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match parts.as_slice() {
        [pool, ns, image] if plain(pool) && plain(ns) && plain(image) => {
            Ok((pool.to_string(), ns.to_string(), image.to_string()))
        }
        _ => bail!("{source:?} is not an RBD image spec pool/namespace/image"),
    }
}

impl AttachedVolume {
    /// Locks and attaches the volume `spec` names for machine `machine_id`.
    pub async fn attach(
        spec: &pb::CacheVolume,
        machine_id: &str,
        state_dir: &Path,
    ) -> anyhow::Result<AttachedVolume> {
        match spec.kind.as_str() {
            "directory" => Self::attach_directory(spec),
            "rbd" => Self::attach_rbd(spec, machine_id, state_dir).await,
            other => bail!("unknown cache volume kind {other:?}"),
        }
    }

    fn attach_directory(spec: &pb::CacheVolume) -> anyhow::Result<AttachedVolume> {
        let dir = PathBuf::from(&spec.source);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let lock = match spec.options.get("lock_file").filter(|p| !p.is_empty()) {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
                    .with_context(|| format!("opening the volume's lock file {path}"))?;
                match file.try_lock() {
                    Ok(()) => Some(Lock::File(file)),
                    Err(std::fs::TryLockError::WouldBlock) => bail!(
                        "cache volume {} is in use by another builder; waiting for it to let go",
                        spec.volume_id
                    ),
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(e).context("locking the cache volume");
                    }
                }
            }
            None => None,
        };
        let root = dir.join("buildkit");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {root:?}"))?;
        Ok(AttachedVolume {
            volume_id: spec.volume_id.clone(),
            root,
            size_bytes: spec.size_bytes,
            grow_pending: false,
            mount: None,
            device: None,
            fuse: None,
            lock,
        })
    }

    async fn attach_rbd(
        spec: &pb::CacheVolume,
        machine_id: &str,
        state_dir: &Path,
    ) -> anyhow::Result<AttachedVolume> {
        let mut steps = Steps::new();
        let (pool, namespace, image) = image_spec(&spec.source)?;
        let client = option(spec, "client")?;
        let dir = state_dir.join("ceph");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
        let conf = dir.join("ceph.conf");
        let keyring = dir.join("keyring");
        let (conf_text, keyring_text) = kiln_ceph::client_files(
            &[option(spec, "monitors")?.to_string()],
            &format!("client.{client}"),
            option(spec, "key")?,
            &keyring,
        );
        write_private(&conf, &conf_text)?;
        write_private(&keyring, &keyring_text)?;

        let mut volume = AttachedVolume {
            volume_id: spec.volume_id.clone(),
            root: PathBuf::new(),
            size_bytes: spec.size_bytes,
            grow_pending: false,
            mount: None,
            device: None,
            fuse: None,
            lock: None,
        };
        let krbd = Path::new("/sys/bus/rbd").exists();
        // rbd-fuse connects to the cluster on its own, which takes as long as taking the
        // lease: start it first. It only opens the image; nothing reads or writes through
        // it until the lease is held.
        if !krbd
            && let Err(err) = volume
                .start_fuse(&conf, client, &pool, &namespace, &image, state_dir)
                .await
        {
            volume.detach().await;
            return Err(err);
        }
        let leased = async {
            let ceph = kiln_ceph::Ceph::connect(&conf, client)
                .await
                .context("connecting to the Ceph cluster with the machine's key")?;
            let rbd = ceph.rbd(&pool, &namespace);
            lock_image(&rbd, &image, machine_id, &spec.volume_id).await?;
            anyhow::Ok(rbd)
        }
        .await;
        steps.step("lease");
        match leased {
            Ok(rbd) => {
                volume.lock = Some(Lock::Rbd {
                    rbd,
                    image: image.clone(),
                    cookie: machine_id.to_string(),
                })
            }
            Err(err) => {
                volume.detach().await;
                return Err(err);
            }
        }
        // Whatever fails from here on, `volume` lets go of what it took.
        match volume
            .map_and_mount(
                &conf, client, &pool, &namespace, &image, state_dir, &mut steps,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(volume_id = %volume.volume_id, took_ms = steps.total_ms(),
                    steps = %steps, "attached the cache volume");
                Ok(volume)
            }
            Err(err) => {
                volume.detach().await;
                Err(err)
            }
        }
    }

    /// Starts rbd-fuse exposing `image` as a file under `<state>/ceph/fuse`.
    async fn start_fuse(
        &mut self,
        conf: &Path,
        client: &str,
        pool: &str,
        namespace: &str,
        image: &str,
        state_dir: &Path,
    ) -> anyhow::Result<()> {
        let fuse_dir = state_dir.join("ceph").join("fuse");
        release_mount(&fuse_dir).await;
        std::fs::create_dir_all(&fuse_dir).with_context(|| format!("creating {fuse_dir:?}"))?;
        let mut command = Command::new("rbd-fuse");
        command
            .arg("-c")
            .arg(conf)
            .args(["-p", pool, "-s", namespace, "-r", image])
            .arg(&fuse_dir)
            .arg("-f")
            .env("CEPH_ARGS", format!("--id {client}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; rbd-fuse must not outlive the agent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().context("starting rbd-fuse")?;
        self.fuse = Some((child, fuse_dir));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn map_and_mount(
        &mut self,
        conf: &Path,
        client: &str,
        pool: &str,
        namespace: &str,
        image: &str,
        state_dir: &Path,
        steps: &mut Steps,
    ) -> anyhow::Result<()> {
        let conf_arg = conf.display().to_string();
        let spec = format!("{pool}/{namespace}/{image}");
        if let Some((_, fuse_dir)) = &self.fuse {
            let file = fuse_dir.join(image);
            let deadline = tokio::time::Instant::now() + FUSE_TIMEOUT;
            while !file.is_file() {
                if tokio::time::Instant::now() > deadline {
                    bail!("rbd-fuse did not show {spec} within {FUSE_TIMEOUT:?}");
                }
                if let Some((child, _)) = self.fuse.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    bail!("rbd-fuse exited ({status}) before showing {spec}");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            steps.step("rbd-fuse");
            let file = file.display().to_string();
            let device = run("losetup", &["-f", "--show", &file])
                .await
                .context("attaching the cache volume to a loop device")?;
            self.device = Some(Device::Loop(device));
            steps.step("losetup");
        } else {
            let device = run(
                "rbd",
                &["device", "map", "-c", &conf_arg, "--id", client, &spec],
            )
            .await
            .context("mapping the cache volume with krbd")?;
            self.device = Some(Device::Krbd(device));
            steps.step("rbd map");
        }
        let device = self
            .device
            .as_ref()
            .map(Device::path)
            .unwrap_or_default()
            .to_string();
        match probe(&device).await? {
            Filesystem::Empty => {
                run(
                    "mkfs.ext4",
                    &[
                        "-q",
                        "-E",
                        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                        &device,
                    ],
                )
                .await
                .context("formatting the new cache volume")?;
                tracing::info!(volume_id = %self.volume_id, "formatted a new cache volume");
                steps.step("mkfs");
            }
            Filesystem::Ext4 {
                bytes,
                device_bytes,
            } => {
                steps.step("probe");
                // Leave slack for rounding: mkfs and resize2fs use whole block groups.
                if bytes + (1 << 20) < device_bytes {
                    grow_unmounted(&device).await?;
                    steps.step("resize2fs");
                }
            }
            Filesystem::Other(kind) => {
                bail!("the cache volume holds a {kind} filesystem, not ext4; reset the cache")
            }
        }
        let mount = state_dir.join("volume");
        release_mount(&mount).await;
        std::fs::create_dir_all(&mount).with_context(|| format!("creating {mount:?}"))?;
        let mount_arg = mount.display().to_string();
        let options = match self.device {
            Some(Device::Krbd(_)) => "noatime,discard",
            _ => "noatime",
        };
        run("mount", &["-o", options, &device, &mount_arg])
            .await
            .context("mounting the cache volume")?;
        self.mount = Some(mount.clone());
        self.root = mount.join("buildkit");
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {:?}", self.root))?;
        steps.step("mount");
        Ok(())
    }

    /// The image grew to `size`: grows the filesystem now if the kernel allows it online;
    /// otherwise `grow_pending` asks the supervisor for a moment without BuildKit.
    pub async fn grow(&mut self, size: u64) -> anyhow::Result<()> {
        self.size_bytes = size;
        let Some(device) = self.device.as_ref().map(|d| d.path().to_string()) else {
            return Ok(()); // a directory has no filesystem of its own
        };
        if matches!(self.device, Some(Device::Loop(_))) {
            run("losetup", &["-c", &device]).await?;
        }
        match run("resize2fs", &[&device]).await {
            Ok(_) => {
                self.grow_pending = false;
                tracing::info!(volume_id = %self.volume_id, "grew the cache filesystem online");
            }
            Err(err) => {
                tracing::info!(volume_id = %self.volume_id, error = %format!("{err:#}"), "cannot grow the cache filesystem online; will while BuildKit is idle");
                self.grow_pending = true;
            }
        }
        Ok(())
    }

    /// Grows the filesystem unmounted (BuildKit must be stopped), then mounts it again.
    pub async fn grow_offline(&mut self) -> anyhow::Result<()> {
        let (Some(device), Some(mount)) = (
            self.device.as_ref().map(|d| d.path().to_string()),
            self.mount.clone(),
        ) else {
            self.grow_pending = false;
            return Ok(());
        };
        let mount_arg = mount.display().to_string();
        run("umount", &[&mount_arg]).await?;
        let grown = grow_unmounted(&device).await;
        run("mount", &["-o", "noatime", &device, &mount_arg])
            .await
            .context("mounting the cache volume again")?;
        grown?;
        self.grow_pending = false;
        tracing::info!(volume_id = %self.volume_id, "grew the cache filesystem");
        Ok(())
    }

    /// Free and total bytes of the volume's filesystem.
    pub fn space(&self) -> (u64, u64) {
        crate::cache::local::filesystem_space(&self.root).unwrap_or((0, 0))
    }

    /// Unmounts, detaches and unlocks. Best effort: each step runs even if one before
    /// failed, and failures are logged.
    pub async fn detach(mut self) {
        if let Some(mount) = self.mount.take() {
            release_mount(&mount).await;
        }
        match self.device.take() {
            Some(Device::Krbd(device)) => {
                if let Err(err) = run("rbd", &["device", "unmap", &device]).await {
                    tracing::warn!(error = %format!("{err:#}"), "could not unmap the cache volume");
                }
            }
            Some(Device::Loop(device)) => {
                if let Err(err) = run("losetup", &["-d", &device]).await {
                    tracing::warn!(error = %format!("{err:#}"), "could not detach the loop device");
                }
            }
            None => {}
        }
        if let Some((mut child, dir)) = self.fuse.take() {
            // Unmounted, rbd-fuse closes the image and exits, releasing the image's
            // exclusive lock at once (killed, it would hold it until its watch expires).
            release_mount(&dir).await;
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        match self.lock.take() {
            Some(Lock::Rbd { rbd, image, cookie }) => {
                if let Err(err) = rbd.unlock(&image, &cookie).await
                    && !err.is_not_found()
                {
                    tracing::warn!(error = %err, "could not unlock the cache volume");
                }
            }
            Some(Lock::File(file)) => drop(file),
            None => {}
        }
        tracing::info!(volume_id = %self.volume_id, "cache volume detached");
    }
}

/// Takes the image's exclusive lock for this machine. A lock this machine holds from an
/// earlier agent process is taken over; one another builder holds is an error the
/// supervisor retries (that builder is draining, or Kiln fences it).
async fn lock_image(
    rbd: &kiln_ceph::Rbd,
    image: &str,
    cookie: &str,
    volume_id: &str,
) -> anyhow::Result<()> {
    for _ in 0..2 {
        match rbd.lock_exclusive(image, cookie).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_exists() => return Ok(()),
            Err(e) if e.is_busy() => {
                let lockers = rbd
                    .lockers(image)
                    .await
                    .context("listing the volume's lock")?;
                let mine: Vec<_> = lockers.iter().filter(|l| l.cookie == cookie).collect();
                if mine.is_empty() || mine.len() != lockers.len() {
                    let holders: Vec<&str> = lockers.iter().map(|l| l.cookie.as_str()).collect();
                    bail!(
                        "cache volume {volume_id} is locked by builder {}; waiting for it to let go",
                        holders.join(", ")
                    );
                }
                for locker in mine {
                    rbd.break_lock(image, locker)
                        .await
                        .context("taking over this machine's earlier lock")?;
                }
            }
            Err(e) => return Err(e).context("locking the cache volume"),
        }
    }
    bail!("could not lock cache volume {volume_id}")
}

/// Unmounts `path` if something is mounted there (lazily if it is busy).
async fn release_mount(path: &Path) {
    let arg = path.display().to_string();
    if !mounts().iter().any(|(_, target)| *target == arg) {
        return;
    }
    if run("umount", &[&arg]).await.is_err()
        && let Err(err) = run("umount", &["-l", &arg]).await
    {
        tracing::warn!(path = %arg, error = %format!("{err:#}"), "could not unmount");
    }
}

/// The (source, mount point) of every filesystem this process sees mounted, read from
/// /proc (a spawned `mountpoint` costs a few milliseconds of every attach).
pub fn mounts() -> Vec<(String, String)> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next()?.to_string();
            let target = fields.next()?.replace("\\040", " ");
            Some((source, target))
        })
        .collect()
}

/// What a cache volume's block device holds.
enum Filesystem {
    /// Nothing yet: a new image reads as zeros.
    Empty,
    Ext4 {
        bytes: u64,
        device_bytes: u64,
    },
    Other(String),
}

/// Reads the device's ext4 superblock directly (a spawned blkid and dumpe2fs would cost
/// more than the rest of a warm attach). Anything that is neither ext4 nor all zeros at
/// the start is named by blkid.
async fn probe(device: &str) -> anyhow::Result<Filesystem> {
    let path = device.to_string();
    let (head, device_bytes) = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let device_bytes = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        let mut head = vec![0u8; 64 << 10];
        let read = file.read(&mut head)?;
        head.truncate(read);
        std::io::Result::Ok((head, device_bytes))
    })
    .await?
    .with_context(|| format!("reading the start of {device}"))?;
    if let Some(bytes) = ext4_bytes(&head) {
        return Ok(Filesystem::Ext4 {
            bytes,
            device_bytes,
        });
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(Filesystem::Empty);
    }
    let kind = run("blkid", &["-o", "value", "-s", "TYPE", device])
        .await
        .unwrap_or_default();
    Ok(if kind.is_empty() {
        // Nothing blkid knows (an interrupted mkfs): safe to format.
        Filesystem::Empty
    } else {
        Filesystem::Other(kind)
    })
}

/// The size of the ext2/3/4 filesystem whose superblock starts at byte 1024 of `head`.
fn ext4_bytes(head: &[u8]) -> Option<u64> {
    let sb = head.get(1024..2048)?;
    let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap());
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return None;
    }
    let log_block_size = u32_at(24);
    if log_block_size > 6 {
        return None;
    }
    let block_size = 1024u64 << log_block_size;
    const INCOMPAT_64BIT: u32 = 0x80;
    let high = if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        u64::from(u32_at(0x150))
    } else {
        0
    };
    let blocks = (high << 32) | u64::from(u32_at(4));
    Some(blocks * block_size)
}

/// Durations of the steps of an attach, for its log line.
struct Steps {
    started: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        let now = Instant::now();
        Steps {
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    fn total_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={}ms", took.as_millis())?;
        }
        Ok(())
    }
}

async fn grow_unmounted(device: &str) -> anyhow::Result<()> {
    // e2fsck exits 1 when it fixed something, which is fine before a resize.
    let check = Command::new("e2fsck")
        .args(["-f", "-p", device])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running e2fsck")?;
    if check.status.code().is_none_or(|c| c > 1) {
        bail!(
            "e2fsck found problems on the cache volume: {}",
            String::from_utf8_lossy(&check.stdout).trim()
        );
    }
    run("resize2fs", &[device])
        .await
        .context("growing the cache filesystem")?;
    Ok(())
}

/// Whether any client holds a TCP connection to a local `port` (BuildKit is in use).
pub fn has_clients(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields
                    .get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                // State 01 is ESTABLISHED.
                local_port == Some(port) && fields.get(3) == Some(&"01")
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs_are_plain_names() {
        assert_eq!(
            image_spec("kiln-cache/proj-a/cache-amd64-g0-x").unwrap(),
            (
                "kiln-cache".to_string(),
                "proj-a".to_string(),
                "cache-amd64-g0-x".to_string()
            )
        );
        for bad in ["a/b", "a/b/c/d", "a/../b", "a//b", "a/b/-c", "a/b/c d"] {
            assert!(image_spec(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn probe_reads_an_ext4_superblock_and_sees_zeros_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(64 << 20).unwrap();
        let path = image.display().to_string();
        assert!(matches!(probe(&path).await.unwrap(), Filesystem::Empty));

        run("mkfs.ext4", &["-q", "-F", &path]).await.unwrap();
        let Filesystem::Ext4 {
            bytes,
            device_bytes,
        } = probe(&path).await.unwrap()
        else {
            panic!("ext4 not found");
        };
        assert_eq!((bytes, device_bytes), (64 << 20, 64 << 20));

        // Grown underneath: the filesystem is smaller than its device until resize2fs.
        file.set_len(96 << 20).unwrap();
        let Filesystem::Ext4 {
            bytes,
            device_bytes,
        } = probe(&path).await.unwrap()
        else {
            panic!("ext4 not found");
        };
        assert_eq!((bytes, device_bytes), (64 << 20, 96 << 20));

        // Something else is never formatted over.
        run("mkswap", &[&path]).await.unwrap();
        match probe(&path).await.unwrap() {
            Filesystem::Other(kind) => assert_eq!(kind, "swap"),
            _ => panic!("a swap area taken for ext4 or empty"),
        }
        assert_eq!(ext4_bytes(&[0u8; 4096]), None);
        assert_eq!(ext4_bytes(&[0u8; 100]), None);
    }
}
