mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kiln::auth::{Authenticator, PrincipalKind, TokenKind};
use kiln::db::tokens::{self, TokenFilter};
use kiln::error::Error;
use kiln::tokens::{NewToken, Tokens};

use common::{TestDb, operator, tenant, wait_for};

fn authenticator(db: &TestDb) -> Authenticator {
    let config = common::config(&db.url, &[]);
    Authenticator::new(db.pool.clone(), &config.auth)
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

#[tokio::test]
async fn create_verify_and_store_only_the_hash() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let auth = authenticator(&db);
    let principal = auth
        .authenticate(Some(&bearer(&t.user_token)))
        .await
        .unwrap();
    assert_eq!(principal.kind, PrincipalKind::Token(TokenKind::User));
    assert_eq!(principal.user_id.as_deref(), Some(t.user_id.as_str()));
    assert_eq!(principal.organization_ids(), vec![t.org_id.clone()]);

    // The secret appears nowhere in the database.
    let dump: Vec<String> = sqlx::query_scalar("SELECT row_to_json(t)::text FROM tokens t")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(
        !dump.iter().any(|row| row.contains(&t.user_token)),
        "token stored in clear"
    );
    let listed = tokens::list(
        &db.pool,
        &TokenFilter {
            user_id: Some(t.user_id.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(t.user_token.starts_with(&listed[0].display_prefix));
}

#[tokio::test]
async fn revoked_tokens_are_refused_even_when_cached() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let auth = Arc::new(authenticator(&db));
    // The same replica caches the token, then revokes it through the domain: the next
    // request must be refused at once, with nothing clearing the cache by hand.
    let owner = auth
        .authenticate(Some(&bearer(&t.user_token)))
        .await
        .unwrap();
    let tokens = Tokens::new(db.pool.clone(), auth.clone(), Duration::from_secs(60));
    let id = tokens
        .list(
            &operator(),
            &TokenFilter {
                user_id: Some(t.user_id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap()[0]
        .id
        .clone();
    assert!(tokens.revoke(&owner, None, &id).await.unwrap(), "revoked");
    let err = auth
        .authenticate(Some(&bearer(&t.user_token)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unauthenticated(m) if m.contains("revoked")),
        "{err:?}"
    );
    assert!(
        !tokens.revoke(&operator(), None, &id).await.unwrap(),
        "second revoke is a no-op"
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'token.revoke' AND target_id = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
}

#[tokio::test]
async fn revocation_reaches_another_replica_through_notify() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    // "Replica B": its own authenticator and LISTEN connection.
    let (replica_b, cancel) = common::listening_authenticator(&db, &[]).await;
    replica_b
        .authenticate(Some(&bearer(&t.user_token)))
        .await
        .unwrap();

    // Replica A revokes; B has the token cached and must drop it on the notification.
    let id = tokens::list(
        &db.pool,
        &TokenFilter {
            user_id: Some(t.user_id.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap()[0]
        .id
        .clone();
    // "Replica A": its own authenticator and domain.
    let replica_a = Arc::new(authenticator(&db));
    Tokens::new(db.pool.clone(), replica_a, Duration::from_secs(60))
        .revoke(&operator(), None, &id)
        .await
        .unwrap();
    wait_for(
        "replica B to refuse the revoked token",
        Duration::from_secs(10),
        || {
            let b = replica_b.clone();
            let token = t.user_token.clone();
            async move { b.authenticate(Some(&bearer(&token))).await.is_err() }
        },
    )
    .await;
    cancel.cancel();
}

#[tokio::test]
async fn expired_tokens_are_refused_with_the_time() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let mut new = NewToken::new(TokenKind::Organization, "short");
    new.organization_id = Some(t.org_id.clone());
    new.expires_at = Some(Utc::now() + chrono::Duration::seconds(60));
    let (info, secret) = common::domain(&db.pool)
        .tokens
        .create(&operator(), new)
        .await
        .unwrap();
    // Expired in the database before this replica ever saw it: the load refuses it.
    sqlx::query("UPDATE tokens SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(&info.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let err = authenticator(&db)
        .authenticate(Some(&bearer(&secret)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unauthenticated(m) if m.contains("expired at")),
        "{err:?}"
    );
}

#[tokio::test]
async fn cached_principal_expires_at_its_expiry_time() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let mut new = NewToken::new(TokenKind::Organization, "short");
    new.organization_id = Some(t.org_id.clone());
    new.expires_at = Some(Utc::now() + chrono::Duration::milliseconds(1500));
    let (_, secret) = common::domain(&db.pool)
        .tokens
        .create(&operator(), new)
        .await
        .unwrap();
    let auth = Arc::new(authenticator(&db));
    auth.authenticate(Some(&bearer(&secret))).await.unwrap();
    wait_for(
        "the cached token to expire",
        Duration::from_secs(10),
        || {
            let auth = auth.clone();
            let secret = secret.clone();
            async move { auth.authenticate(Some(&bearer(&secret))).await.is_err() }
        },
    )
    .await;
}

#[tokio::test]
async fn unknown_and_malformed_tokens_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    let auth = authenticator(&db);
    let err = auth
        .authenticate(Some(b"Bearer kiln_u_doesnotexist"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unauthenticated(m) if m.contains("unknown token")),
        "{err:?}"
    );
    assert!(
        auth.authenticate(Some(b"Basic dXNlcjpwYXNz"))
            .await
            .is_err()
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tokens")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn last_use_is_recorded_in_batches() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let auth = authenticator(&db);
    for _ in 0..5 {
        auth.authenticate(Some(&bearer(&t.user_token)))
            .await
            .unwrap();
    }
    assert_eq!(
        auth.flush_last_used().await.unwrap(),
        1,
        "one token touched, one write"
    );
    let last_used: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM tokens WHERE user_id = $1")
            .bind(&t.user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(last_used.is_some());
    assert_eq!(auth.flush_last_used().await.unwrap(), 0);
}

#[tokio::test]
async fn token_scopes_cannot_exceed_the_kind() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let mut new = NewToken::new(TokenKind::Pull, "too much");
    new.organization_id = Some(t.org_id.clone());
    new.project_id = Some(t.project.id.clone());
    new.scopes = Some(kiln::auth::Scopes::of(&[kiln::auth::Scope::CacheWrite]));
    let err = common::domain(&db.pool)
        .tokens
        .create(&operator(), new)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
}
