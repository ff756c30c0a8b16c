//! The layer-cache allocator against a real single-node Ceph cluster (started by
//! scripts/test.sh), with the `rbd` CLI as an independent witness of what Kiln did.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http::rest;
use common::{TestDb, app_with, operator, tenant};
use kiln::app::AppState;
use kiln::cache::{GIB, MachineVolume};
use kiln::db::volumes::Volume;
use kiln::projects::ProjectSettings;
use kiln::proto::kiln::agent::v1 as pb;
use serde_json::{Value, json};

fn ceph_conf() -> String {
    std::env::var("TEST_CEPH_CONF").expect(
        "TEST_CEPH_CONF is not set: run the tests through `bash scripts/test.sh`, which starts Ceph",
    )
}

fn ceph_pool() -> String {
    std::env::var("TEST_CEPH_POOL").unwrap_or_else(|_| "kiln-cache".into())
}

/// Runs the `rbd` CLI against `conf`: (succeeded, stdout, stderr).
fn rbd_on(conf: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("rbd")
        .args(args)
        .env("CEPH_CONF", conf)
        .output()
        .expect("running rbd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn rbd_json_on(conf: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let (ok, stdout, stderr) = rbd_on(conf, &all);
    assert!(ok, "rbd {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("rbd {args:?}: not JSON: {stdout}"))
}

fn spec(pool: &str, v: &Volume) -> String {
    format!("{pool}/{}/{}", v.namespace, v.image)
}

/// The image's size, as `rbd info` reports it.
fn rbd_size(conf: &str, pool: &str, v: &Volume) -> i64 {
    rbd_json_on(conf, &["info", &spec(pool, v)])["size"]
        .as_i64()
        .unwrap()
}

/// The images of a namespace, as `rbd ls` reports them (empty if it is gone).
fn rbd_ls(conf: &str, pool: &str, namespace: &str) -> Vec<String> {
    let (ok, stdout, _) = rbd_on(
        conf,
        &[
            "ls",
            "--pool",
            pool,
            "--namespace",
            namespace,
            "--format",
            "json",
        ],
    );
    if !ok {
        return Vec::new();
    }
    let mut names: Vec<String> = serde_json::from_str(&stdout).unwrap_or_default();
    names.sort();
    names
}

fn rbd_namespaces(conf: &str, pool: &str) -> Vec<String> {
    rbd_json_on(conf, &["namespace", "ls", pool])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

fn ceph_app(db: &TestDb, conf: &str, pool: &str, extra: &[(&str, &str)]) -> AppState {
    let mut env = vec![
        ("KILN_CACHE__PROVIDER", "ceph"),
        ("KILN_CACHE__CEPH__CONF_PATH", conf),
        ("KILN_CACHE__CEPH__POOL", pool),
        ("KILN_CACHE__CREATE_ON", "project"),
        ("KILN_CACHE__CAPACITY_GB", "1000"),
        ("KILN_SECRETS__KEY_ENCRYPTION_KEY", common::KEK_B64),
    ];
    env.extend_from_slice(extra);
    app_with(db, &env)
}

fn sizes(name: &str, amd64: i32, arm64: i32) -> ProjectSettings {
    ProjectSettings {
        name: Some(name.into()),
        cache_size_gb_amd64: Some(amd64),
        cache_size_gb_arm64: Some(arm64),
        ..Default::default()
    }
}

async fn volumes_of(app: &AppState, project_id: &str) -> Vec<Volume> {
    app.cache
        .list(&operator(), Some(project_id))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.volume)
        .collect()
}

fn platform<'a>(volumes: &'a [Volume], platform: &str, state: &str) -> &'a Volume {
    volumes
        .iter()
        .find(|v| v.platform == platform && v.state == state)
        .unwrap_or_else(|| panic!("no {state} {platform} volume in {volumes:#?}"))
}

/// A project in a new organization with its volumes created in Ceph.
async fn project_with_volumes(
    app: &AppState,
    db: &TestDb,
    amd64: i32,
    arm64: i32,
) -> (kiln::projects::Project, Vec<Volume>, String) {
    let t = tenant(&db.pool, "cache").await;
    let project = app
        .projects
        .create(&operator(), Some(&t.org_id), sizes("cached", amd64, arm64))
        .await
        .unwrap();
    for v in volumes_of(app, &project.id).await {
        assert_eq!(v.state, "creating");
        app.cache.run_create(&v.id).await.unwrap();
    }
    let volumes = volumes_of(app, &project.id).await;
    assert!(
        volumes.iter().all(|v| v.state == "available"),
        "{volumes:#?}"
    );
    (project, volumes, t.user_token)
}

