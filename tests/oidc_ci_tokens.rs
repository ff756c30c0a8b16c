//! CI providers' OIDC tokens as credentials: verified against the issuer's discovered key
//! set (cached, refetched on an unknown kid), matched against projects' trust
//! relationships, and authorized in `authz`: a trusted job acts like a project token; a
//! fork pull request (Kiln's own issuer) may only start isolated builds.
mod common;

use common::ci_issuer::{CiIssuer, now};
use common::http::unary;
use common::{KEK_B64, TestDb, app_with, tenant};
use kiln::proto::depot::cli::v1 as cli;
use kiln::proto::depot::core::v1 as core;
use serde_json::{Value, json};

fn github_claims(repository: &str, id: &str) -> Value {
    let owner = repository.split('/').next().unwrap();
    json!({
        "sub": format!("repo:{repository}:ref:refs/heads/main"),
        "repository": repository, "repository_id": id, "repository_owner": owner,
        "ref": "refs/heads/main", "event_name": "push",
    })
}

async fn trust_github(
    router: &axum::Router,
    token: &str,
    project: &str,
    owner: &str,
    repo: &str,
    id: &str,
) {
    unary::<_, core::AddTrustPolicyResponse>(
        router,
        "depot.core.v1.ProjectService/AddTrustPolicy",
        token,
        &core::AddTrustPolicyRequest {
            project_id: project.into(),
            provider: Some(core::add_trust_policy_request::Provider::Github(
                core::trust_policy::GitHub {
                    repository_owner: owner.into(),
                    repository: repo.into(),
                    repository_id: id.into(),
                    ..Default::default()
                },
            )),
        },
    )
    .await
    .unwrap();
}

async fn create_build(
    router: &axum::Router,
    token: &str,
    project: &str,
) -> Result<cli::CreateBuildResponse, Value> {
    unary(
        router,
        "depot.cli.v1.BuildService/CreateBuild",
        token,
        &cli::CreateBuildRequest {
            project_id: Some(project.into()),
            ..Default::default()
        },
    )
    .await
}

fn code(err: &Value) -> &str {
    err["code"].as_str().unwrap_or("")
}

fn message(err: &Value) -> &str {
    err["message"].as_str().unwrap_or("")
}

/// A database, a stand-in GitHub Actions issuer Kiln trusts, the app and its router.
async fn with_github(single_use: bool) -> (TestDb, CiIssuer, kiln::app::AppState, axum::Router) {
    let db = TestDb::new().await;
    let issuer = CiIssuer::start().await;
    let trusted = issuer.trusted_as("github", single_use);
    let app = app_with(&db, &[("KILN_OIDC__TRUSTED_ISSUERS", &trusted)]);
    let router = kiln::api::router(app.clone());
    (db, issuer, app, router)
}

