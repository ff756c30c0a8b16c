//! The Connect protocol layer and BuildService rules, in-process against real PostgreSQL.
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use kiln::auth::TokenKind;
use kiln::proto::depot::cli::v1 as pb;
use prost::Message;
use tower::ServiceExt;

use common::http::{post, unary};
use common::{TestDb, project_token, tenant};

async fn create_build(
    router: &axum::Router,
    token: &str,
    project: &str,
) -> pb::CreateBuildResponse {
    unary(
        router,
        "depot.cli.v1.BuildService/CreateBuild",
        token,
        &pb::CreateBuildRequest {
            project_id: Some(project.to_string()),
            options: vec![],
            required_engine: None,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn protocol_errors_are_connect_errors_and_change_nothing() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let token = Some(t.user_token.as_str());
    let path = "/depot.cli.v1.BuildService/CreateBuild";

    let bad = post(
        &router,
        path,
        token,
        "application/proto",
        vec![0xff, 0xff, 0xff],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["code"], "invalid_argument");

    let wrong_type = post(&router, path, token, "text/plain", "hi").await;
    assert_eq!(wrong_type.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(wrong_type.json()["code"], "invalid_argument");

    let unknown = post(
        &router,
        "/depot.cli.v1.BuildService/Nope",
        token,
        "application/proto",
        vec![],
    )
    .await;
    assert_eq!(unknown.json()["code"], "unimplemented");
    assert_eq!(unknown.status, StatusCode::NOT_IMPLEMENTED);

    let huge = post(
        &router,
        path,
        token,
        "application/proto",
        vec![0u8; 5 * 1024 * 1024],
    )
    .await;
    assert_eq!(huge.json()["code"], "resource_exhausted");

    let unauth = post(&router, path, None, "application/proto", vec![]).await;
    assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unauth.json()["code"], "unauthenticated");

    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 0, "bad requests created builds");
}

#[tokio::test]
async fn json_and_gzip_are_accepted() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let body = serde_json::json!({ "projectId": t.project.id, "options": [{ "command": "COMMAND_BUILD", "tags": ["x:1"] }] });
    let reply = post(
        &router,
        "/depot.cli.v1.BuildService/CreateBuild",
        Some(&t.user_token),
        "application/json",
        body.to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.content_type, "application/json");
    let json = reply.json();
    assert!(
        json["buildId"].as_str().is_some_and(|id| !id.is_empty()),
        "{json}"
    );
    assert!(json["buildToken"].as_str().unwrap().starts_with("kiln_b_"));

    // A gzip-compressed binary request.
    let req = pb::ListBuildsRequest {
        project_id: t.project.id.clone(),
        ..Default::default()
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &req.encode_to_vec()).unwrap();
    let compressed = gz.finish().unwrap();
    let request = Request::builder()
        .method("POST")
        .uri("/depot.cli.v1.BuildService/ListBuilds")
        .header(header::CONTENT_TYPE, "application/proto")
        .header(header::CONTENT_ENCODING, "gzip")
        .header(header::AUTHORIZATION, format!("Bearer {}", t.user_token))
        .header("connect-timeout-ms", "4999")
        .body(Body::from(compressed))
        .unwrap();
    let res = router.clone().oneshot(request).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let listed =
        pb::ListBuildsResponse::decode(res.into_body().collect().await.unwrap().to_bytes())
            .unwrap();
    assert_eq!(listed.builds.len(), 1);
}