#[tokio::test]
async fn create_grow_shrink_reset_usage_and_delete_round_trip_through_ceph() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let app = ceph_app(&db, &conf, &pool, &[]);
    let me = operator();
    let (project, volumes, _) = project_with_volumes(&app, &db, 2, 1).await;
    let amd64 = platform(&volumes, "amd64", "available").clone();
    let arm64 = platform(&volumes, "arm64", "available").clone();
    assert_eq!(amd64.namespace, format!("proj-{}", project.id));
    assert_eq!(rbd_size(&conf, &pool, &amd64), 2 * GIB);
    assert_eq!(rbd_size(&conf, &pool, &arm64), GIB);
    // Creating again (a retried job) changes nothing.
    app.cache.run_create(&amd64.id).await.unwrap();

    // Usage: what `rbd du` says, stored per volume.
    let admin = kiln_ceph::Ceph::connect(Path::new(&conf), "admin")
        .await
        .unwrap();
    admin
        .rbd(&pool, &amd64.namespace)
        .write(&amd64.image, 0, vec![7u8; 12 << 20])
        .await
        .unwrap();
    let pass = app.cache.meter().await.unwrap();
    assert!(pass.volumes >= 2, "{pass:?}");
    let du = rbd_json_on(&conf, &["du", &spec(&pool, &amd64)]);
    let witness = du["images"][0]["used_size"].as_i64().unwrap();
    assert_eq!(witness, 12 << 20);
    let metered = app.cache.get(&me, &amd64.id).await.unwrap().volume;
    assert_eq!(
        metered.used_bytes,
        Some(witness),
        "the same figure as rbd du"
    );

    // Grow: answered at once, carried out by the resize job.
    let updated = app
        .projects
        .update(&me, Some(&project.id), sizes("cached", 3, 1))
        .await
        .unwrap();
    assert!(
        updated.notices[0].contains("grows"),
        "{:?}",
        updated.notices
    );
    assert_eq!(
        app.cache.get(&me, &amd64.id).await.unwrap().volume.state,
        "resizing"
    );
    app.cache.run_resize(&amd64.id).await.unwrap();
    assert_eq!(rbd_size(&conf, &pool, &amd64), 3 * GIB);
    let grown = app.cache.get(&me, &amd64.id).await.unwrap();
    assert_eq!(
        (grown.volume.state.as_str(), grown.volume.size_bytes),
        ("available", 3 * GIB)
    );
    assert!(grown.pending.is_none());

    // Shrink: recorded, applied at the next reset, and said so.
    let updated = app
        .projects
        .update(&me, Some(&project.id), sizes("cached", 1, 1))
        .await
        .unwrap();
    assert!(
        updated.notices[0].contains("next reset") && updated.notices[0].contains("1 GB"),
        "{:?}",
        updated.notices
    );
    let pending = app.cache.get(&me, &amd64.id).await.unwrap();
    assert_eq!(pending.volume.target_size_bytes, GIB);
    assert!(pending.pending.unwrap().contains("next cache reset"));
    assert_eq!(
        rbd_size(&conf, &pool, &amd64),
        3 * GIB,
        "nothing shrank yet"
    );

    // Reset: new images (the shrink applies), the old ones trashed and purged.
    let reset = app.cache.reset(&me, Some(&project.id)).await.unwrap();
    assert!(reset.took_effect);
    assert_eq!(reset.retired.len(), 2);
    let after = volumes_of(&app, &project.id).await;
    let new_amd64 = platform(&after, "amd64", "creating").clone();
    assert_ne!(
        new_amd64.image, amd64.image,
        "a reset never reuses an image"
    );
    for v in after.iter().filter(|v| v.state == "creating") {
        app.cache.run_create(&v.id).await.unwrap();
    }
    for id in &reset.retired {
        app.cache.run_delete(id).await.unwrap();
        app.cache.run_delete(id).await.unwrap(); // idempotent
    }
    assert_eq!(rbd_size(&conf, &pool, &new_amd64), GIB);
    let live = volumes_of(&app, &project.id).await;
    let mut expected: Vec<String> = live.iter().map(|v| v.image.clone()).collect();
    expected.sort();
    assert_eq!(rbd_ls(&conf, &pool, &amd64.namespace), expected);
    assert_eq!(live.len(), 2, "the retired volumes are deleted: {live:#?}");
    let trash = rbd_json_on(
        &conf,
        &[
            "trash",
            "ls",
            "--pool",
            &pool,
            "--namespace",
            &amd64.namespace,
        ],
    );
    assert_eq!(
        trash.as_array().unwrap().len(),
        0,
        "purged from the trash too"
    );

    // Nothing used the new cache yet: a second reset changes nothing.
    let again = app.cache.reset(&me, Some(&project.id)).await.unwrap();
    assert!(!again.took_effect);
    assert_eq!(again.generation, reset.generation);

    // Deleting the project deletes its images and its namespace.
    app.projects.delete(&me, Some(&project.id)).await.unwrap();
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM volumes WHERE state = 'deleting'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        app.cache.run_delete(id).await.unwrap();
    }
    assert!(rbd_ls(&conf, &pool, &amd64.namespace).is_empty());
    assert!(!rbd_namespaces(&conf, &pool).contains(&amd64.namespace));
}