#[tokio::test]
async fn a_github_actions_token_acts_for_the_projects_that_trust_its_repository() {
    let (db, issuer, _, router) = with_github(true).await;
    let t = tenant(&db.pool, "ci").await;
    let other = tenant(&db.pool, "other").await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "Octo-Org",
        "octo-repo",
        "",
    )
    .await;

    // Project-token rights in the trusting project: list it, build in it, reset its cache.
    let listed: core::ListProjectsResponse = unary(
        &router,
        "depot.core.v1.ProjectService/ListProjects",
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &core::ListProjectsRequest {},
    )
    .await
    .unwrap();
    assert_eq!(
        listed
            .projects
            .iter()
            .map(|p| p.project_id.as_str())
            .collect::<Vec<_>>(),
        vec![t.project.id.as_str()]
    );
    let token = issuer.token(github_claims("octo-org/octo-repo", "74"));
    let build = create_build(&router, &token, &t.project.id).await.unwrap();
    let ephemeral: bool = sqlx::query_scalar("SELECT ephemeral_cache FROM builds WHERE id = $1")
        .bind(&build.build_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!ephemeral, "a trusted job builds with the project's cache");
    unary::<_, core::ResetProjectResponse>(
        &router,
        "depot.core.v1.ProjectService/ResetProject",
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &core::ResetProjectRequest {
            project_id: t.project.id.clone(),
        },
    )
    .await
    .unwrap();
    // An empty project id means the one project that trusts the job.
    let own: cli::CreateBuildResponse = unary(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &cli::CreateBuildRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(own.project_id, t.project.id);

    // Single use: the same token twice is a replay.
    let err = create_build(&router, &token, &t.project.id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), "unauthenticated", "{err}");
    assert!(message(&err).contains("already used"), "{err}");

    // Nothing outside the trusting project, and no tokens or settings.
    let err = create_build(
        &router,
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &other.project.id,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "not_found", "{err}");
    assert!(
        message(&err).contains("no trust relationship for GitHub repository octo-org/octo-repo"),
        "{err}"
    );
    let err = unary::<_, core::CreateTokenResponse>(
        &router,
        "depot.core.v1.ProjectService/CreateToken",
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &core::CreateTokenRequest {
            project_id: t.project.id.clone(),
            description: "from CI".into(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "permission_denied", "{err}");

    // Another repository, even one whose name starts the same, is not trusted.
    for repository in ["octo-org/octo-repo-2", "evil/octo-repo"] {
        let err = create_build(
            &router,
            &issuer.token(github_claims(repository, "9")),
            &t.project.id,
        )
        .await
        .unwrap_err();
        assert_eq!(code(&err), "not_found", "{repository}: {err}");
    }
    // The key set was fetched once for all of these.
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn a_trust_relationship_can_pin_the_repository_id() {
    let (db, issuer, _, router) = with_github(false).await;
    let t = tenant(&db.pool, "pin").await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "octo-org",
        "octo-repo",
        "74",
    )
    .await;
    create_build(
        &router,
        &issuer.token(github_claims("octo-org/octo-repo", "74")),
        &t.project.id,
    )
    .await
    .unwrap();
    // The name deleted and re-created by someone else: a new id.
    let err = create_build(
        &router,
        &issuer.token(github_claims("octo-org/octo-repo", "7400")),
        &t.project.id,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "not_found", "{err}");
    // Not single use for this issuer: the same token works twice (GitLab and CircleCI
    // hand one token to every command of a job).
    let token = issuer.token(github_claims("octo-org/octo-repo", "74"));
    create_build(&router, &token, &t.project.id).await.unwrap();
    create_build(&router, &token, &t.project.id).await.unwrap();
}

async fn add_gitlab_policy(
    router: &axum::Router,
    token: &str,
    project: &str,
    issuer: &str,
) -> Result<core::AddTrustPolicyResponse, Value> {
    unary(
        router,
        "depot.core.v1.ProjectService/AddTrustPolicy",
        token,
        &core::AddTrustPolicyRequest {
            project_id: project.into(),
            provider: Some(core::add_trust_policy_request::Provider::Gitlab(
                core::trust_policy::GitLab {
                    project_path: "group/app".into(),
                    r#ref: String::new(),
                    issuer: issuer.into(),
                },
            )),
        },
    )
    .await
}

#[tokio::test]
async fn a_trust_relationship_trusts_one_issuer_and_a_same_named_project_elsewhere_is_refused() {
    let db = TestDb::new().await;
    let ours = CiIssuer::start().await;
    let theirs = CiIssuer::start().await;
    let trusted = format!(
        "[{{provider=\"gitlab\", issuer=\"{}\", single_use=false}}, {{provider=\"gitlab\", issuer=\"{}\", single_use=false}}]",
        ours.url, theirs.url
    );
    let app = app_with(&db, &[("KILN_OIDC__TRUSTED_ISSUERS", &trusted)]);
    let router = kiln::api::router(app);
    let t = tenant(&db.pool, "gitlab").await;
    // With two GitLabs trusted, a policy must say which one it means.
    let err = add_gitlab_policy(&router, &t.user_token, &t.project.id, "")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "invalid_argument", "{err}");
    assert!(message(&err).contains("several gitlab issuers"), "{err}");
    let err = add_gitlab_policy(&router, &t.user_token, &t.project.id, "https://gitlab.evil")
        .await
        .unwrap_err();
    assert!(
        message(&err).contains("not a gitlab issuer this server trusts"),
        "{err}"
    );
    let added = add_gitlab_policy(&router, &t.user_token, &t.project.id, &ours.url)
        .await
        .unwrap();
    match added.trust_policy.unwrap().provider {
        Some(core::trust_policy::Provider::Gitlab(g)) => assert_eq!(g.issuer, ours.url),
        other => panic!("{other:?}"),
    }
    // The same project path on our GitLab builds; on the other GitLab it is refused.
    let claims = json!({"project_path": "group/app", "ref": "main"});
    create_build(&router, &ours.token(claims.clone()), &t.project.id)
        .await
        .unwrap();
    let err = create_build(&router, &theirs.token(claims), &t.project.id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), "not_found", "{err}");
    assert!(message(&err).contains("no trust relationship"), "{err}");
}

