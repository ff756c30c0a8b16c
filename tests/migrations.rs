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