#[tokio::test]
async fn capacity_refuses_a_create_or_grow_past_it_and_changes_nothing() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let app = ceph_app(
        &db,
        &conf,
        &pool,
        &[
            ("KILN_CACHE__CAPACITY_GB", "10"),
            ("KILN_CACHE__OVERCOMMIT_RATIO", "1.0"),
        ],
    );
    let me = operator();
    let (project, _, token) = project_with_volumes(&app, &db, 8, 1).await;

    // A second project needing 2 GiB more than remains is refused, and not created.
    let projects_before: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let err = app
        .projects
        .create(&me, Some(&project.organization_id), sizes("too big", 2, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "resource_exhausted", "{err}");
    assert!(
        err.to_string()
            .contains("it needs 2 GiB, 1 GiB of 10 GiB remain"),
        "{err}"
    );
    let projects_after: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(projects_after, projects_before);

    // A grow past it, over REST: 429 with the reason; the setting and volume unchanged.
    let router = kiln::api::router(app.clone());
    let (status, body) = rest(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", project.id),
        Some(&token),
        Some(json!({ "cache_size_gb_amd64": 10 })),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.to_string().contains("not enough build-cache capacity"),
        "{body}"
    );
    let now = app.projects.get(&me, Some(&project.id)).await.unwrap();
    assert_eq!(now.cache_size_gb_amd64, 8);
    let volumes = volumes_of(&app, &project.id).await;
    let amd64 = platform(&volumes, "amd64", "available");
    assert_eq!(
        (amd64.size_bytes, amd64.target_size_bytes),
        (8 * GIB, 8 * GIB)
    );

    // Within it, fine.
    let (status, body) = rest(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", project.id),
        Some(&token),
        Some(json!({ "cache_size_gb_amd64": 9 })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["notices"][0].as_str().unwrap().contains("grows"),
        "{body}"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let app = ceph_app(&db, &conf, &pool, &[("KILN_CACHE__MAX_SIZE_GB", "500")]);
    let (project, volumes, token) = project_with_volumes(&app, &db, 2, 2).await;
    let router = kiln::api::router(app.clone());
    let path = format!("/api/v1/projects/{}", project.id);
    let other = tenant(&db.pool, "other").await;
    let audit_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (body, expect) in [
        (json!({ "cache_size_gb_amd64": 0 }), "between 1 and 500"),
        (json!({ "cache_size_gb_amd64": 501 }), "between 1 and 500"),
        (json!({ "cache_size_gb_arm64": -3 }), "between 1 and 500"),
        (json!({ "cache_size_gb_amd64": 2.5 }), "cache_size_gb_amd64"),
        (
            json!({ "cache_size_gb_amd64": "20" }),
            "cache_size_gb_amd64",
        ),
    ] {
        let (status, reply) = rest(&router, "PATCH", &path, Some(&token), Some(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert!(reply.to_string().contains(expect), "{body} -> {reply}");
    }
    // A volume id of another organization is not found, like an unknown one.
    let (status, reply) = rest(
        &router,
        "GET",
        &format!("/api/v1/volumes/{}", volumes[0].id),
        Some(&other.user_token),
        None,
    )
    .await;
    assert_eq!(status, 404, "{reply}");
    let (status, _) = rest(&router, "GET", "/api/v1/volumes/..%2Fx", Some(&token), None).await;
    assert_eq!(status, 404);
    let (status, reply) = rest(
        &router,
        "GET",
        &format!("/api/v1/volumes/{}", volumes[0].id),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["volume"]["size_bytes"], 2 * GIB);

    // A shrink while a build of that architecture runs.
    let build_id = kiln::db::ids::new_id();
    sqlx::query(
        "INSERT INTO builds (id, project_id, organization_id, state, command, cancels_at)
         VALUES ($1, $2, $3, 'running', 'build', now() + interval '1 hour')",
    )
    .bind(&build_id)
    .bind(&project.id)
    .bind(&project.organization_id)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO build_platforms (build_id, platform, state) VALUES ($1, 'amd64', 'pending')",
    )
    .bind(&build_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let (status, reply) = rest(
        &router,
        "PATCH",
        &path,
        Some(&token),
        Some(json!({ "cache_size_gb_amd64": 1 })),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.to_string().contains("while 1 build(s)"), "{reply}");

    let project_now = app
        .projects
        .get(&operator(), Some(&project.id))
        .await
        .unwrap();
    assert_eq!(project_now.cache_size_gb_amd64, 2);
    for v in volumes_of(&app, &project.id).await {
        assert_eq!((v.size_bytes, v.target_size_bytes), (2 * GIB, 2 * GIB));
        assert_eq!(rbd_size(&conf, &pool, &v), 2 * GIB);
    }
    let audit_after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        audit_after, audit_before,
        "refused changes leave no audit entry"
    );
}

/// Inserts a machine of `project` serving from `volume` (as the scheduler would).
async fn machine_with(db: &TestDb, project_id: &str, volume: &Volume) -> String {
    let id = kiln::db::ids::new_id();
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, project_id, managed_by_agent, state, volume_id)
         VALUES ($1, 'local', $2, $3, true, 'assigned', $4)",
    )
    .bind(&id)
    .bind(&volume.platform)
    .bind(project_id)
    .bind(&volume.id)
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(
        kiln::db::volumes::attach(&db.pool, &volume.id, &id)
            .await
            .unwrap()
    );
    id
}

fn directive_volume(ready: MachineVolume) -> pb::CacheVolume {
    let MachineVolume::Ready {
        volume_id,
        size_bytes,
        attachment,
        ..
    } = ready
    else {
        panic!("the volume is not ready: {ready:?}");
    };
    pb::CacheVolume {
        kind: attachment.kind.into(),
        source: attachment.source,
        mount_path: String::new(),
        options: attachment.options.into_iter().collect(),
        volume_id,
        size_bytes,
    }
}

/// A client connected with the machine's scoped key.
async fn connect_as(spec: &pb::CacheVolume, dir: &Path) -> kiln_ceph::Ceph {
    let keyring = dir.join("keyring");
    let client = &spec.options["client"];
    let (conf, keys) = kiln_ceph::client_files(
        std::slice::from_ref(&spec.options["monitors"]),
        &format!("client.{client}"),
        &spec.options["key"],
        &keyring,
    );
    std::fs::write(dir.join("ceph.conf"), conf).unwrap();
    std::fs::write(&keyring, keys).unwrap();
    kiln_ceph::Ceph::connect(&dir.join("ceph.conf"), client)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_machines_key_reaches_only_its_projects_namespace_and_dies_with_the_machine() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let app = ceph_app(&db, &conf, &pool, &[]);
    let (a, a_volumes, _) = project_with_volumes(&app, &db, 1, 1).await;
    let (_b, b_volumes, _) = project_with_volumes(&app, &db, 1, 1).await;
    let mine = platform(&a_volumes, "amd64", "available");
    let theirs = platform(&b_volumes, "amd64", "available");
    let machine = machine_with(&db, &a.id, mine).await;
    let spec = directive_volume(app.cache.for_machine(&machine).await.unwrap());
    assert_eq!(spec.kind, "rbd");
    assert_eq!(
        spec.source,
        format!("{pool}/{}/{}", mine.namespace, mine.image)
    );
    assert_eq!(spec.options["client"], format!("kiln-m-{machine}"));

    let dir = tempfile::tempdir().unwrap();
    let client = connect_as(&spec, dir.path()).await;
    let own = client.rbd(&pool, &mine.namespace);
    assert_eq!(own.stat(&mine.image).await.unwrap().size, GIB as u64);
    own.write(&mine.image, 0, vec![1u8; 4096]).await.unwrap();
    let foreign = client.rbd(&pool, &theirs.namespace);
    let err = foreign.stat(&theirs.image).await.unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    let err = foreign
        .write(&theirs.image, 0, vec![1u8; 4096])
        .await
        .unwrap_err();
    assert!(err.is_permission_denied(), "{err}");
    let err = client.rbd(&pool, "").list().await.unwrap_err();
    assert!(
        err.is_permission_denied(),
        "the default namespace is out of reach: {err}"
    );
    drop(client);

    // The machine ends: the database queues the release, which removes its key.
    sqlx::query("UPDATE machines SET state = 'terminated' WHERE id = $1")
        .bind(&machine)
        .execute(&db.pool)
        .await
        .unwrap();
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'volumes.release' AND dedupe_key = $1",
    )
    .bind(&machine)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    let released = app.cache.get(&operator(), &mine.id).await.unwrap().volume;
    assert_eq!(
        (released.state.as_str(), released.machine_id),
        ("available", None)
    );
    app.cache.run_release(&machine).await.unwrap();
    let admin = kiln_ceph::Ceph::connect(Path::new(&conf), "admin")
        .await
        .unwrap();
    assert!(
        !admin
            .key_exists(&format!("client.kiln-m-{machine}"))
            .await
            .unwrap()
    );
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        kiln_ceph::Ceph::connect(&dir.path().join("ceph.conf"), &spec.options["client"]),
    )
    .await
    .expect("connecting with a revoked key fails promptly");
    assert!(again.is_err(), "a revoked key still connects");
}