#[tokio::test]
async fn a_thousand_foreign_policies_naming_the_victims_repository_change_nothing_for_it() {
    let (db, issuer, app, router) = with_github(false).await;
    let victim = tenant(&db.pool, "victim").await;
    let intruder = tenant(&db.pool, "intruder").await;
    trust_github(
        &router,
        &victim.user_token,
        &victim.project.id,
        "octo-org",
        "octo-repo",
        "",
    )
    .await;
    // Ten projects of another organization, each sorting before the victim's, with 100
    // policies naming the victim's repository: 1,000 rows.
    let mut foreign = Vec::new();
    for n in 0.. {
        if foreign.len() == 10 {
            break;
        }
        let p = common::project(&db.pool, &intruder.org_id, &format!("squat-{n}")).await;
        if p.id < victim.project.id {
            foreign.push(p);
        } else {
            app.projects
                .delete(&common::operator(), Some(&p.id))
                .await
                .unwrap();
        }
    }
    for project in &foreign {
        for n in 0..100 {
            let id = if n == 0 { String::new() } else { n.to_string() };
            trust_github(
                &router,
                &intruder.user_token,
                &project.id,
                "octo-org",
                "octo-repo",
                &id,
            )
            .await;
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM trust_policies")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1001);
    // A project trusts an identity once: the same policy again is refused.
    let err = unary::<_, core::AddTrustPolicyResponse>(
        &router,
        "depot.core.v1.ProjectService/AddTrustPolicy",
        &intruder.user_token,
        &core::AddTrustPolicyRequest {
            project_id: foreign[0].id.clone(),
            provider: Some(core::add_trust_policy_request::Provider::Github(
                core::trust_policy::GitHub {
                    repository_owner: "Octo-Org".into(),
                    repository: "octo-repo".into(),
                    repository_id: "7".into(),
                    ..Default::default()
                },
            )),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "already_exists", "{err}");

    // The victim's CI still builds in the project it names.
    let token = || issuer.token(github_claims("octo-org/octo-repo", "74"));
    let build = create_build(&router, &token(), &victim.project.id)
        .await
        .unwrap();
    assert!(!build.build_id.is_empty());
    // And when it names none, it builds where it last built, however many other
    // projects name its repository.
    let own: cli::CreateBuildResponse = unary(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &token(),
        &cli::CreateBuildRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(own.project_id, victim.project.id);
    // The intruder's projects trust the repository too, so the job may build there if it
    // names one; that never changes where the victim's job goes by default.
    create_build(&router, &token(), &foreign[3].id)
        .await
        .unwrap();
    let again: cli::CreateBuildResponse = unary(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &token(),
        &cli::CreateBuildRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        again.project_id, foreign[3].id,
        "the job's own last build decides"
    );
}

#[tokio::test]
async fn a_ci_job_that_never_built_here_names_its_project_once() {
    let (db, issuer, _, router) = with_github(false).await;
    let t = tenant(&db.pool, "first").await;
    let squatter = tenant(&db.pool, "squatter").await;
    // Another organization trusted the repository before its owner did.
    trust_github(
        &router,
        &squatter.user_token,
        &squatter.project.id,
        "octo-org",
        "octo-repo",
        "",
    )
    .await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "octo-org",
        "octo-repo",
        "",
    )
    .await;
    let token = || issuer.token(github_claims("octo-org/octo-repo", "74"));
    let unnamed = || {
        let router = router.clone();
        let token = token();
        async move {
            unary::<_, cli::CreateBuildResponse>(
                &router,
                "depot.cli.v1.BuildService/CreateBuild",
                &token,
                &cli::CreateBuildRequest::default(),
            )
            .await
        }
    };
    // Its first build without a project is not sent to whoever trusted it first.
    let err = unnamed().await.unwrap_err();
    assert_eq!(code(&err), "invalid_argument", "{err}");
    assert!(message(&err).contains("pass --project"), "{err}");
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 0);
    create_build(&router, &token(), &t.project.id)
        .await
        .unwrap();
    assert_eq!(unnamed().await.unwrap().project_id, t.project.id);
    // Once the owner removes the trust, the remembered project is no default any more.
    let policies: core::ListTrustPoliciesResponse = unary(
        &router,
        "depot.core.v1.ProjectService/ListTrustPolicies",
        &t.user_token,
        &core::ListTrustPoliciesRequest {
            project_id: t.project.id.clone(),
        },
    )
    .await
    .unwrap();
    unary::<_, core::RemoveTrustPolicyResponse>(
        &router,
        "depot.core.v1.ProjectService/RemoveTrustPolicy",
        &t.user_token,
        &core::RemoveTrustPolicyRequest {
            project_id: t.project.id.clone(),
            trust_policy_id: policies.trust_policies[0].trust_policy_id.clone(),
        },
    )
    .await
    .unwrap();
    let err = unnamed().await.unwrap_err();
    assert_eq!(code(&err), "invalid_argument", "{err}");
}

#[tokio::test]
async fn a_spent_token_stays_spent_after_the_prune_for_as_long_as_it_verifies() {
    let (db, issuer, _, router) = with_github(true).await;
    let t = tenant(&db.pool, "ci").await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "octo-org",
        "octo-repo",
        "",
    )
    .await;
    // Expired 20 s ago: still inside the 60 s leeway, so it verifies.
    let mut claims = github_claims("octo-org/octo-repo", "74");
    claims["exp"] = json!(now() - 20);
    let token = issuer.token(claims);
    create_build(&router, &token, &t.project.id).await.unwrap();
    // The periodic prune forgets ids of tokens that can no longer be used; this one
    // still can for another 40 s.
    kiln::db::oidc_keys::forget_expired_jtis(&db.pool)
        .await
        .unwrap();
    let err = create_build(&router, &token, &t.project.id)
        .await
        .unwrap_err();
    assert_eq!(code(&err), "unauthenticated", "{err}");
    assert!(message(&err).contains("already used"), "{err}");
}

/// An issuer that is down: every request is counted and answered 503, slowly enough
/// that a burst of callers overlaps it.
async fn failing_issuer() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let router = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, hits)
}

