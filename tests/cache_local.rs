//! The layer-cache allocator with the local provider (directories), which `kiln dev` uses:
//! the same state machine and jobs as on Ceph, checked against the filesystem.
mod common;

use common::{TestDb, app_with, operator, tenant};
use kiln::app::AppState;
use kiln::cache::GIB;
use kiln::db::volumes::Volume;
use kiln::projects::ProjectSettings;

fn local_app(db: &TestDb, dir: &std::path::Path) -> AppState {
    let dir = dir.display().to_string();
    app_with(
        db,
        &[
            ("KILN_CACHE__LOCAL__DIR", &dir),
            ("KILN_CACHE__CREATE_ON", "project"),
            ("KILN_CACHE__SWEEP_GRACE_SECONDS", "0"),
        ],
    )
}

async fn volumes(app: &AppState, project: &str) -> Vec<Volume> {
    app.cache
        .list(&operator(), Some(project))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.volume)
        .collect()
}

#[tokio::test]
async fn directory_volumes_follow_the_same_lifecycle() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let app = local_app(&db, dir.path());
    let me = operator();
    let t = tenant(&db.pool, "local").await;
    let project = app
        .projects
        .create(
            &me,
            Some(&t.org_id),
            ProjectSettings {
                name: Some("local cache".into()),
                cache_size_gb_amd64: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for v in volumes(&app, &project.id).await {
        app.cache.run_create(&v.id).await.unwrap();
    }
    let created = volumes(&app, &project.id).await;
    let amd64 = created
        .iter()
        .find(|v| v.platform == "amd64")
        .unwrap()
        .clone();
    let path = dir.path().join(&amd64.namespace).join(&amd64.image);
    assert!(path.is_dir(), "{}", path.display());
    assert_eq!(amd64.state, "available");
    assert_eq!(amd64.size_bytes, 2 * GIB);

    // Usage counts allocated blocks.
    std::fs::write(path.join("layer"), vec![7u8; 1 << 20]).unwrap();
    app.cache.meter().await.unwrap();
    let used = app
        .cache
        .get(&me, &amd64.id)
        .await
        .unwrap()
        .volume
        .used_bytes
        .unwrap();
    assert!((1 << 20..2 << 20).contains(&used), "{used}");

    // Grow, recorded; no capacity limit applies to directories.
    app.projects
        .update(
            &me,
            Some(&project.id),
            ProjectSettings {
                cache_size_gb_amd64: Some(5000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    app.cache.run_resize(&amd64.id).await.unwrap();
    assert_eq!(
        app.cache
            .get(&me, &amd64.id)
            .await
            .unwrap()
            .volume
            .size_bytes,
        5000 * GIB
    );

    // Reset: a new, empty directory; the old one removed.
    let reset = app.cache.reset(&me, Some(&project.id)).await.unwrap();
    for v in volumes(&app, &project.id).await {
        match v.state.as_str() {
            "creating" => app.cache.run_create(&v.id).await.unwrap(),
            "resetting" => app.cache.run_delete(&v.id).await.unwrap(),
            _ => {}
        }
    }
    assert_eq!(reset.retired.len(), 2);
    assert!(!path.exists(), "the old cache is gone");
    let fresh = volumes(&app, &project.id).await;
    let new_amd64 = fresh.iter().find(|v| v.platform == "amd64").unwrap();
    let new_path = dir.path().join(&new_amd64.namespace).join(&new_amd64.image);
    assert!(new_path.is_dir());
    assert!(std::fs::read_dir(&new_path).unwrap().next().is_none());

    // The sweep removes a directory no row owns (grace 0: on its second pass).
    let stray = dir.path().join("proj-stray").join("leftover");
    std::fs::create_dir_all(&stray).unwrap();
    assert_eq!(app.cache.sweep().await.unwrap().new_orphans.len(), 1);
    assert_eq!(app.cache.sweep().await.unwrap().removed.len(), 1);
    assert!(!stray.exists());
    app.cache.sweep().await.unwrap();
    assert!(!dir.path().join("proj-stray").exists());
    assert!(new_path.is_dir(), "owned volumes stay");

    // Deleting the project removes its directories and namespace.
    app.projects.delete(&me, Some(&project.id)).await.unwrap();
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM volumes WHERE state = 'deleting'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for id in ids {
        app.cache.run_delete(&id).await.unwrap();
    }
    assert!(!dir.path().join(&new_amd64.namespace).exists());
}

/// `kiln admin cache list` and `cache reset` go through the same domain functions.
#[tokio::test]
async fn admin_lists_and_resets_a_projects_cache() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let app = local_app(&db, dir.path());
    let me = operator();
    let t = tenant(&db.pool, "admin").await;
    let project = app
        .projects
        .create(
            &me,
            Some(&t.org_id),
            ProjectSettings {
                name: Some("admin cache".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for v in volumes(&app, &project.id).await {
        app.cache.run_create(&v.id).await.unwrap();
    }
    sqlx::query("UPDATE projects SET cache_used = true WHERE id = $1")
        .bind(&project.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(common::kiln_bin())
            .args(args)
            .env("KILN_DATABASE__URL", &db.url)
            .env("KILN_CACHE__LOCAL__DIR", dir.path())
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };

    let (ok, out, err) = kiln(&["admin", "--json", "cache", "list", "--project", &project.id]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r["state"] == "available"), "{out}");
    assert!(
        rows.iter()
            .any(|r| r["image"].as_str().unwrap().contains("/cache-amd64-g0-")),
        "{out}"
    );

    let (ok, _, err) = kiln(&["admin", "cache", "reset", "--project", &project.id]);
    assert!(ok, "{err}");
    assert!(err.contains("is reset (generation 1)"), "{err}");
    let after = volumes(&app, &project.id).await;
    let states: Vec<&str> = after.iter().map(|v| v.state.as_str()).collect();
    assert_eq!(
        after.iter().filter(|v| v.state == "creating").count(),
        2,
        "{states:?}"
    );
    assert!(
        after.iter().any(|v| v.image.starts_with("cache-amd64-g1-")),
        "{after:?}"
    );

    // Unknown project: a clear error, nothing changed.
    let (ok, _, err) = kiln(&["admin", "cache", "reset", "--project", "nope"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(volumes(&app, &project.id).await.len(), after.len());
}