#[tokio::test]
async fn a_volume_attached_through_rbd_fuse_grows_and_refuses_a_second_builder() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let app = ceph_app(&db, &conf, &pool, &[]);
    let me = operator();
    let (project, volumes, _) = project_with_volumes(&app, &db, 1, 1).await;
    let volume = platform(&volumes, "amd64", "available").clone();
    let machine = machine_with(&db, &project.id, &volume).await;
    let spec = directive_volume(app.cache.for_machine(&machine).await.unwrap());
    let state = tempfile::tempdir().unwrap();
    let mut attached = kiln::agent::volume::AttachedVolume::attach(&spec, &machine, state.path())
        .await
        .unwrap();
    std::fs::write(attached.root.join("layer"), b"cached bytes").unwrap();
    let (_, total_before) = attached.space();
    assert!(
        total_before > 900 << 20 && total_before <= GIB as u64,
        "{total_before}"
    );

    // A second builder (another machine's cookie) is refused, not given a corrupt fs.
    let other_state = tempfile::tempdir().unwrap();
    let refused =
        kiln::agent::volume::AttachedVolume::attach(&spec, "othermachine", other_state.path())
            .await
            .err()
            .expect("a second attach must fail");
    assert!(
        format!("{refused:#}").contains(&format!("locked by builder {machine}")),
        "{refused:#}"
    );

    // Grow while attached: the image grows, then the filesystem (online where the
    // kernel allows it; here, through rbd-fuse, offline while BuildKit would be idle).
    app.projects
        .update(&me, Some(&project.id), sizes("cached", 2, 1))
        .await
        .unwrap();
    app.cache.run_resize(&volume.id).await.unwrap();
    let grown = directive_volume(app.cache.for_machine(&machine).await.unwrap());
    assert_eq!(grown.size_bytes, 2 * GIB as u64);
    attached.grow(grown.size_bytes).await.unwrap();
    if attached.grow_pending {
        attached.grow_offline().await.unwrap();
    }
    let (_, total_after) = attached.space();
    assert!(
        total_after > total_before + (900 << 20),
        "the filesystem grew: {total_before} -> {total_after}"
    );
    assert_eq!(
        std::fs::read(attached.root.join("layer")).unwrap(),
        b"cached bytes"
    );
    attached.detach().await;
    let admin = kiln_ceph::Ceph::connect(Path::new(&conf), "admin")
        .await
        .unwrap();
    let lease = admin
        .rbd(&pool, &volume.namespace)
        .lockers(&volume.image)
        .await
        .unwrap();
    assert!(
        lease.is_empty(),
        "detaching lets go of the lease: {lease:?}"
    );

    // Attached again (the next builder): the data is there.
    let again = kiln::agent::volume::AttachedVolume::attach(&spec, &machine, state.path())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(again.root.join("layer")).unwrap(),
        b"cached bytes"
    );
    again.detach().await;
}

