//! kiln-ceph against a real single-node Ceph cluster (started by scripts/test.sh, which
//! sets TEST_CEPH_CONF and TEST_CEPH_POOL). The `rbd` CLI is the independent witness.

use std::path::PathBuf;
use std::process::Command;

use kiln_ceph::{Ceph, Rbd};

fn conf() -> PathBuf {
    PathBuf::from(std::env::var("TEST_CEPH_CONF").expect(
        "TEST_CEPH_CONF is not set: run the tests through `bash scripts/test.sh`, which starts Ceph",
    ))
}

fn pool() -> String {
    std::env::var("TEST_CEPH_POOL").unwrap_or_else(|_| "kiln-cache".into())
}

/// A namespace of its own for each test.
fn namespace(label: &str) -> String {
    let n: u64 = rand_u64();
    format!("t-{label}-{n:x}")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

async fn admin() -> Ceph {
    Ceph::connect(&conf(), "admin")
        .await
        .expect("connect as client.admin")
}

/// `rbd <args> --format json`, as the CLI sees it.
fn rbd_cli(args: &[&str]) -> serde_json::Value {
    let out = Command::new("rbd")
        .args(args)
        .args(["--format", "json"])
        .env("CEPH_CONF", conf())
        .output()
        .expect("run rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

async fn fresh(ceph: &Ceph, label: &str) -> Rbd {
    let rbd = ceph.rbd(&pool(), &namespace(label));
    rbd.namespace_create().await.unwrap();
    rbd
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[tokio::test]
async fn images_round_trip_and_the_cli_agrees() {
    let ceph = admin().await;
    let rbd = fresh(&ceph, "life").await;
    assert!(rbd.namespace_exists().await.unwrap());
    let spec = |image: &str| format!("{}/{}/{image}", rbd.pool(), rbd.namespace());

    rbd.create("cache-amd64", 2 * GIB).await.unwrap();
    let err = rbd.create("cache-amd64", GIB).await.unwrap_err();
    assert!(err.is_exists(), "{err}");
    assert_eq!(rbd.list().await.unwrap(), vec!["cache-amd64"]);
    assert_eq!(rbd.stat("cache-amd64").await.unwrap().size, 2 * GIB);
    assert_eq!(rbd_cli(&["info", &spec("cache-amd64")])["size"], 2 * GIB);

    // Usage: whole 4 MiB objects, the same figure as `rbd du`.
    for i in 0..3u64 {
        rbd.write("cache-amd64", i * 16 * MIB, vec![7u8; MIB as usize])
            .await
            .unwrap();
    }
    let used = rbd.used_bytes("cache-amd64").await.unwrap();
    assert_eq!(used, 3 * 4 * MIB);
    let du = rbd_cli(&["du", &spec("cache-amd64")]);
    assert_eq!(du["images"][0]["used_size"], used, "{du}");
    assert_eq!(
        rbd.read("cache-amd64", 16 * MIB, 4).await.unwrap(),
        vec![7u8; 4]
    );

    // Grow, then shrink (the no-op progress callback keeps librbd from crashing).
    rbd.resize("cache-amd64", 4 * GIB, false).await.unwrap();
    assert_eq!(rbd_cli(&["info", &spec("cache-amd64")])["size"], 4 * GIB);
    rbd.resize("cache-amd64", 20 * MIB, true).await.unwrap();
    assert_eq!(rbd.stat("cache-amd64").await.unwrap().size, 20 * MIB);
    assert_eq!(rbd.used_bytes("cache-amd64").await.unwrap(), 2 * 4 * MIB);

    // Trash: the name is free at once, the data goes when the trash entry is removed.
    rbd.trash_move("cache-amd64").await.unwrap();
    assert!(rbd.list().await.unwrap().is_empty());
    rbd.create("cache-amd64", GIB).await.unwrap();
    assert_eq!(rbd.used_bytes("cache-amd64").await.unwrap(), 0);
    let trash = rbd.trash_list().await.unwrap();
    assert_eq!(trash.len(), 1);
    assert_eq!(trash[0].name, "cache-amd64");
    rbd.trash_remove(&trash[0].id).await.unwrap();
    rbd.trash_remove(&trash[0].id).await.unwrap();
    assert!(rbd.trash_list().await.unwrap().is_empty());

    rbd.remove("cache-amd64").await.unwrap();
    assert!(rbd.remove("cache-amd64").await.unwrap_err().is_not_found());
    assert!(!rbd.exists("cache-amd64").await.unwrap());
    rbd.namespace_remove().await.unwrap();
    assert!(!rbd.namespace_exists().await.unwrap());
    rbd.namespace_remove().await.unwrap();
}

#[tokio::test]
async fn a_scoped_key_reaches_its_namespace_only() {
    let ceph = admin().await;
    let mine = fresh(&ceph, "mine").await;
    let theirs = fresh(&ceph, "theirs").await;
    mine.create("cache-amd64", GIB).await.unwrap();
    theirs.create("cache-amd64", GIB).await.unwrap();

    let entity = format!("client.kiln-test-{:x}", rand_u64());
    let caps = format!("profile rbd pool={} namespace={}", pool(), mine.namespace());
    let key = ceph
        .key_get_or_create(&entity, &[("mon", "profile rbd"), ("osd", &caps)])
        .await
        .unwrap();
    assert_eq!(
        ceph.key_get_or_create(&entity, &[("mon", "profile rbd"), ("osd", &caps)])
            .await
            .unwrap(),
        key,
        "get-or-create is idempotent"
    );
    let dir = tempdir();
    let keyring = dir.join("keyring");
    let monitors = ceph.monitor_addresses().await.unwrap();
    assert!(!monitors.is_empty());
    let (conf_text, keyring_text) = kiln_ceph::client_files(&monitors, &entity, &key, &keyring);
    std::fs::write(dir.join("ceph.conf"), conf_text).unwrap();
    std::fs::write(&keyring, keyring_text).unwrap();

    let scoped = Ceph::connect(&dir.join("ceph.conf"), entity.trim_start_matches("client."))
        .await
        .expect("the scoped client connects");
    let own = scoped.rbd(&pool(), mine.namespace());
    own.write("cache-amd64", 0, vec![1u8; 4096]).await.unwrap();
    assert_eq!(own.read("cache-amd64", 0, 2).await.unwrap(), vec![1u8, 1]);
    let other = scoped.rbd(&pool(), theirs.namespace());
    let err = other
        .write("cache-amd64", 0, vec![2u8; 4096])
        .await
        .unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    assert_eq!(theirs.read("cache-amd64", 0, 1).await.unwrap(), vec![0u8]);

    ceph.key_remove(&entity).await.unwrap();
    assert!(!ceph.key_exists(&entity).await.unwrap());
    ceph.key_remove(&entity).await.unwrap();
    for rbd in [mine, theirs] {
        rbd.remove("cache-amd64").await.unwrap();
        rbd.namespace_remove().await.unwrap();
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-ceph-test-{:x}", rand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn clones_see_the_parent_and_keep_their_writes() {
    let ceph = admin().await;
    let rbd = fresh(&ceph, "clone").await;
    rbd.create("cache-amd64", GIB).await.unwrap();
    rbd.write("cache-amd64", 0, b"parent".to_vec())
        .await
        .unwrap();
    rbd.snapshot_create("cache-amd64", "s1").await.unwrap();
    rbd.snapshot_create("cache-amd64", "s1").await.unwrap();
    rbd.clone_to("cache-amd64", "s1", &rbd, "scratch-1")
        .await
        .unwrap();
    assert_eq!(rbd.read("scratch-1", 0, 6).await.unwrap(), b"parent");
    rbd.write("scratch-1", 0, b"child!".to_vec()).await.unwrap();
    assert_eq!(rbd.read("scratch-1", 0, 6).await.unwrap(), b"child!");
    assert_eq!(rbd.read("cache-amd64", 0, 6).await.unwrap(), b"parent");
    // A clone in another namespace (v2 clones allow it) sees the parent too.
    let other = fresh(&ceph, "clone-x").await;
    rbd.clone_to("cache-amd64", "s1", &other, "scratch-2")
        .await
        .unwrap();
    assert_eq!(other.read("scratch-2", 0, 6).await.unwrap(), b"parent");
    // With v2 clones the snapshot can go while clones depend on it: it waits in the
    // snapshot trash until the last clone is gone, and the clones keep reading it.
    rbd.snapshot_remove("cache-amd64", "s1").await.unwrap();
    rbd.snapshot_remove("cache-amd64", "s1").await.unwrap();
    assert_eq!(other.read("scratch-2", 0, 6).await.unwrap(), b"parent");
    // The parent cannot go while clones depend on it.
    assert!(rbd.remove("cache-amd64").await.is_err());
    rbd.remove("scratch-1").await.unwrap();
    other.remove("scratch-2").await.unwrap();
    other.namespace_remove().await.unwrap();
    rbd.remove("cache-amd64").await.unwrap();
    rbd.namespace_remove().await.unwrap();
}

#[tokio::test]
async fn locks_and_watchers_show_who_holds_an_image() {
    let ceph = admin().await;
    let rbd = fresh(&ceph, "lock").await;
    rbd.create("cache-amd64", GIB).await.unwrap();
    assert!(rbd.lockers("cache-amd64").await.unwrap().is_empty());
    rbd.lock_exclusive("cache-amd64", "machine-a")
        .await
        .unwrap();
    let lockers = rbd.lockers("cache-amd64").await.unwrap();
    assert_eq!(lockers.len(), 1);
    assert_eq!(lockers[0].cookie, "machine-a");
    assert!(lockers[0].client.starts_with("client."), "{lockers:?}");

    // Another client cannot take it.
    let other = Ceph::connect(&conf(), "admin").await.unwrap();
    let err = other
        .rbd(&pool(), rbd.namespace())
        .lock_exclusive("cache-amd64", "machine-b")
        .await
        .unwrap_err();
    assert!(err.is_busy() || err.is_exists(), "{err}");
    // Breaking the stale holder frees it and fences it: librbd blocklists the holder,
    // so a builder that lost its volume cannot write to it any more.
    let theirs = other.rbd(&pool(), rbd.namespace());
    theirs.break_lock("cache-amd64", &lockers[0]).await.unwrap();
    let err = rbd
        .write("cache-amd64", 0, vec![9u8; 4096])
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    theirs
        .lock_exclusive("cache-amd64", "machine-b")
        .await
        .unwrap();
    theirs.unlock("cache-amd64", "machine-b").await.unwrap();
    assert!(theirs.lockers("cache-amd64").await.unwrap().is_empty());

    // Nobody else has it open: at most our own handle watches while it asks.
    let watchers = theirs.watchers("cache-amd64").await.unwrap();
    assert!(watchers.len() <= 1, "{watchers:?}");
    assert_eq!(theirs.read("cache-amd64", 0, 1).await.unwrap(), vec![0u8]);
    theirs.remove("cache-amd64").await.unwrap();
    theirs.namespace_remove().await.unwrap();
}

#[tokio::test]
async fn cluster_and_pool_figures_and_mon_commands() {
    let ceph = admin().await;
    let stat = ceph.cluster_stat().await.unwrap();
    assert!(stat.total_bytes > 0 && stat.available_bytes <= stat.total_bytes);
    // The 16-field struct: no stack overwrite (the `ceph` crate's 12-field one crashes).
    ceph.pool_stat(&pool()).await.unwrap();
    let health = ceph
        .mon_command(serde_json::json!({"prefix": "health"}))
        .await
        .unwrap();
    assert!(health["status"].as_str().is_some(), "{health}");
    let err = ceph
        .mon_command(serde_json::json!({"prefix": "no such command"}))
        .await
        .unwrap_err();
    assert!(err.errno > 0);
    assert!(ceph.namespaces(&pool()).await.is_ok());
    assert!(kiln_ceph::rbd_version().starts_with("1."));
}
