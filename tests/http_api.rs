//! The HTTP surface in-process: authentication errors, authorization across
//! organizations, size limits, health and metrics.
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use kiln::auth::TokenKind;
use serde_json::{Value, json};
use tower::ServiceExt;

use common::{TestDb, app, project_token, tenant};

struct Response {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Response {
    let reply = common::http::request(router, method, path, token, body).await;
    Response {
        status: reply.status,
        body: reply.json_or_text(),
        headers: reply.headers,
    }
}

async fn raw(router: &axum::Router, req: Request<Body>) -> Response {
    let reply = common::http::send(router, req).await;
    Response {
        status: reply.status,
        body: reply.json_or_text(),
        headers: reply.headers,
    }
}

#[tokio::test]
async fn an_organization_cannot_see_another_organizations_project() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let b = tenant(&db.pool, "b").await;
    let router = kiln::api::router(app(&db));

    let own = call(
        &router,
        "GET",
        &format!("/api/v1/projects/{}", a.project.id),
        Some(&a.user_token),
        None,
    )
    .await;
    assert_eq!(own.status, StatusCode::OK, "{:?}", own.body);
    assert_eq!(own.body["project"]["id"], a.project.id);

    let other = call(
        &router,
        "GET",
        &format!("/api/v1/projects/{}", b.project.id),
        Some(&a.user_token),
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(other.body["code"], "not_found");

    let list = call(
        &router,
        "GET",
        "/api/v1/projects",
        Some(&a.user_token),
        None,
    )
    .await;
    let ids: Vec<&str> = list.body["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.project.id.as_str()]);

    // Org B's project token can't touch org A either, nor change anything there.
    let b_token = project_token(&db.pool, &b.project, TokenKind::Project).await;
    let patch = call(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", a.project.id),
        Some(&b_token),
        Some(json!({"cache_size_gb_amd64": 100})),
    )
    .await;
    assert_eq!(patch.status, StatusCode::NOT_FOUND);
    let unchanged = kiln::db::projects::get(&db.pool, &a.project.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unchanged.cache_size_gb_amd64, 50);
}

#[tokio::test]
async fn project_tokens_are_confined_to_their_project() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let token = project_token(&db.pool, &a.project, TokenKind::Project).await;

    let list = call(&router, "GET", "/api/v1/projects", Some(&token), None).await;
    assert_eq!(list.body["projects"].as_array().unwrap().len(), 1);

    let create = call(
        &router,
        "POST",
        "/api/v1/projects",
        Some(&token),
        Some(json!({"name": "sneaky"})),
    )
    .await;
    assert_eq!(create.status, StatusCode::FORBIDDEN, "{:?}", create.body);
    assert!(
        create.body["message"]
            .as_str()
            .unwrap()
            .contains("user or organization token")
    );

    let pull = project_token(&db.pool, &a.project, TokenKind::Pull).await;
    let del = call(
        &router,
        "DELETE",
        &format!("/api/v1/projects/{}", a.project.id),
        Some(&pull),
        None,
    )
    .await;
    assert_eq!(del.status, StatusCode::FORBIDDEN);
    assert!(
        kiln::db::projects::get(&db.pool, &a.project.id)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn project_crud_validates_and_audits() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));

    let bad = call(
        &router,
        "POST",
        "/api/v1/projects",
        Some(&a.user_token),
        Some(json!({"name": "x", "cache_size_gb_amd64": 0})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .contains("cache_size_gb_amd64"),
        "{:?}",
        bad.body
    );

    let created = call(
        &router,
        "POST",
        "/api/v1/projects",
        Some(&a.user_token),
        Some(json!({"name": "web", "cache_size_gb_arm64": 200})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["project"]["cache_size_gb_arm64"], 200);
    let id = created.body["project"]["id"].as_str().unwrap().to_string();

    let dup = call(
        &router,
        "POST",
        "/api/v1/projects",
        Some(&a.user_token),
        Some(json!({"name": "web"})),
    )
    .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);

    let unknown_field = call(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{id}"),
        Some(&a.user_token),
        Some(json!({"cache_gb": 1})),
    )
    .await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST);

    let updated = call(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{id}"),
        Some(&a.user_token),
        Some(json!({"build_timeout_minutes": 30})),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.body["project"]["build_timeout_minutes"], 30);

    let audit = call(
        &router,
        "GET",
        &format!("/api/v1/organizations/{}/audit-events", a.org_id),
        Some(&a.user_token),
        None,
    )
    .await;
    // The owner's own actions, newest first (the operator's seeding comes before).
    let actions: Vec<&str> = audit.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor_kind"] == "user")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["project.update", "project.create"]);
}