#[tokio::test]
async fn two_replicas_resetting_at_once_reset_once() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let first = ceph_app(&db, &conf, &pool, &[]);
    let second = ceph_app(&db, &conf, &pool, &[]);
    let (project, volumes, _) = project_with_volumes(&first, &db, 1, 1).await;
    let namespace = volumes[0].namespace.clone();
    let me = operator();
    let (a, b) = tokio::join!(
        first.cache.reset(&me, Some(&project.id)),
        second.cache.reset(&me, Some(&project.id))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        [a.took_effect, b.took_effect]
            .iter()
            .filter(|t| **t)
            .count(),
        1,
        "exactly one reset takes effect"
    );
    assert_eq!(a.generation, b.generation);
    let after = volumes_of(&first, &project.id).await;
    assert_eq!(
        after.iter().filter(|v| v.state == "creating").count(),
        2,
        "{after:#?}"
    );
    assert_eq!(
        after.iter().filter(|v| v.state == "resetting").count(),
        2,
        "{after:#?}"
    );
    // Each replica runs the jobs (the second run finds the work done); each storage
    // step happens once.
    for v in &after {
        for app in [&first, &second] {
            if v.state == "creating" {
                app.cache.run_create(&v.id).await.unwrap();
            } else {
                app.cache.run_delete(&v.id).await.unwrap();
            }
        }
    }
    let live = volumes_of(&first, &project.id).await;
    let mut images: Vec<String> = live.iter().map(|v| v.image.clone()).collect();
    images.sort();
    assert_eq!(live.len(), 2);
    assert_eq!(rbd_ls(&conf, &pool, &namespace), images);
    let generation: i32 = sqlx::query_scalar("SELECT cache_generation FROM projects WHERE id = $1")
        .bind(&project.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(generation, 1);
}

/// A Ceph cluster of the test's own, for faults that would disturb the shared one.
struct PrivateCeph {
    dir: PathBuf,
    conf: String,
}

fn ceph_script(dir: &Path, function: &str) -> std::process::Output {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/ceph.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && {function}", lib.display()))
        .env("CEPH_DIR", dir)
        .env("CEPH_CONF", dir.join("ceph.conf"))
        .env("CEPH_POOL", "kiln-cache")
        .output()
        .expect("running scripts/lib/ceph.sh")
}

