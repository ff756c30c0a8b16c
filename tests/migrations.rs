mod common;

use common::TestDb;

#[tokio::test]
async fn migrations_apply_from_zero_and_are_idempotent() {
    let db = TestDb::empty().await;
    assert!(!kiln::db::is_migrated(&db.pool).await.unwrap());
    kiln::db::migrate(&db.pool).await.unwrap();
    assert!(kiln::db::is_migrated(&db.pool).await.unwrap());

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for expected in [
        "audit_events",
        "job_schedules",
        "jobs",
        "memberships",
        "organizations",
        "projects",
        "tokens",
        "users",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "missing table {expected}: {tables:?}"
        );
    }

    // A second run applies nothing and fails nothing.
    kiln::db::migrate(&db.pool).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, kiln::db::MIGRATOR.iter().count());
}

#[tokio::test]
async fn schema_rejects_tokens_without_their_subject() {
    let db = TestDb::new().await;
    // A project token with no project must be refused by the database itself.
    let err = sqlx::query(
        "INSERT INTO tokens (id, kind, display_prefix, token_hash, scopes) VALUES ('x', 'project', 'p', $1, '{}')",
    )
    .bind(vec![0u8; 32])
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("tokens_subject_check"), "{err}");
}

#[tokio::test]
async fn project_defaults_match_the_documented_ones() {
    let db = TestDb::new().await;
    let tenant = common::tenant(&db.pool, "defaults").await;
    let p = &tenant.project;
    assert_eq!(p.cache_size_gb_amd64, 50);
    assert_eq!(p.cache_size_gb_arm64, 50);
    assert_eq!(p.builder_size, "16x32");
    assert!(!p.autoscaling_enabled);
    assert_eq!(p.id.len(), 12);
}

/// The database as it was before migration `version`, then the rest applied.
async fn migrate_around(db: &TestDb, version: i64, between: impl AsyncFnOnce(&sqlx::PgPool)) {
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            kiln::db::MIGRATOR
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    between(&db.pool).await;
    kiln::db::migrate(&db.pool).await.unwrap();
}

#[tokio::test]
async fn existing_trust_policies_get_their_providers_issuer_and_lose_their_duplicates() {
    let db = TestDb::empty().await;
    migrate_around(&db, 20261207000016, async |pool| {
        sqlx::raw_sql(
            "INSERT INTO organizations (id, name) VALUES ('o', 'Org');
             INSERT INTO projects (id, organization_id, name) VALUES ('p', 'o', 'api');
             INSERT INTO trust_policies (id, project_id, provider, claims, match_key, created_at) VALUES
               ('gh', 'p', 'github', '{\"repository_owner\": \"acme\", \"repository\": \"api\", \"repository_id\": \"\"}', 'acme/api', now() - interval '1 day'),
               ('gh2', 'p', 'github', '{\"repository_owner\": \"Acme\", \"repository\": \"API\", \"repository_id\": \"\"}', 'acme/api', now()),
               ('gl', 'p', 'gitlab', '{\"project_path\": \"g/app\", \"ref\": \"main\"}', 'g/app', now()),
               ('bk', 'p', 'buildkite', '{\"organization_slug\": \"acme\", \"pipeline_slug\": \"web\"}', 'acme/web', now()),
               ('cc', 'p', 'circleci', '{\"organization_uuid\": \"o-1\", \"project_uuid\": \"p-2\"}', 'o-1/p-2', now())",
        )
        .execute(pool)
        .await
        .unwrap();
    })
    .await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, issuer FROM trust_policies ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("bk".into(), "https://agent.buildkite.com".into()),
            ("cc".into(), "https://oidc.circleci.com/org/o-1".into()),
            (
                "gh".into(),
                "https://token.actions.githubusercontent.com".into()
            ),
            ("gl".into(), "https://gitlab.com".into()),
        ],
        "the younger duplicate of gh is folded into it"
    );
}