#[tokio::test]
async fn build_tokens_and_project_tokens_stay_in_their_lane() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let b = tenant(&db.pool, "b").await;
    let router = kiln::api::router(common::app(&db));
    let first = create_build(&router, &a.user_token, &a.project.id).await;
    let second = create_build(&router, &a.user_token, &a.project.id).await;

    // The first build's token cannot finish the second build.
    let finish = pb::FinishBuildRequest {
        build_id: second.build_id.clone(),
        result: Some(pb::finish_build_request::Result::Success(Default::default())),
    };
    let err = unary::<_, pb::FinishBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/FinishBuild",
        &first.build_token,
        &finish,
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "permission_denied", "{err}");

    // Another organization's project token sees neither the build nor the cache.
    let foreign = project_token(&db.pool, &b.project, TokenKind::Project).await;
    let err = unary::<_, pb::FinishBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/FinishBuild",
        &foreign,
        &finish,
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "not_found");
    let reset = kiln::proto::depot::cli::v1beta1::ResetProjectCacheRequest {
        project_id: a.project.id.clone(),
    };
    let err = unary::<_, kiln::proto::depot::cli::v1beta1::ResetProjectCacheResponse>(
        &router,
        "depot.cli.v1beta1.ProjectsService/ResetProjectCache",
        &foreign,
        &reset,
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "not_found");
    let generation: i32 = sqlx::query_scalar("SELECT cache_generation FROM projects WHERE id = $1")
        .bind(&a.project.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(generation, 0);

    // A project token of the same org but another project may not build there either.
    let other_project = common::project(&db.pool, &a.org_id, "second").await;
    let scoped = project_token(&db.pool, &other_project, TokenKind::Project).await;
    let err = unary::<_, pb::CreateBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &scoped,
        &pb::CreateBuildRequest {
            project_id: Some(a.project.id.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "permission_denied");

    let reset_other = kiln::proto::depot::cli::v1beta1::ResetProjectCacheRequest {
        project_id: a.project.id.clone(),
    };
    let err = unary::<_, kiln::proto::depot::cli::v1beta1::ResetProjectCacheResponse>(
        &router,
        "depot.cli.v1beta1.ProjectsService/ResetProjectCache",
        &scoped,
        &reset_other,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err["code"], "permission_denied",
        "a project token reset another project's cache"
    );

    // The right token finishes its own build, once; a second finish changes nothing.
    let own = pb::FinishBuildRequest {
        build_id: first.build_id.clone(),
        result: Some(pb::finish_build_request::Result::Error(
            pb::finish_build_request::BuildError {
                error: "boom".into(),
            },
        )),
    };
    unary::<_, pb::FinishBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/FinishBuild",
        &first.build_token,
        &own,
    )
    .await
    .unwrap();
    let again = pb::FinishBuildRequest {
        build_id: first.build_id.clone(),
        result: Some(pb::finish_build_request::Result::Success(Default::default())),
    };
    unary::<_, pb::FinishBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/FinishBuild",
        &first.build_token,
        &again,
    )
    .await
    .unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(&first.build_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "failed");
}

#[tokio::test]
async fn an_empty_project_id_uses_the_project_token_or_is_not_found() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let scoped = project_token(&db.pool, &a.project, TokenKind::Project).await;
    let req = pb::CreateBuildRequest {
        project_id: Some(String::new()),
        ..Default::default()
    };
    let created: pb::CreateBuildResponse = unary(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &scoped,
        &req,
    )
    .await
    .unwrap();
    assert_eq!(created.project_id, a.project.id);
    let err = unary::<_, pb::CreateBuildResponse>(
        &router,
        "depot.cli.v1.BuildService/CreateBuild",
        &a.user_token,
        &req,
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "not_found");
}

