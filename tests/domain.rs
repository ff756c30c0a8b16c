//! The one domain layer: the same rules whichever transport calls it, each write with its
//! audit entry in one transaction, and the defects the hardening review found.
mod common;

use std::time::Duration;

use axum::http::StatusCode;
use kiln::auth::TokenKind;
use kiln::proto::depot::cli::v1 as cli;
use kiln::proto::depot::cli::v1beta1 as cli_beta;
use kiln::proto::depot::core::v1 as core;
use serde_json::json;

use common::http::{rest, unary};
use common::{TestDb, app, project_token, tenant, wait_for};

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn pull_tokens_read_no_settings_and_mint_no_tokens() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let pull = project_token(&db.pool, &t.project, TokenKind::Pull).await;
    let tokens_before = count(&db, "SELECT count(*) FROM tokens").await;

    let (status, body) = rest(&router, "GET", "/api/v1/projects", Some(&pull), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("projects:read"),
        "{body}"
    );
    let (status, _) = rest(
        &router,
        "GET",
        &format!("/api/v1/projects/{}", t.project.id),
        Some(&pull),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = rest(&router, "GET", "/api/v1/organizations", Some(&pull), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let err = unary::<_, core::ListProjectsResponse>(
        &router,
        "depot.core.v1.ProjectService/ListProjects",
        &pull,
        &core::ListProjectsRequest {},
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "permission_denied", "{err}");
    let err = unary::<_, cli_beta::ListProjectsResponse>(
        &router,
        "depot.cli.v1beta1.ProjectsService/ListProjects",
        &pull,
        &cli_beta::ListProjectsRequest {},
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "permission_denied", "{err}");

    // `depot pull-token` with a pull token: refused, and nothing minted.
    let err = unary::<_, cli::GetPullTokenResponse>(
        &router,
        "depot.cli.v1.BuildService/GetPullToken",
        &pull,
        &cli::GetPullTokenRequest {
            project_id: Some(t.project.id.clone()),
            build_id: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "permission_denied", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("cannot mint"),
        "{err}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM tokens").await,
        tokens_before
    );

    // A project token still mints pull tokens for its own project, and that is audited.
    let project = project_token(&db.pool, &t.project, TokenKind::Project).await;
    let minted = unary::<_, cli::GetPullTokenResponse>(
        &router,
        "depot.cli.v1.BuildService/GetPullToken",
        &project,
        &cli::GetPullTokenRequest {
            project_id: None,
            build_id: None,
        },
    )
    .await
    .unwrap();
    assert!(minted.token.starts_with("kiln_pl_"));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_events
             WHERE action = 'token.create' AND details->>'kind' = 'pull' AND actor_kind = 'token'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn deleting_a_project_invalidates_its_tokens_on_every_replica() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let project_tok = project_token(&db.pool, &t.project, TokenKind::Project).await;
    // Replica B caches tokens for five minutes and learns of changes only by NOTIFY.
    let (replica_b, cancel) =
        common::listening_authenticator(&db, &[("KILN_AUTH__TOKEN_CACHE_TTL_SECONDS", "300")])
            .await;
    replica_b
        .authenticate(Some(&bearer(&project_tok)))
        .await
        .unwrap();

    // Replica A deletes the project.
    let router_a = kiln::api::router(app(&db));
    let (status, body) = rest(
        &router_a,
        "DELETE",
        &format!("/api/v1/projects/{}", t.project.id),
        Some(&t.user_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_for(
        "replica B to refuse the deleted project's token",
        Duration::from_secs(5),
        || {
            let b = replica_b.clone();
            let token = project_tok.clone();
            async move { b.authenticate(Some(&bearer(&token))).await.is_err() }
        },
    )
    .await;
    // Other tokens keep working (re-read from the database).
    replica_b
        .authenticate(Some(&bearer(&t.user_token)))
        .await
        .unwrap();
    cancel.cancel();
}

#[tokio::test]
async fn deleting_a_project_drains_its_builders() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let machine = kiln::db::ids::new_id();
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, project_id, state, active_builds, serving)
         VALUES ($1, 'sim', 'amd64', $2, 'assigned', 1, true)",
    )
    .bind(&machine)
    .bind(&t.project.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let router = kiln::api::router(app(&db));
    let (status, _) = rest(
        &router,
        "DELETE",
        &format!("/api/v1/projects/{}", t.project.id),
        Some(&t.user_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Never a warm standby carrying the deleted project's cache to another project.
    let (state, project, active): (String, Option<String>, i32) =
        sqlx::query_as("SELECT state, project_id, active_builds FROM machines WHERE id = $1")
            .bind(&machine)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), project, active), ("draining", None, 0));
}