impl PrivateCeph {
    fn start() -> PrivateCeph {
        let dir = PathBuf::from(format!(
            "/var/tmp/kiln-ceph-test.{}",
            kiln::db::ids::new_id()
        ));
        let out = ceph_script(&dir, "start_throwaway_ceph");
        assert!(
            out.status.success(),
            "starting a private Ceph cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.join("ceph.conf").display().to_string();
        PrivateCeph { dir, conf }
    }

    fn kill_osd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).unwrap();
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn restart_osd(&self) {
        let out = Command::new("ceph-osd")
            .args(["-i", "0", "-c", &self.conf])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateCeph {
    fn drop(&mut self) {
        ceph_script(&self.dir, "stop_throwaway_ceph --purge");
    }
}

/// Runs the app's job workers until dropped.
struct Workers(tokio_util::sync::CancellationToken);

impl Drop for Workers {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn run_jobs(app: &AppState) -> Workers {
    let mut runner = kiln::jobs::JobRunner::new(app.db.clone(), app.config.jobs.clone());
    kiln::cache::register_jobs(&mut runner, app.cache.clone(), app.scheduler.clone());
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(runner.run(cancel.clone()));
    Workers(cancel)
}

async fn wait_state(app: &AppState, id: &str, state: &str, timeout: Duration) -> Volume {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let v = kiln::db::volumes::get(&app.db, id).await.unwrap().unwrap();
        if v.state == state {
            return v;
        }
        last = Some(v);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("volume {id} did not reach {state} in {timeout:?}: {last:#?}");
}

#[tokio::test]
async fn an_osd_killed_during_resize_and_reset_jobs_loses_nothing_and_leaves_no_orphan() {
    let ceph = PrivateCeph::start();
    let pool = "kiln-cache";
    let db = TestDb::new().await;
    let app = ceph_app(
        &db,
        &ceph.conf,
        pool,
        &[
            ("KILN_CACHE__CALL_TIMEOUT_SECONDS", "3"),
            ("KILN_JOBS__BACKOFF_BASE_SECONDS", "1"),
            ("KILN_JOBS__BACKOFF_MAX_SECONDS", "2"),
            ("KILN_JOBS__LEASE_SECONDS", "10"),
            ("KILN_CACHE__SWEEP_GRACE_SECONDS", "0"),
        ],
    );
    let me = operator();
    let (project, volumes, _) = project_with_volumes(&app, &db, 1, 1).await;
    let amd64 = platform(&volumes, "amd64", "available").clone();
    let _workers = run_jobs(&app);

    // Resize while the OSD is down: attempts fail and are retried; once the OSD is
    // back the job completes.
    ceph.kill_osd();
    app.projects
        .update(&me, Some(&project.id), sizes("cached", 2, 1))
        .await
        .unwrap();
    common::wait_for(
        "a failed resize attempt",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT attempts FROM jobs WHERE kind = 'volumes.resize' AND dedupe_key = $1",
            )
            .bind(&amd64.id)
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .is_some_and(|attempts| attempts >= 2)
        },
    )
    .await;
    assert_eq!(
        kiln::db::volumes::get(&db.pool, &amd64.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        "resizing"
    );
    ceph.restart_osd();
    wait_state(&app, &amd64.id, "available", Duration::from_secs(90)).await;
    assert_eq!(rbd_size(&ceph.conf, pool, &amd64), 2 * GIB);

    // Reset while the OSD is down: the new images and the old images' removal wait.
    ceph.kill_osd();
    let reset = app.cache.reset(&me, Some(&project.id)).await.unwrap();
    assert!(reset.took_effect);
    common::wait_for("failed create attempts", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM jobs WHERE kind IN ('volumes.create', 'volumes.delete') AND attempts >= 2",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            >= 2
    })
    .await;
    ceph.restart_osd();
    for id in &reset.retired {
        wait_state(&app, id, "deleted", Duration::from_secs(90)).await;
    }
    let live = volumes_of(&app, &project.id).await;
    for v in &live {
        wait_state(&app, &v.id, "available", Duration::from_secs(90)).await;
    }
    let mut images: Vec<String> = live.iter().map(|v| v.image.clone()).collect();
    images.sort();
    assert_eq!(
        rbd_ls(&ceph.conf, pool, &amd64.namespace),
        images,
        "no lost volume, no orphan"
    );

    // The sweep removes an image no row owns (here made by hand), then its namespace.
    let (ok, _, stderr) = rbd_on(
        &ceph.conf,
        &["namespace", "create", &format!("{pool}/proj-stray")],
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = rbd_on(
        &ceph.conf,
        &[
            "create",
            "--size",
            "64M",
            &format!("{pool}/proj-stray/leftover"),
        ],
    );
    assert!(ok, "{stderr}");
    let first = app.cache.sweep().await.unwrap();
    assert_eq!(first.new_orphans.len(), 1, "{first:?}");
    assert!(first.removed.is_empty());
    let second = app.cache.sweep().await.unwrap();
    assert_eq!(second.removed.len(), 1, "{second:?}");
    assert!(rbd_ls(&ceph.conf, pool, "proj-stray").is_empty());
    let third = app.cache.sweep().await.unwrap();
    assert!(
        third.removed_namespaces.contains(&"proj-stray".to_string())
            || !rbd_namespaces(&ceph.conf, pool).contains(&"proj-stray".to_string()),
        "{third:?}"
    );
    assert_eq!(
        rbd_ls(&ceph.conf, pool, &amd64.namespace),
        images,
        "owned images stay"
    );
}

/// `kiln serve` in process with the Ceph provider; local builders run `kiln agent`
/// around the stand-in, whose root (and `solves.log`) is the attached volume.
async fn ceph_server(db: &TestDb, conf: &str, pool: &str, builders: &Path) -> common::Server {
    let standin = env!("CARGO_BIN_EXE_buildkitd-standin");
    let command = format!(
        r#"["{standin}", "--listen", "{{listen}}", "--cert", "{{cert}}", "--key", "{{key}}", "--ca", "{{ca}}", "--root", "{{root}}"]"#
    );
    let builders = builders.display().to_string();
    let env: Vec<(&str, &str)> = vec![
        ("KILN_BUILDERS__LOCAL__COMMAND", &command),
        (
            "KILN_BUILDERS__LOCAL__KILN_BINARY",
            env!("CARGO_BIN_EXE_kiln"),
        ),
        ("KILN_BUILDERS__LOCAL__STATE_DIR", &builders),
        ("KILN_BUILDERS__AGENT_HEALTH_INTERVAL_SECONDS", "1"),
        ("KILN_CACHE__PROVIDER", "ceph"),
        ("KILN_CACHE__CEPH__CONF_PATH", conf),
        ("KILN_CACHE__CEPH__POOL", pool),
        ("KILN_CACHE__CAPACITY_GB", "1000"),
        ("KILN_JOBS__BACKOFF_BASE_SECONDS", "1"),
    ];
    common::Server::start(db, &env).await
}

/// Waits until the build's amd64 platform is ready and returns its builder.
async fn ready_builder(db: &TestDb, build_id: &str, builders: &Path) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let builder: Option<String> = sqlx::query_scalar::<_, Option<String>>(
            "SELECT builder_id FROM build_platforms WHERE build_id = $1 AND state = 'ready'",
        )
        .bind(build_id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .flatten();
        if let Some(builder) = builder {
            return builder;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "build {build_id}'s builder was not ready within 60 s\n{}",
                diagnose(db, builders).await
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// id, role, state, serving, applied and directive generation, error, volume.
type MachineRow = (
    String,
    String,
    String,
    bool,
    i64,
    i64,
    Option<String>,
    Option<String>,
);
/// id, kind, state, machine, error.
type VolumeRow = (String, String, String, Option<String>, Option<String>);

/// Machines, volumes and jobs, and the builders' logs, for a failure message.
async fn diagnose(db: &TestDb, builders: &Path) -> String {
    let machines: Vec<MachineRow> =
        sqlx::query_as(
            "SELECT id, role, state, serving, applied_generation, directive_generation, error, volume_id
             FROM machines ORDER BY created_at",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let volumes: Vec<VolumeRow> = sqlx::query_as(
        "SELECT id, kind, state, machine_id, error FROM volumes ORDER BY created_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let jobs: Vec<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT kind, state, attempts, last_error FROM jobs ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut logs = String::new();
    {
        for entry in std::fs::read_dir(builders).into_iter().flatten().flatten() {
            let log = std::fs::read_to_string(entry.path().join("builder.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            logs.push_str(&format!(
                "--- {}\n{}\n",
                entry.path().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    format!("machines: {machines:#?}\nvolumes: {volumes:#?}\njobs: {jobs:#?}\n{logs}")
}

async fn new_build(db: &TestDb, project: &kiln::projects::Project, ephemeral: bool) -> String {
    let id = kiln::db::ids::new_id();
    kiln::db::builds::insert(
        &db.pool,
        kiln::db::builds::NewBuild {
            id: &id,
            project_id: &project.id,
            organization_id: &project.organization_id,
            command: "build",
            options: json!([]),
            created_by: None,
            ci_identity: None,
            timeout_minutes: 60,
            ephemeral_cache: ephemeral,
        },
    )
    .await
    .unwrap();
    kiln::db::builds::request_platform(&db.pool, &id, kiln::db::builds::Platform::Amd64)
        .await
        .unwrap();
    kiln::scheduler::notify_scheduler(&db.pool).await;
    id
}

fn sync_filesystems() {
    assert!(Command::new("sync").status().unwrap().success());
}

async fn machine_volume(db: &TestDb, machine: &str) -> Volume {
    kiln::db::volumes::of_machine(&db.pool, machine)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("machine {machine} has no volume"))
}

async fn machine_state(db: &TestDb, machine: &str) -> String {
    sqlx::query_scalar("SELECT state FROM machines WHERE id = $1")
        .bind(machine)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn autoscaling_spreads_builds_over_clones_that_never_write_the_projects_cache() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "autoscale").await;
    let replica = ceph_app(&db, &conf, &pool, &[("KILN_CACHE__CREATE_ON", "build")]);
    let project = replica
        .projects
        .update(
            &operator(),
            Some(&t.project.id),
            ProjectSettings {
                cache_size_gb_amd64: Some(1),
                autoscaling_enabled: Some(true),
                autoscaling_builds_per_builder: Some(1),
                autoscaling_max_builders: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .project;
    let builders = tempfile::tempdir().unwrap();
    let _server = ceph_server(&db, &conf, &pool, builders.path()).await;
    let root = |machine: &str| builders.path().join(machine).join("volume/buildkit");

    // The first build gets the primary builder, on the project's volume.
    let first = new_build(&db, &project, false).await;
    let primary = ready_builder(&db, &first, builders.path()).await;
    let project_volume = machine_volume(&db, &primary).await;
    assert_eq!(project_volume.kind, "project");
    std::fs::write(root(&primary).join("layer-from-primary"), b"primary").unwrap();
    sync_filesystems();

    // The second, concurrent one exceeds the cap of 1: an extra builder, on a clone that
    // sees the primary's layers.
    let second = new_build(&db, &project, false).await;
    let extra = ready_builder(&db, &second, builders.path()).await;
    assert_ne!(extra, primary);
    let role: String = sqlx::query_scalar("SELECT role FROM machines WHERE id = $1")
        .bind(&extra)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(role, "extra");
    let clone = machine_volume(&db, &extra).await;
    assert_eq!(
        (clone.kind.as_str(), clone.parent_volume_id.as_deref()),
        ("clone", Some(project_volume.id.as_str()))
    );
    assert_eq!(clone.namespace, format!("proj-{}-x", project.id));
    assert_eq!(
        std::fs::read(root(&extra).join("layer-from-primary")).unwrap(),
        b"primary",
        "the clone starts with the primary's layers"
    );
    std::fs::write(root(&extra).join("layer-from-extra"), b"extra").unwrap();
    sync_filesystems();

    // A third one finds both builders at their cap and the slot at its maximum: it waits.
    // (The server's scheduler may hold the platform at the moment this replica asks,
    // which answers Skipped; ask until this replica decides.)
    let third = new_build(&db, &project, false).await;
    common::wait_for(
        "this replica to queue the third build",
        Duration::from_secs(15),
        || {
            let (replica, third) = (replica.clone(), third.clone());
            async move {
                replica
                    .scheduler
                    .assign(&third, kiln::db::builds::Platform::Amd64)
                    .await
                    .unwrap()
                    == kiln::scheduler::Assignment::Queued
            }
        },
    )
    .await;
    let (machines, pending): (i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM machines WHERE project_id = $1),
                (SELECT state FROM build_platforms WHERE build_id = $2 AND platform = 'amd64')",
    )
    .bind(&project.id)
    .bind(&third)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((machines, pending.as_str()), (2, "pending"));
    // When the first finishes, the third takes its place on the primary.
    kiln::db::builds::finish(&db.pool, &first, &kiln::db::builds::Outcome::Success)
        .await
        .unwrap();
    assert_eq!(ready_builder(&db, &third, builders.path()).await, primary);

    // The extra builder is reaped: its clone goes, and what it wrote never reached the
    // project's volume.
    kiln::db::builds::finish(&db.pool, &second, &kiln::db::builds::Outcome::Success)
        .await
        .unwrap();
    sqlx::query("UPDATE machines SET state = 'draining' WHERE id = $1")
        .bind(&extra)
        .execute(&db.pool)
        .await
        .unwrap();
    wait_state(&replica, &clone.id, "deleted", Duration::from_secs(60)).await;
    assert_eq!(machine_state(&db, &extra).await, "terminated");
    assert!(rbd_ls(&conf, &pool, &clone.namespace).is_empty());
    let snaps = rbd_json_on(&conf, &["snap", "ls", &spec(&pool, &project_volume)]);
    assert_eq!(
        snaps.as_array().unwrap().len(),
        0,
        "the clone's snapshot is gone: {snaps}"
    );
    assert!(!root(&primary).join("layer-from-extra").exists());
    assert!(root(&primary).join("layer-from-primary").exists());
}

#[tokio::test]
async fn an_ephemeral_build_gets_its_own_builder_and_volume_and_both_go_with_it() {
    let (conf, pool) = (ceph_conf(), ceph_pool());
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "ephemeral").await;
    let replica = ceph_app(&db, &conf, &pool, &[("KILN_CACHE__CREATE_ON", "build")]);
    let project = replica
        .projects
        .update(&operator(), Some(&t.project.id), sizes("eph", 1, 1))
        .await
        .unwrap()
        .project;
    let builders = tempfile::tempdir().unwrap();
    let _server = ceph_server(&db, &conf, &pool, builders.path()).await;

    // A trusted build first: the project's builder and volume.
    let trusted = new_build(&db, &project, false).await;
    let primary = ready_builder(&db, &trusted, builders.path()).await;
    let project_volume = machine_volume(&db, &primary).await;

    let build = new_build(&db, &project, true).await;
    let machine = ready_builder(&db, &build, builders.path()).await;
    assert_ne!(machine, primary, "never the project's builder");
    let (role, for_build): (String, Option<String>) =
        sqlx::query_as("SELECT role, build_id FROM machines WHERE id = $1")
            .bind(&machine)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (role.as_str(), for_build.as_deref()),
        ("ephemeral", Some(build.as_str()))
    );
    let volume = machine_volume(&db, &machine).await;
    assert_eq!(volume.kind, "ephemeral");
    assert_eq!(volume.namespace, format!("build-{build}"));
    assert_ne!(volume.id, project_volume.id);
    let root = builders.path().join(&machine).join("volume/buildkit");
    assert!(
        root.is_dir(),
        "BuildKit's root is on the build's own volume"
    );
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "it starts empty"
    );

    // The build ends: its builder drains and ends, and its volume is deleted.
    kiln::db::builds::finish(&db.pool, &build, &kiln::db::builds::Outcome::Success)
        .await
        .unwrap();
    wait_state(&replica, &volume.id, "deleted", Duration::from_secs(60)).await;
    assert_eq!(machine_state(&db, &machine).await, "terminated");
    // The empty namespace goes right after the volume row says deleted.
    common::wait_for(
        "the build's namespace to be removed",
        Duration::from_secs(30),
        || async { !rbd_namespaces(&conf, &pool).contains(&volume.namespace) },
    )
    .await;
    // The project's volume is untouched, still attached to its builder.
    let project_now = kiln::db::volumes::get(&db.pool, &project_volume.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(project_now.state, "attached");
    assert_eq!(project_now.machine_id.as_deref(), Some(primary.as_str()));
}