#[tokio::test]
async fn a_burst_of_forged_tokens_naming_an_unreachable_issuer_costs_one_fetch() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new().await;
    let (url, hits) = failing_issuer().await;
    let trusted = format!("[{{provider=\"gitlab\", issuer=\"{url}\", single_use=false}}]");
    let app = app_with(&db, &[("KILN_OIDC__TRUSTED_ISSUERS", &trusted)]);
    let router = kiln::api::router(app);
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let forged = |n: usize| {
        format!(
            "{}.{}.{}",
            b64(json!({"alg": "RS256", "kid": format!("k{n}")})),
            b64(json!({"iss": url, "aud": "https://depot.dev", "project_path": "g/p"})),
            b64(json!("not a signature"))
        )
    };
    let burst = |from: usize| {
        let router = router.clone();
        let calls = (from..from + 50).map(move |n| {
            let router = router.clone();
            let token = forged(n);
            async move {
                unary::<_, core::ListProjectsResponse>(
                    &router,
                    "depot.core.v1.ProjectService/ListProjects",
                    &token,
                    &core::ListProjectsRequest {},
                )
                .await
                .unwrap_err()
            }
        });
        futures_util::future::join_all(calls)
    };
    for err in burst(0).await {
        assert_eq!(code(&err), "unavailable", "{err}");
        assert!(message(&err).contains("could not be loaded"), "{err}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "one fetch for fifty tokens");
    // Right after the failure, more tokens cost no fetch at all.
    for err in burst(50).await {
        assert_eq!(code(&err), "unavailable", "{err}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_ci_tokens_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let issuer = CiIssuer::start().await;
    let trusted = issuer.trusted_as("github", true);
    let app = app_with(
        &db,
        &[
            ("KILN_OIDC__TRUSTED_ISSUERS", &trusted),
            ("KILN_OIDC__JWKS_REFRESH_MIN_SECONDS", "0"),
        ],
    );
    let router = kiln::api::router(app);
    let t = tenant(&db.pool, "bad").await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "octo-org",
        "octo-repo",
        "",
    )
    .await;
    let good = github_claims("octo-org/octo-repo", "74");
    let with = |extra: Value| {
        let mut claims = good.clone();
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        issuer.token(claims)
    };
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let payload = b64(
        json!({"iss": issuer.url, "aud": "https://depot.dev", "repository": "octo-org/octo-repo",
        "iat": now(), "nbf": now(), "exp": now() + 300, "jti": "x"}),
    );
    let alg_none = format!("{}.{payload}.", b64(json!({"alg": "none", "typ": "JWT"})));
    let hs256 = {
        let key = jsonwebtoken::EncodingKey::from_secret(issuer.public_n().as_bytes());
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &payload)
                .unwrap(),
        )
        .unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let mut tampered = with(json!({}));
    let parts: Vec<&str> = tampered.split('.').collect();
    tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(
            json!({"iss": issuer.url, "aud": "https://depot.dev", "repository": "octo-org/octo-repo",
            "iat": now(), "exp": now() + 300, "jti": "y"})
        ),
        parts[2]
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "algorithm is \"none\""),
        ("HS256 with the public key", hs256, "algorithm is \"HS256\""),
        (
            "wrong audience",
            with(json!({"aud": "https://evil.example"})),
            "audience",
        ),
        (
            "expired",
            with(json!({"iat": now() - 900, "nbf": now() - 900, "exp": now() - 600})),
            "expired",
        ),
        (
            "not yet valid",
            with(json!({"nbf": now() + 600})),
            "not valid yet",
        ),
        (
            "issued in the future",
            with(json!({"iat": now() + 600})),
            "issued in the future",
        ),
        (
            "no jti on a single-use issuer",
            with(json!({"jti": null})),
            "jti",
        ),
        ("tampered payload", tampered, "signature does not verify"),
        (
            "an unknown issuer",
            with(json!({"iss": "https://token.evil.example"})),
            "not accepted here",
        ),
        (
            "an oversized token",
            format!("eyJ{}.{}.x", "A".repeat(9000), "B"),
            "bytes",
        ),
        (
            "no repository claim",
            with(json!({"repository": null})),
            "repository claim",
        ),
    ];
    for (what, token, says) in cases {
        let err = create_build(&router, &token, &t.project.id)
            .await
            .unwrap_err();
        assert_eq!(code(&err), "unauthenticated", "{what}: {err}");
        assert!(message(&err).contains(says), "{what}: {err}");
    }
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 0, "no refused token started anything");

    // A rotated key: the unknown kid makes Kiln fetch the key set again, once.
    let before = issuer.jwks_fetches();
    issuer.rotate();
    create_build(&router, &with(json!({})), &t.project.id)
        .await
        .unwrap();
    create_build(&router, &with(json!({})), &t.project.id)
        .await
        .unwrap();
    assert_eq!(issuer.jwks_fetches(), before + 1);
    // A kid nobody publishes costs a refetch at most once per refresh interval, and fails.
    let forged = {
        let good = with(json!({}));
        let parts: Vec<&str> = good.split('.').collect();
        format!(
            "{}.{}.{}",
            b64(json!({"alg": "RS256", "typ": "JWT", "kid": "nobody"})),
            parts[1],
            parts[2]
        )
    };
    let err = create_build(&router, &forged, &t.project.id)
        .await
        .unwrap_err();
    assert!(message(&err).contains("no published key"), "{err}");
}