/// Installs a trigger that makes every audit insert fail.
async fn break_audit_log(db: &TestDb) {
    sqlx::query(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'audit log unavailable (test)'; END $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events
         FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_failed_audit_insert_rolls_the_write_back() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let project_tok = project_token(&db.pool, &t.project, TokenKind::Project).await;
    let token_id: String =
        sqlx::query_scalar("SELECT id FROM tokens WHERE kind = 'project' AND project_id = $1")
            .bind(&t.project.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let build = common::http::unary::<_, cli::CreateBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &project_tok,
        &cli::CreateBuildRequest {
            project_id: None,
            options: vec![],
            required_engine: None,
        },
    )
    .await
    .unwrap();
    // Creating a build is audited like every other write: who, which project, and the
    // build token's visible prefix.
    let (actor, details): (String, serde_json::Value) = sqlx::query_as(
        "SELECT actor_id, details FROM audit_events WHERE action = 'build.create' AND target_id = $1",
    )
    .bind(&build.build_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(actor, token_id);
    assert_eq!(details["project_id"], t.project.id.as_str());
    assert!(details["token_prefix"].as_str().is_some(), "{details}");
    let login = kiln::auth::login::start(&db.pool, Duration::from_secs(600), 100)
        .await
        .unwrap();
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(&t.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let snapshot = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT concat_ws('|',
                    (SELECT row_to_json(p)::text FROM projects p),
                    (SELECT count(*) FROM tokens WHERE revoked_at IS NULL),
                    (SELECT string_agg(name, ',' ORDER BY id) FROM tokens),
                    (SELECT count(*) FROM trust_policies),
                    (SELECT string_agg(cancels_at::text, ',') FROM builds),
                    (SELECT string_agg(coalesce(approved_by, '-'), ',') FROM login_requests),
                    (SELECT count(*) FROM jobs))",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = snapshot(&db).await;
    break_audit_log(&db).await;

    let project = format!("/api/v1/projects/{}", t.project.id);
    let user = Some(t.user_token.as_str());
    let attempts: Vec<(&str, StatusCode)> = vec![
        (
            "update project",
            rest(
                &router,
                "PATCH",
                &project,
                user,
                Some(json!({"cache_size_gb_amd64": 99})),
            )
            .await
            .0,
        ),
        (
            "delete project",
            rest(&router, "DELETE", &project, user, None).await.0,
        ),
        (
            "create token",
            rest(
                &router,
                "POST",
                &format!("{project}/tokens"),
                user,
                Some(json!({"name": "ci"})),
            )
            .await
            .0,
        ),
        (
            "revoke token",
            rest(
                &router,
                "DELETE",
                &format!("/api/v1/tokens/{token_id}"),
                user,
                None,
            )
            .await
            .0,
        ),
        (
            "cancel build",
            rest(
                &router,
                "POST",
                &format!("/api/v1/builds/{}/cancel", build.build_id),
                user,
                None,
            )
            .await
            .0,
        ),
    ];
    for (what, status) in attempts {
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{what}");
    }
    let connect: Vec<(&str, Result<(), serde_json::Value>)> = vec![
        (
            "add trust policy",
            unary::<_, core::AddTrustPolicyResponse>(
                &router,
                "depot.core.v1.ProjectService/AddTrustPolicy",
                &t.user_token,
                &core::AddTrustPolicyRequest {
                    project_id: t.project.id.clone(),
                    provider: Some(core::add_trust_policy_request::Provider::Github(
                        core::trust_policy::GitHub {
                            repository_owner: "acme".into(),
                            repository: "api".into(),
                            repository_id: String::new(),
                            ..Default::default()
                        },
                    )),
                },
            )
            .await
            .map(drop),
        ),
        (
            "create build",
            unary::<_, cli::CreateBuildResponse>(
                &router,
                "depot.cli.v1.BuildService/CreateBuild",
                &project_tok,
                &cli::CreateBuildRequest::default(),
            )
            .await
            .map(drop),
        ),
        (
            "rename token",
            unary::<_, core::UpdateTokenResponse>(
                &router,
                "depot.core.v1.ProjectService/UpdateToken",
                &t.user_token,
                &core::UpdateTokenRequest {
                    token_id: token_id.clone(),
                    description: "renamed".into(),
                },
            )
            .await
            .map(drop),
        ),
        (
            "reset cache",
            unary::<_, cli_beta::ResetProjectCacheResponse>(
                &router,
                "depot.cli.v1beta1.ProjectsService/ResetProjectCache",
                &t.user_token,
                &cli_beta::ResetProjectCacheRequest {
                    project_id: t.project.id.clone(),
                },
            )
            .await
            .map(drop),
        ),
    ];
    for (what, result) in connect {
        let err = result.expect_err(what);
        assert_eq!(err["code"], "internal", "{what}: {err}");
    }
    // Login approval.
    let form = format!(
        "email={}&password=a+long+password&decision=approve",
        email.replace('@', "%40")
    );
    let reply = common::http::post(
        &router,
        &format!("/login/{}", login.user_code),
        None,
        "application/x-www-form-urlencoded",
        form,
    )
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);

    assert_eq!(
        snapshot(&db).await,
        before,
        "a write survived its failed audit"
    );
}

#[tokio::test]
async fn connect_update_token_validates_names_and_audits() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let created = unary::<_, core::CreateTokenResponse>(
        &router,
        "depot.core.v1.ProjectService/CreateToken",
        &t.user_token,
        &core::CreateTokenRequest {
            project_id: t.project.id.clone(),
            description: "ci".into(),
        },
    )
    .await
    .unwrap();
    let rename = |name: String| {
        let router = router.clone();
        let req = core::UpdateTokenRequest {
            token_id: created.token_id.clone(),
            description: name,
        };
        let token = t.user_token.clone();
        async move {
            unary::<_, core::UpdateTokenResponse>(
                &router,
                "depot.core.v1.ProjectService/UpdateToken",
                &token,
                &req,
            )
            .await
        }
    };
    let err = rename("x".repeat(101)).await.unwrap_err();
    assert_eq!(err["code"], "invalid_argument", "{err}");
    let name: String = sqlx::query_scalar("SELECT name FROM tokens WHERE id = $1")
        .bind(&created.token_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(name, "ci", "a bad name changes nothing");
    rename("deploys".into()).await.unwrap();
    let audited: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM audit_events WHERE action = 'token.rename' AND target_id = $1",
    )
    .bind(&created.token_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audited, json!({"before": "ci", "after": "deploys"}));

    // Another organization's user finds no such token (ids don't leak).
    let stranger = tenant(&db.pool, "stranger").await;
    let err = unary::<_, core::DeleteTokenResponse>(
        &router,
        "depot.core.v1.ProjectService/DeleteToken",
        &stranger.user_token,
        &core::DeleteTokenRequest {
            token_id: created.token_id.clone(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "not_found", "{err}");
}

#[tokio::test]
async fn rest_and_connect_share_one_set_of_rules() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    // The same bad size is refused the same way by both transports.
    let (status, body) = rest(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", t.project.id),
        Some(&t.user_token),
        Some(json!({"cache_size_gb_amd64": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let connect_size = |gb: i32| {
        let router = router.clone();
        let request = core::UpdateProjectRequest {
            project_id: t.project.id.clone(),
            cache_policy: Some(core::CachePolicy {
                keep_gb: gb,
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = t.user_token.clone();
        async move {
            unary::<_, core::UpdateProjectResponse>(
                &router,
                "depot.core.v1.ProjectService/UpdateProject",
                &token,
                &request,
            )
            .await
        }
    };
    let err = connect_size(20_000).await.unwrap_err();
    assert_eq!(err["code"], "invalid_argument");
    assert_eq!(
        body["message"].as_str().unwrap().split(':').next(),
        err["message"].as_str().unwrap().split(':').next(),
        "{body} vs {err}"
    );
    // Both write the same audit entry for the same change.
    rest(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", t.project.id),
        Some(&t.user_token),
        Some(json!({"cache_size_gb_amd64": 70})),
    )
    .await;
    connect_size(80).await.unwrap();
    let sizes: Vec<i64> = sqlx::query_scalar(
        "SELECT (details->'after'->>'cache_size_gb_amd64')::bigint FROM audit_events
         WHERE action = 'project.update' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(sizes, vec![70, 80]);
    // An expiry out of range is refused for project tokens.
    let (status, _) = rest(
        &router,
        "POST",
        &format!("/api/v1/projects/{}/tokens", t.project.id),
        Some(&t.user_token),
        Some(json!({"name": "x", "expires_in_days": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn saving_an_image_is_refused_before_the_build_starts() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let err = unary::<_, cli::CreateBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &t.user_token,
        &cli::CreateBuildRequest {
            project_id: Some(t.project.id.clone()),
            options: vec![cli::BuildOptions {
                command: cli::Command::Build as i32,
                save: true,
                ..Default::default()
            }],
            required_engine: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "failed_precondition", "{err}");
    assert!(err["message"].as_str().unwrap().contains("--save"), "{err}");
    assert_eq!(count(&db, "SELECT count(*) FROM builds").await, 0);
}