#[tokio::test]
async fn project_tokens_can_be_created_listed_and_revoked_over_http() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let path = format!("/api/v1/projects/{}/tokens", a.project.id);
    let created = call(
        &router,
        "POST",
        &path,
        Some(&a.user_token),
        Some(json!({"name": "ci", "expires_in_days": 7})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_string();
    let id = created.body["token"]["id"].as_str().unwrap().to_string();

    let me = call(&router, "GET", "/api/v1/me", Some(&secret), None).await;
    assert_eq!(me.body["kind"], "project");
    assert_eq!(me.body["project_id"], a.project.id);

    let listed = call(&router, "GET", &path, Some(&a.user_token), None).await;
    assert!(
        !listed.body.to_string().contains(&secret),
        "listing leaks the secret"
    );

    let revoked = call(
        &router,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        Some(&a.user_token),
        None,
    )
    .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let after = call(&router, "GET", "/api/v1/me", Some(&secret), None).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn authorization_header_problems_get_clear_401s() {
    let db = TestDb::new().await;
    let router = kiln::api::router(app(&db));
    let send = |value: Option<&'static [u8]>| {
        let router = router.clone();
        async move {
            let mut req = Request::builder().uri("/api/v1/me");
            if let Some(v) = value {
                req = req.header(
                    header::AUTHORIZATION,
                    axum::http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            raw(&router, req.body(Body::empty()).unwrap()).await
        }
    };
    let missing = send(None).await;
    let empty = send(Some(b"Bearer ")).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.body, empty.body,
        "missing header and empty bearer must behave the same"
    );
    assert_eq!(missing.body["code"], "unauthenticated");
    assert_eq!(
        missing.headers.get(header::WWW_AUTHENTICATE).unwrap(),
        "Bearer"
    );

    for bad in [
        &b"Basic Zm9vOmJhcg=="[..],
        b"Bearer two tokens",
        b"Bearer \xc3\x28",
    ] {
        let res = send(Some(bad)).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert!(
            res.body["message"].as_str().unwrap().contains("malformed"),
            "{:?}",
            res.body
        );
    }
    let unknown = send(Some(b"Bearer kiln_u_nope")).await;
    assert!(
        unknown.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown token")
    );

    let req = Request::builder()
        .uri("/api/v1/me")
        .header(header::AUTHORIZATION, "Bearer a")
        .header(header::AUTHORIZATION, "Bearer b")
        .body(Body::empty())
        .unwrap();
    assert_eq!(raw(&router, req).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn oversized_bodies_get_413_and_change_nothing() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    let limit = 4 * 1024 * 1024;
    let big = json!({"name": "x".repeat(limit + 10)});
    let res = call(
        &router,
        "POST",
        "/api/v1/projects",
        Some(&a.user_token),
        Some(big),
    )
    .await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.body["code"], "resource_exhausted");

    // Without a Content-Length the limit still applies while streaming.
    let chunks =
        futures_util::stream::iter((0..80).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/projects")
        .header(header::AUTHORIZATION, format!("Bearer {}", a.user_token))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    let res = raw(&router, req).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", res.body);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn health_readiness_metrics_and_request_ids() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let router = kiln::api::router(app(&db));
    assert_eq!(
        call(&router, "GET", "/healthz", None, None).await.status,
        StatusCode::OK
    );
    let ready = call(&router, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::OK);
    let me = call(&router, "GET", "/api/v1/me", Some(&a.user_token), None).await;
    assert!(me.headers.get("x-request-id").is_some());

    let metrics = call(&router, "GET", "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(text.contains("kiln_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/api/v1/me\""), "{text}");
    assert!(
        text.contains("kiln_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("kiln_db_pool_connections"), "{text}");

    let missing = call(&router, "GET", "/nope", None, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.body["code"], "not_found");
}

#[tokio::test]
async fn readyz_is_false_when_the_database_is_unreachable() {
    let config = common::config(
        &format!("postgres://kiln@127.0.0.1:{}/none", common::free_port()),
        &[("KILN_DATABASE__ACQUIRE_TIMEOUT_SECONDS", "1")],
    );
    let pool = kiln::db::lazy_pool(&config.database).unwrap();
    let app = kiln::app::App::new(config, pool);
    let router = kiln::api::router(app);
    assert_eq!(
        call(&router, "GET", "/healthz", None, None).await.status,
        StatusCode::OK
    );
    let ready = call(&router, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    // A request needing the database answers 503, not a hang or a crash.
    let me = call(&router, "GET", "/api/v1/me", Some("kiln_u_whatever"), None).await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", me.body);
}

#[tokio::test]
async fn the_login_page_throttles_password_guessing_even_when_concurrent() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    common::set_password(&db.pool, &a.user_id, "the right password").await;
    let email: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(&a.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let request = kiln::auth::login::start(&db.pool, std::time::Duration::from_secs(600), 100)
        .await
        .unwrap();
    let app = kiln::app::App::new(
        common::config(&db.url, &[("KILN_LIMITS__UNAUTHENTICATED_BURST", "1000")]),
        db.pool.clone(),
    );
    app.mark_migrated();
    let router = kiln::api::router(app);
    let post = |password: &'static str| {
        let router = router.clone();
        let body = format!(
            "email={}&password={}&decision=approve",
            email.replace('@', "%40"),
            password.replace(' ', "+")
        );
        let path = format!("/login/{}", request.user_code);
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        }
    };
    // Thirty guesses at once: the throttle reserves each attempt before the password
    // is checked, so at most the limit are checked at all.
    let statuses = futures_util::future::join_all((0..30).map(|_| post("wrong guess"))).await;
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        checked,
        kiln::auth::throttle::MAX_FAILED_SIGN_INS as usize,
        "{statuses:?}"
    );
    assert_eq!(checked + refused, 30, "{statuses:?}");
    // Locked out: even the right password is not checked now.
    assert_eq!(
        post("the right password").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let approved: Option<String> =
        sqlx::query_scalar("SELECT approved_by FROM login_requests WHERE user_code = $1")
            .bind(&request.user_code)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(approved.is_none());
}

#[tokio::test]
async fn the_login_page_checks_the_request_before_any_password() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    common::set_password(&db.pool, &a.user_id, "the right password").await;
    let app = kiln::app::App::new(
        common::config(&db.url, &[("KILN_LIMITS__UNAUTHENTICATED_BURST", "1000")]),
        db.pool.clone(),
    );
    app.mark_migrated();
    let router = kiln::api::router(app);
    let post = |path: String| {
        let router = router.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(
                    "email=nobody%40x.test&password=whatever&decision=approve",
                ))
                .unwrap();
            router.oneshot(req).await.unwrap().status()
        }
    };
    // An unknown or malformed code is answered without a sign-in attempt, so guesses
    // against it cannot lock anyone out or burn argon2 time.
    for _ in 0..2 * kiln::auth::throttle::MAX_FAILED_SIGN_INS {
        assert_eq!(post("/login/BBBB-BBBB".into()).await, StatusCode::NOT_FOUND);
        assert_eq!(
            post("/login/not-a-code".into()).await,
            StatusCode::NOT_FOUND
        );
    }
    let request = kiln::auth::login::start(&db.pool, std::time::Duration::from_secs(600), 100)
        .await
        .unwrap();
    // The sign-in throttle for that email was never touched.
    let wrong = post(format!("/login/{}", request.user_code)).await;
    assert_eq!(wrong, StatusCode::UNAUTHORIZED);

    // The approval page wears the dashboard's stylesheet and security headers.
    let page = common::http::send(
        &router,
        Request::builder()
            .uri(format!("/login/{}", request.user_code))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    let csp = page.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("/dashboard/assets/app.") && !html.contains("<style"));
    assert!(html.contains(&request.user_code));
}