#[tokio::test]
async fn a_fork_pull_request_token_only_starts_isolated_builds_in_the_trusting_project() {
    let db = TestDb::new().await;
    let app = app_with(&db, &[("KILN_SECRETS__KEY_ENCRYPTION_KEY", KEK_B64)]);
    let router = kiln::api::router(app.clone());
    let t = tenant(&db.pool, "fork").await;
    let other = tenant(&db.pool, "other").await;
    trust_github(
        &router,
        &t.user_token,
        &t.project.id,
        "octo-org",
        "octo-repo",
        "74",
    )
    .await;
    let fork_token = || {
        let app = app.clone();
        async move {
            let claims = json!({
                "sub": "repo:octo-org/octo-repo:pull_request",
                "repository": "octo-org/octo-repo", "repository_id": "74",
                "repository_owner": "octo-org", "head_repository": "fork-user/octo-repo",
                "event_name": "pull_request",
            });
            app.oidc
                .mint("https://depot.dev", claims.as_object().unwrap().clone())
                .await
                .unwrap()
                .token
        }
    };

    let build = create_build(&router, &fork_token().await, &t.project.id)
        .await
        .unwrap();
    let (ephemeral, created_by): (bool, Option<String>) =
        sqlx::query_as("SELECT ephemeral_cache, created_by FROM builds WHERE id = $1")
            .bind(&build.build_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        ephemeral,
        "a fork's build gets an ephemeral builder and cache volume"
    );
    assert!(created_by.unwrap().starts_with("oidc:"));
    // A fork pull request names its project: anyone can open one, so nothing it did
    // before decides where it builds.
    let err = unary::<_, cli::CreateBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &fork_token().await,
        &cli::CreateBuildRequest::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "invalid_argument", "{err}");
    assert!(message(&err).contains("must name its project"), "{err}");

    // Nothing else: no cache reset, no settings, no tokens, no reading builds or projects.
    let denied: Vec<(&str, Result<(), Value>)> = vec![
        (
            "reset the cache",
            unary::<_, core::ResetProjectResponse>(
                &router,
                "depot.core.v1.ProjectService/ResetProject",
                &fork_token().await,
                &core::ResetProjectRequest {
                    project_id: t.project.id.clone(),
                },
            )
            .await
            .map(drop),
        ),
        (
            "change settings",
            unary::<_, core::UpdateProjectResponse>(
                &router,
                "depot.core.v1.ProjectService/UpdateProject",
                &fork_token().await,
                &core::UpdateProjectRequest {
                    project_id: t.project.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        ),
        (
            "list tokens",
            unary::<_, core::ListTokensResponse>(
                &router,
                "depot.core.v1.ProjectService/ListTokens",
                &fork_token().await,
                &core::ListTokensRequest {
                    project_id: t.project.id.clone(),
                },
            )
            .await
            .map(drop),
        ),
        (
            "list projects",
            unary::<_, core::ListProjectsResponse>(
                &router,
                "depot.core.v1.ProjectService/ListProjects",
                &fork_token().await,
                &core::ListProjectsRequest {},
            )
            .await
            .map(drop),
        ),
        (
            "read its build",
            unary::<_, cli::GetBuildResponse>(
                &router,
                "depot.cli.v1.BuildService/GetBuild",
                &fork_token().await,
                &cli::GetBuildRequest {
                    build_id: build.build_id.clone(),
                },
            )
            .await
            .map(drop),
        ),
        (
            "mint a pull token",
            unary::<_, cli::GetPullTokenResponse>(
                &router,
                "depot.cli.v1.BuildService/GetPullToken",
                &fork_token().await,
                &cli::GetPullTokenRequest {
                    project_id: Some(t.project.id.clone()),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        ),
        (
            "build in a project that does not trust it",
            create_build(&router, &fork_token().await, &other.project.id)
                .await
                .map(drop),
        ),
    ];
    for (what, result) in denied {
        let err = result.expect_err(what);
        assert!(
            matches!(code(&err), "permission_denied" | "not_found"),
            "{what}: {err}"
        );
    }
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 1);
    // A fork token is single use, like every token of Kiln's issuer.
    let token = fork_token().await;
    create_build(&router, &token, &t.project.id).await.unwrap();
    let err = create_build(&router, &token, &t.project.id)
        .await
        .unwrap_err();
    assert!(message(&err).contains("already used"), "{err}");
}

#[tokio::test]
async fn gitlab_circleci_and_buildkite_identities_match_their_policies() {
    let db = TestDb::new().await;
    let gitlab = CiIssuer::start().await;
    let circleci = CiIssuer::start().await;
    let buildkite = CiIssuer::start().await;
    let trusted = format!(
        "[{{provider=\"gitlab\", issuer=\"{}\", single_use=false}}, {{provider=\"circleci\", issuer=\"{}\", single_use=false}}, {{provider=\"buildkite\", issuer=\"{}\"}}]",
        gitlab.url, circleci.url, buildkite.url
    );
    let app = app_with(&db, &[("KILN_OIDC__TRUSTED_ISSUERS", &trusted)]);
    let router = kiln::api::router(app);
    let t = tenant(&db.pool, "providers").await;
    for provider in [
        core::add_trust_policy_request::Provider::Gitlab(core::trust_policy::GitLab {
            project_path: "group/app".into(),
            r#ref: "main".into(),
            ..Default::default()
        }),
        core::add_trust_policy_request::Provider::Circleci(core::trust_policy::CircleCi {
            organization_uuid: "0e1f-org".into(),
            project_uuid: "77aa-project".into(),
            ..Default::default()
        }),
        core::add_trust_policy_request::Provider::Buildkite(core::trust_policy::Buildkite {
            organization_slug: "acme".into(),
            pipeline_slug: "web".into(),
            ..Default::default()
        }),
    ] {
        unary::<_, core::AddTrustPolicyResponse>(
            &router,
            "depot.core.v1.ProjectService/AddTrustPolicy",
            &t.user_token,
            &core::AddTrustPolicyRequest {
                project_id: t.project.id.clone(),
                provider: Some(provider),
            },
        )
        .await
        .unwrap();
    }
    let accepted = [
        gitlab.token(json!({"project_path": "group/app", "ref": "main", "sub": "project_path:group/app:ref_type:branch:ref:main"})),
        circleci.token(json!({"sub": "org/0e1f-org/project/77aa-project/user/u1", "nbf": null})),
        buildkite.token(json!({"organization_slug": "acme", "pipeline_slug": "web", "sub": "organization:acme:pipeline:web"})),
    ];
    for token in accepted {
        create_build(&router, &token, &t.project.id).await.unwrap();
    }
    let refused = [
        gitlab.token(json!({"project_path": "group/app", "ref": "feature"})),
        gitlab.token(json!({"project_path": "group/other", "ref": "main"})),
        circleci.token(json!({"sub": "org/0e1f-org/project/other/user/u1"})),
        buildkite.token(json!({"organization_slug": "acme", "pipeline_slug": "api"})),
        // A GitLab token whose claims name a GitHub repository matches no GitHub policy.
        gitlab.token(
            json!({"project_path": "octo-org/octo-repo", "repository": "octo-org/octo-repo"}),
        ),
    ];
    for token in refused {
        let err = create_build(&router, &token, &t.project.id)
            .await
            .unwrap_err();
        assert_eq!(code(&err), "not_found", "{err}");
    }
}

#[tokio::test]
async fn trust_relationships_are_managed_over_rest_too() {
    use common::http::request;
    let db = TestDb::new().await;
    let app = app_with(&db, &[]);
    let router = kiln::api::router(app);
    let t = tenant(&db.pool, "rest").await;
    let base = format!("/api/v1/projects/{}/trust-policies", t.project.id);
    let added = request(
        &router,
        "POST",
        &base,
        Some(&t.user_token),
        Some(json!({"provider": "github", "repository_owner": "octo-org", "repository": "octo-repo", "repository_id": "74"})),
    )
    .await;
    assert_eq!(added.status, 201, "{:?}", added.json_or_text());
    let policy = added.json()["trust_policy"].clone();
    assert_eq!(policy["provider"], "github");
    assert_eq!(policy["repository_id"], "74");
    let id = policy["id"].as_str().unwrap().to_string();
    for (bad, says) in [
        (
            json!({"provider": "github", "repository_owner": "octo-org", "repository": "octo-org/octo-repo"}),
            "without its owner",
        ),
        (
            json!({"provider": "github", "repository_owner": "octo-org", "repository": "r", "repository_id": "abc"}),
            "numeric",
        ),
        (
            json!({"provider": "jenkins", "url": "x"}),
            "unknown variant",
        ),
        (json!({"provider": "gitlab"}), "project_path"),
    ] {
        let reply = request(
            &router,
            "POST",
            &base,
            Some(&t.user_token),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(reply.status, 400, "{bad}");
        let text = reply.json_or_text().to_string();
        assert!(text.contains(says), "{bad}: {text}");
    }
    let listed = request(&router, "GET", &base, Some(&t.user_token), None).await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["trust_policies"].as_array().unwrap().len(), 1);
    let removed = request(
        &router,
        "DELETE",
        &format!("{base}/{id}"),
        Some(&t.user_token),
        None,
    )
    .await;
    assert_eq!(removed.status, 204);
    let again = request(
        &router,
        "DELETE",
        &format!("{base}/{id}"),
        Some(&t.user_token),
        None,
    )
    .await;
    assert_eq!(again.status, 404);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action IN ('trust_policy.add', 'trust_policy.remove')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audited, 2);
}