#[tokio::test]
async fn status_stream_envelopes_are_stored_as_they_arrive() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let build = create_build(&router, &a.user_token, &a.project.id).await;
    use kiln::proto::moby::buildkit::v1 as bk;
    let message = pb::ReportStatusStreamRequest {
        build_id: build.build_id.clone(),
        statuses: vec![bk::StatusResponse {
            vertexes: vec![bk::Vertex {
                digest: "sha256:boot".into(),
                name: "[depot] launching amd64 machine".into(),
                started: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                completed: Some(prost_types::Timestamp {
                    seconds: 1_700_000_001,
                    nanos: 0,
                }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        stable_digests: Default::default(),
    };
    let frame = kiln::api::connect::codec::encode_envelope(0, &message.encode_to_vec());
    // One envelope, then the body errors out like an RST_STREAM from the CLI.
    let chunks = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(frame.to_vec()),
        Err(std::io::Error::other("stream reset")),
    ]);
    let request = Request::builder()
        .method("POST")
        .uri("/depot.cli.v1.BuildService/ReportStatusStream")
        .header(header::CONTENT_TYPE, "application/connect+proto")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", build.build_token),
        )
        .body(Body::from_stream(chunks))
        .unwrap();
    let _ = router
        .clone()
        .oneshot(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    let steps = kiln::db::builds::steps(&db.pool, &build.build_id)
        .await
        .unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].name, "[depot] launching amd64 machine");
    assert!(steps[0].completed_at.is_some());

    // A clean stream answers an empty message and an end-of-stream frame.
    let reply = post(
        &router,
        "/depot.cli.v1.BuildService/ReportStatusStream",
        Some(&build.build_token),
        "application/connect+proto",
        frame.to_vec(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/connect+proto");
    assert_eq!(&reply.body[..5], &[0, 0, 0, 0, 0]);
    assert_eq!(reply.body[5], 2);
    assert_eq!(&reply.body[10..], b"{}");
}

#[tokio::test]
async fn health_reports_carry_the_deadline_and_stale_builds_are_reaped() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let app = common::app(&db);
    let router = kiln::api::router(app.clone());
    let build = create_build(&router, &a.user_token, &a.project.id).await;
    let health = pb::ReportBuildHealthRequest {
        build_id: build.build_id.clone(),
        platform: pb::BuilderPlatform::Amd64 as i32,
    };
    let reply: pb::ReportBuildHealthResponse = unary(
        &router,
        "depot.cli.v1.BuildService/ReportBuildHealth",
        &build.build_token,
        &health,
    )
    .await
    .unwrap();
    let cancels_at = reply.cancels_at.unwrap().seconds;
    let expected = chrono::Utc::now().timestamp() + 60 * 60;
    assert!(
        (cancels_at - expected).abs() < 30,
        "the project's 60-minute timeout: {cancels_at} vs {expected}"
    );
    assert_eq!(app.builds.health.flush().await.unwrap(), 1);
    let seen: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_health_at FROM builds WHERE id = $1")
            .bind(&build.build_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(seen.is_some());

    // Cancelling from the dashboard moves the deadline to now; the next report says so.
    let cancel = Request::builder()
        .method("POST")
        .uri(format!("/api/v1/builds/{}/cancel", build.build_id))
        .header(header::AUTHORIZATION, format!("Bearer {}", a.user_token))
        .body(Body::empty())
        .unwrap();
    let res = router.clone().oneshot(cancel).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let reply: pb::ReportBuildHealthResponse = unary(
        &router,
        "depot.cli.v1.BuildService/ReportBuildHealth",
        &build.build_token,
        &health,
    )
    .await
    .unwrap();
    assert!(
        reply.cancels_at.unwrap().seconds <= chrono::Utc::now().timestamp(),
        "cancel not reported"
    );
    sqlx::query("UPDATE builds SET cancels_at = now() + interval '1 hour' WHERE id = $1")
        .bind(&build.build_id)
        .execute(&db.pool)
        .await
        .unwrap();

    let bad_platform = pb::ReportBuildHealthRequest {
        build_id: build.build_id.clone(),
        platform: 0,
    };
    let err = unary::<_, pb::ReportBuildHealthResponse>(
        &router,
        "depot.cli.v1.BuildService/ReportBuildHealth",
        &build.build_token,
        &bad_platform,
    )
    .await
    .unwrap_err();
    assert_eq!(err["code"], "invalid_argument");

    // Health goes quiet for longer than the timeout: the reaper fails the build.
    sqlx::query("UPDATE builds SET last_health_at = now() - interval '1 hour' WHERE id = $1")
        .bind(&build.build_id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(app.builds.reap_stale().await.unwrap(), 1);
    let state: String = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(&build.build_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "failed");
    // And the CLI is told to stop at once.
    let reply: pb::ReportBuildHealthResponse = unary(
        &router,
        "depot.cli.v1.BuildService/ReportBuildHealth",
        &build.build_token,
        &health,
    )
    .await
    .unwrap();
    assert!(reply.cancels_at.unwrap().seconds <= chrono::Utc::now().timestamp());
}

#[tokio::test]
async fn list_builds_pages_newest_first() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            create_build(&router, &a.user_token, &a.project.id)
                .await
                .build_id,
        );
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page: pb::ListBuildsResponse = unary(
            &router,
            "depot.cli.v1.BuildService/ListBuilds",
            &a.user_token,
            &pb::ListBuildsRequest {
                project_id: a.project.id.clone(),
                page_size: 2,
                page_token: page_token.clone(),
            },
        )
        .await
        .unwrap();
        assert!(page.builds.len() <= 2);
        seen.extend(page.builds.iter().map(|b| b.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn timings_contexts_pull_info_and_get_build() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let build = create_build(&router, &a.user_token, &a.project.id).await;
    let svc = "depot.cli.v1.BuildService";

    let got: pb::GetBuildResponse = unary(
        &router,
        &format!("{svc}/GetBuild"),
        &a.user_token,
        &pb::GetBuildRequest {
            build_id: build.build_id.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(got.project_id, a.project.id);
    assert!(got.build_url.contains(&build.build_id));

    let timings = pb::ReportTimingsRequest {
        build_id: build.build_id.clone(),
        build_steps: vec![pb::BuildStep {
            start_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            duration_ms: 1500,
            name: "RUN make".into(),
            stable_digest: Some("sha256:make".into()),
            cached: true,
            ..Default::default()
        }],
    };
    let _: pb::ReportTimingsResponse = unary(
        &router,
        &format!("{svc}/ReportTimings"),
        &build.build_token,
        &timings,
    )
    .await
    .unwrap();
    let steps = kiln::db::builds::steps(&db.pool, &build.build_id)
        .await
        .unwrap();
    assert_eq!(steps.len(), 1);
    assert!(steps[0].cached);
    assert_eq!(
        (steps[0].completed_at.unwrap() - steps[0].started_at.unwrap()).num_milliseconds(),
        1500
    );

    let context = pb::ReportBuildContextRequest {
        build_id: build.build_id.clone(),
        dockerfiles: vec![pb::Dockerfile {
            target: "app".into(),
            filename: "Dockerfile".into(),
            contents: "FROM scratch\n".into(),
        }],
    };
    let _: pb::ReportBuildContextResponse = unary(
        &router,
        &format!("{svc}/ReportBuildContext"),
        &build.build_token,
        &context,
    )
    .await
    .unwrap();
    let stored: String =
        sqlx::query_scalar("SELECT contents FROM build_dockerfiles WHERE build_id = $1")
            .bind(&build.build_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, "FROM scratch\n");

    let info: pb::GetPullInfoResponse = unary(
        &router,
        &format!("{svc}/GetPullInfo"),
        &a.user_token,
        &pb::GetPullInfoRequest {
            build_id: build.build_id.clone(),
        },
    )
    .await
    .unwrap();
    assert!(
        info.reference
            .ends_with(&format!("/{}:{}", a.project.id, build.build_id)),
        "{}",
        info.reference
    );
    assert!(info.password.starts_with("kiln_pl_"));
    assert!(!info.registry_host.is_empty());

    let pull: pb::GetPullTokenResponse = unary(
        &router,
        &format!("{svc}/GetPullToken"),
        &a.user_token,
        &pb::GetPullTokenRequest {
            project_id: Some(String::new()),
            build_id: Some(build.build_id.clone()),
        },
    )
    .await
    .unwrap();
    let expires: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT expires_at FROM tokens WHERE token_hash = $1")
            .bind(&kiln::auth::token::hash(&pull.token)[..])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let minutes = (expires.unwrap() - chrono::Utc::now()).num_minutes();
    assert!(
        (55..=60).contains(&minutes),
        "pull tokens are short-lived: {minutes} min"
    );
}

#[tokio::test]
async fn core_project_service_manages_tokens_and_trust_policies_over_json() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(common::app(&db));
    let svc = "/depot.core.v1.ProjectService";
    let call = |method: &str, body: serde_json::Value| {
        let router = router.clone();
        let path = format!("{svc}/{method}");
        let token = a.user_token.clone();
        async move {
            post(
                &router,
                &path,
                Some(&token),
                "application/json",
                body.to_string(),
            )
            .await
        }
    };
    let added = call("AddTrustPolicy", serde_json::json!({"projectId": a.project.id, "github": {"repositoryOwner": "acme", "repository": "api"}})).await;
    assert_eq!(added.status, StatusCode::OK, "{:?}", added.body);
    let policy_id = added.json()["trustPolicy"]["trustPolicyId"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = call(
        "ListTrustPolicies",
        serde_json::json!({"projectId": a.project.id}),
    )
    .await
    .json();
    assert_eq!(listed["trustPolicies"][0]["github"]["repository"], "api");
    let bad = call("AddTrustPolicy", serde_json::json!({"projectId": a.project.id, "github": {"repositoryOwner": "", "repository": "api"}})).await;
    assert_eq!(bad.json()["code"], "invalid_argument");
    let removed = call(
        "RemoveTrustPolicy",
        serde_json::json!({"projectId": a.project.id, "trustPolicyId": policy_id}),
    )
    .await;
    assert_eq!(removed.status, StatusCode::OK);

    let created = call(
        "CreateToken",
        serde_json::json!({"projectId": a.project.id, "description": "ci"}),
    )
    .await
    .json();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("kiln_p_"));
    let tokens = call("ListTokens", serde_json::json!({"projectId": a.project.id}))
        .await
        .json();
    assert_eq!(tokens["tokens"][0]["description"], "ci");
    assert!(!tokens.to_string().contains(&secret));
    let token_id = created["tokenId"].as_str().unwrap().to_string();
    let deleted = call("DeleteToken", serde_json::json!({"tokenId": token_id})).await;
    assert_eq!(deleted.status, StatusCode::OK);
    let me = router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/api/v1/me")
                .header(header::AUTHORIZATION, format!("Bearer {secret}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        me.status(),
        StatusCode::UNAUTHORIZED,
        "deleted token still works"
    );

    let updated = call("UpdateProject", serde_json::json!({"projectId": a.project.id, "cachePolicy": {"keepBytes": "107374182400", "keepDays": 7}})).await.json();
    assert_eq!(updated["project"]["cachePolicy"]["keepGb"], 100);
    assert_eq!(updated["project"]["cachePolicy"]["keepDays"], 7);
}