#[tokio::test]
async fn requests_are_bounded_by_the_server_deadline() {
    let db = TestDb::new().await;
    let a = tenant(&db.pool, "a").await;
    let app = kiln::app::App::new(
        common::config(
            &db.url,
            &[
                ("KILN_SERVER__REQUEST_TIMEOUT_SECONDS", "1"),
                ("KILN_BUILDS__CONNECTION_WAIT_SECONDS", "0"),
            ],
        ),
        db.pool.clone(),
    );
    app.mark_migrated();
    let router = kiln::api::router(app);
    // Someone else holds the project's row: an update waits on the lock.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projects WHERE id = $1 FOR UPDATE")
        .bind(&a.project.id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let rest = call(
        &router,
        "PATCH",
        &format!("/api/v1/projects/{}", a.project.id),
        Some(&a.user_token),
        Some(json!({"cache_size_gb_amd64": 99})),
    )
    .await;
    assert_eq!(rest.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", rest.body);
    assert_eq!(rest.body["code"], "deadline_exceeded");
    // No connect-timeout-ms from the client: the server's bound still applies.
    let connect = common::http::unary::<_, kiln::proto::depot::core::v1::UpdateProjectResponse>(
        &router,
        "depot.core.v1.ProjectService/UpdateProject",
        &a.user_token,
        &kiln::proto::depot::core::v1::UpdateProjectRequest {
            project_id: a.project.id.clone(),
            name: Some("renamed".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(connect["code"], "deadline_exceeded", "{connect}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    holder.rollback().await.unwrap();
    let project = kiln::db::projects::get(&db.pool, &a.project.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        project.cache_size_gb_amd64, 50,
        "the timed-out writes changed nothing"
    );
    assert_ne!(project.name, "renamed");
}
