//! The dashboard's pages and actions, in process: sign-in with a session cookie, the
//! projects list, a project's settings and cache reset, a build's detail at the link the
//! depot CLI prints, and the rules around them (CSRF, escaping, other organizations).
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::http::{Reply, send};
use common::{TestDb, app, tenant};

fn html(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

async fn get(router: &axum::Router, path: &str, cookie: Option<&str>) -> Reply {
    let mut req = Request::builder().uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    send(router, req.body(Body::empty()).unwrap()).await
}

async fn post_form(
    router: &axum::Router,
    path: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
    form: &[(&str, &str)],
) -> Reply {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut req = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    if let Some(o) = origin {
        req = req.header(header::ORIGIN, o);
    }
    send(router, req.body(Body::from(body)).unwrap()).await
}

/// The value of `name="csrf"` in a page.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..at + page[at..].find('"').unwrap()].to_string()
}

async fn email_of(db: &TestDb, user_id: &str) -> String {
    sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Signs in through the form; returns the `Cookie` header value.
async fn sign_in(router: &axum::Router, email: &str, password: &str) -> String {
    let reply = post_form(
        router,
        "/dashboard/sign-in",
        None,
        None,
        &[
            ("email", email),
            ("password", password),
            ("next", "/dashboard"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", html(&reply));
    let set = reply.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn signing_in_sees_only_ones_own_projects_escaped_and_signing_out_ends_it() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "dash").await;
    let other = tenant(&db.pool, "other").await;
    let evil = common::project(&db.pool, &t.org_id, "<img src=x onerror=alert(1)>").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));

    let anonymous = get(&router, "/dashboard", None).await;
    assert_eq!(anonymous.status, StatusCode::SEE_OTHER);
    assert_eq!(
        anonymous.headers[header::LOCATION],
        "/dashboard/sign-in?next=%2Fdashboard"
    );
    let form = get(&router, "/dashboard/sign-in", None).await;
    assert_eq!(form.status, StatusCode::OK);
    let csp = form.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.contains("default-src 'none'") && !csp.contains("unsafe-inline"));
    assert!(html(&form).contains("<title>Sign in · Kiln</title>"));

    let wrong = post_form(
        &router,
        "/dashboard/sign-in",
        None,
        None,
        &[("email", &email), ("password", "nope")],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(html(&wrong).contains("wrong email or password"));
    assert!(!wrong.headers.contains_key(header::SET_COOKIE));
    // An open redirect is not followed.
    let cookie = {
        let reply = post_form(
            &router,
            "/dashboard/sign-in",
            None,
            None,
            &[
                ("email", &email),
                ("password", "a long password"),
                ("next", "//evil.example/"),
            ],
        )
        .await;
        assert_eq!(reply.headers[header::LOCATION], "/dashboard");
        reply.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };

    let index = get(&router, "/dashboard", Some(&cookie)).await;
    assert_eq!(index.status, StatusCode::OK);
    let page = html(&index);
    assert!(page.contains(&t.project.name));
    assert!(!page.contains(&other.project.name));
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert!(!page.contains("<img src=x"));
    assert!(page.contains(&format!("/dashboard/projects/{}", evil.id)));

    // Another organization's project is a 404 page, not an error or a leak.
    let theirs = get(
        &router,
        &format!("/dashboard/projects/{}", other.project.id),
        Some(&cookie),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    assert!(html(&theirs).contains("Not found"));
    let unknown = get(
        &router,
        "/dashboard/projects/nope/builds/nope",
        Some(&cookie),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // The stylesheet is named by its hash and cached for good.
    let css_path = {
        let at = page.find("/dashboard/assets/app.").unwrap();
        page[at..at + page[at..].find('"').unwrap()].to_string()
    };
    let css = get(&router, &css_path, None).await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(
        css.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert_eq!(
        get(&router, "/dashboard/assets/app.000.css", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Signing out needs the CSRF token, then the session is gone everywhere.
    let forged = post_form(
        &router,
        "/dashboard/sign-out",
        Some(&cookie),
        None,
        &[("csrf", "x")],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        get(&router, "/dashboard", Some(&cookie)).await.status,
        StatusCode::OK
    );
    let out = post_form(
        &router,
        "/dashboard/sign-out",
        Some(&cookie),
        None,
        &[("csrf", &csrf(&page))],
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(
        get(&router, "/dashboard", Some(&cookie)).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn settings_and_cache_reset_are_validated_guarded_and_audited() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "settings").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));
    let cookie = sign_in(&router, &email, "a long password").await;
    let path = format!("/dashboard/projects/{}", t.project.id);
    let page = html(&get(&router, &path, Some(&cookie)).await);
    let token = csrf(&page);
    let version = {
        let at = page.find("name=\"version\" value=\"").unwrap() + 22;
        page[at..at + page[at..].find('"').unwrap()].to_string()
    };
    let settings = format!("{path}/settings");
    let size = |db: &TestDb| {
        let pool = db.pool.clone();
        let id = t.project.id.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT cache_size_gb_amd64 FROM projects WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = size(&db).await;
    let valid = |csrf: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("version".to_string(), version.clone()),
            ("cache_size_gb_amd64".to_string(), "75".to_string()),
            ("cache_size_gb_arm64".to_string(), "50".to_string()),
            ("build_timeout_minutes".to_string(), "60".to_string()),
            ("cache_retention_days".to_string(), "14".to_string()),
            ("builder_size".to_string(), "32x64".to_string()),
            ("autoscaling_enabled".to_string(), "on".to_string()),
            (
                "autoscaling_builds_per_builder".to_string(),
                "2".to_string(),
            ),
            ("autoscaling_max_builders".to_string(), "4".to_string()),
        ]
    };
    let as_refs = |v: &Vec<(String, String)>| -> Vec<(String, String)> { v.clone() };

    // A forged cross-site POST changes nothing: no token, a wrong token, a foreign Origin.
    for (form_csrf, origin) in [
        ("", None),
        ("forged", None),
        (token.as_str(), Some("https://evil.example")),
    ] {
        let form = as_refs(&valid(form_csrf));
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let reply = post_form(&router, &settings, Some(&cookie), origin, &pairs).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{form_csrf} {origin:?}"
        );
        assert_eq!(size(&db).await, before);
    }

    // Invalid input is refused next to its field, and changes nothing.
    let mut bad = valid(&token);
    bad[2].1 = "ten".into();
    bad[4].1 = "0".into();
    let pairs: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = post_form(&router, &settings, Some(&cookie), None, &pairs).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let text = html(&reply);
    assert!(text.contains("id=\"cache_size_gb_amd64-error\""), "{text}");
    assert!(text.contains("id=\"build_timeout_minutes-error\""));
    assert!(text.contains("value=\"ten\""), "the user's input is kept");
    assert_eq!(size(&db).await, before);
    let mut huge = valid(&token);
    huge[2].1 = "99999999".into();
    let pairs: Vec<(&str, &str)> = huge.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = post_form(&router, &settings, Some(&cookie), None, &pairs).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html(&reply).contains("cache_size_gb_amd64-error"));
    let mut odd = valid(&token);
    odd[6].1 = "128x256".into();
    odd[9].1 = "1000".into();
    let pairs: Vec<(&str, &str)> = odd.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = post_form(&router, &settings, Some(&cookie), None, &pairs).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let text = html(&reply);
    assert!(
        text.contains("must be one of") || text.contains("autoscaling_max_builders-error"),
        "{text}"
    );
    assert_eq!(size(&db).await, before);

    // A valid change is saved; a second one from the same (now stale) page is refused.
    let ok = valid(&token);
    let pairs: Vec<(&str, &str)> = ok.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let saved = post_form(&router, &settings, Some(&cookie), None, &pairs).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", html(&saved));
    assert_eq!(size(&db).await, 75);
    let others: (i32, String, bool, i32, i32) = sqlx::query_as(
        "SELECT cache_retention_days, builder_size, autoscaling_enabled,
                autoscaling_builds_per_builder, autoscaling_max_builders
         FROM projects WHERE id = $1",
    )
    .bind(&t.project.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(others, (14, "32x64".to_string(), true, 2, 4));
    let page = html(&get(&router, &path, Some(&cookie)).await);
    assert!(page.contains("<option value=\"32x64\" selected>"), "{page}");
    assert!(page.contains("name=\"autoscaling_enabled\" value=\"on\" checked"));
    let stale = post_form(&router, &settings, Some(&cookie), None, &pairs).await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert!(html(&stale).contains("Someone changed these settings"));
    let updates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'project.update' AND target_id = $1",
    )
    .bind(&t.project.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(updates, 1);

    // Reset asks for confirmation first.
    let reset = format!("{path}/reset");
    let unconfirmed = post_form(&router, &reset, Some(&cookie), None, &[("csrf", &token)]).await;
    assert_eq!(unconfirmed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html(&unconfirmed).contains("Tick the box"));
    let done = post_form(
        &router,
        &reset,
        Some(&cookie),
        None,
        &[("csrf", &token), ("confirm", "yes")],
    )
    .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    assert!(
        done.headers[header::LOCATION]
            .to_str()
            .unwrap()
            .contains("reset=")
    );
}

#[tokio::test]
async fn a_build_has_a_page_at_the_link_the_cli_prints() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "build").await;
    let other = tenant(&db.pool, "other").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let app = app(&db);
    let router = kiln::api::router(app.clone());
    let operator = common::operator();
    let spec = |_: ()| kiln::builds::BuildSpec {
        command: "build".into(),
        options: serde_json::json!([]),
        save: false,
        ephemeral_cache: false,
    };
    let (build, _, _) = app
        .builds
        .create(&operator, Some(&t.project.id), spec(()))
        .await
        .unwrap();
    let (theirs, _, _) = app
        .builds
        .create(&operator, Some(&other.project.id), spec(()))
        .await
        .unwrap();
    let now = chrono::Utc::now();
    app.builds
        .record_steps(
            &operator,
            &build.id,
            vec![kiln::db::builds::Step {
                digest: "sha256:run".into(),
                name: "[2/2] RUN make <all>".into(),
                cached: false,
                started_at: Some(now - chrono::Duration::seconds(3)),
                completed_at: Some(now),
                error: None,
            }],
        )
        .await
        .unwrap();
    app.builds
        .record_logs(
            &operator,
            &build.id,
            vec![kiln::db::builds::NewLogLine {
                digest: "sha256:run".into(),
                at: now,
                message: "<script>alert(1)</script>".into(),
            }],
        )
        .await
        .unwrap();
    let cookie = sign_in(&router, &email, "a long password").await;
    let link = format!("/dashboard/projects/{}/builds/{}", t.project.id, build.id);
    let page = get(&router, &link, Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    let text = html(&page);
    assert!(text.contains("RUN make &lt;all&gt;"));
    assert!(text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!text.contains("<script>"));
    assert!(text.contains("<svg class=\"waterfall\""));
    assert!(
        !text.contains("The whole log"),
        "a short log is shown whole"
    );
    // Pages are sent compressed to browsers that take it.
    let gzipped = send(
        &router,
        Request::builder()
            .uri(&link)
            .header(header::COOKIE, &cookie)
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(gzipped.headers[header::CONTENT_ENCODING], "gzip");

    // A long log: the page shows its end and links to all of it, in pages.
    let lines: Vec<_> = (1..=1500)
        .map(|n| kiln::db::builds::NewLogLine {
            digest: "sha256:run".into(),
            at: now,
            message: format!("compiling unit {n}"),
        })
        .collect();
    for chunk in lines.chunks(500) {
        app.builds
            .record_logs(&operator, &build.id, chunk.to_vec())
            .await
            .unwrap();
    }
    let text = html(&get(&router, &link, Some(&cookie)).await);
    assert!(text.contains("compiling unit 1471\n") && !text.contains("compiling unit 1470\n"));
    let whole = format!("{link}/logs/sha256:run");
    assert!(text.contains(&format!("href=\"{whole}\"")), "{text}");
    let first = html(&get(&router, &whole, Some(&cookie)).await);
    assert!(first.contains("&lt;script&gt;") && first.contains("compiling unit 999\n"));
    assert!(!first.contains("compiling unit 1000\n"));
    let at = first.find("page_token=").unwrap() + 11;
    let next = &first[at..at + first[at..].find('"').unwrap()];
    let second = html(
        &get(
            &router,
            &format!("{whole}?page_token={next}"),
            Some(&cookie),
        )
        .await,
    );
    assert!(second.contains("compiling unit 1500\n") && !second.contains("compiling unit 999\n"));
    let unknown = get(&router, &format!("{link}/logs/sha256:nope"), Some(&cookie)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let bad = get(
        &router,
        &format!("{whole}?page_token=garbage"),
        Some(&cookie),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // The same build under another project's path, and another organization's build.
    let wrong = get(
        &router,
        &format!(
            "/dashboard/projects/{}/builds/{}",
            other.project.id, build.id
        ),
        Some(&cookie),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::NOT_FOUND);
    let foreign = get(
        &router,
        &format!(
            "/dashboard/projects/{}/builds/{}",
            other.project.id, theirs.id
        ),
        Some(&cookie),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);

    // Sharing shows a link that renders without signing in.
    let shared = post_form(
        &router,
        &format!("{link}/share"),
        Some(&cookie),
        None,
        &[("csrf", &csrf(&text))],
    )
    .await;
    assert_eq!(shared.status, StatusCode::OK, "{}", html(&shared));
    let body = html(&shared);
    let at = body.find("/shared/builds/").unwrap();
    let path = &body[at..at + body[at..].find('"').unwrap()];
    assert_eq!(get(&router, path, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn tokens_are_shown_once_and_revoked_and_builds_list_live_by_status() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "tokens").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let app = app(&db);
    let router = kiln::api::router(app.clone());
    let cookie = sign_in(&router, &email, "a long password").await;
    let path = format!("/dashboard/projects/{}", t.project.id);
    let page = html(&get(&router, &path, Some(&cookie)).await);
    let token = csrf(&page);

    let forged = post_form(
        &router,
        &format!("{path}/tokens"),
        Some(&cookie),
        None,
        &[("csrf", "x"), ("name", "ci")],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let blank = post_form(
        &router,
        &format!("{path}/tokens"),
        Some(&cookie),
        None,
        &[("csrf", &token), ("name", "  ")],
    )
    .await;
    assert_eq!(blank.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html(&blank).contains("role=\"alert\""));
    let created = post_form(
        &router,
        &format!("{path}/tokens"),
        Some(&cookie),
        None,
        &[("csrf", &token), ("name", "ci")],
    )
    .await;
    assert_eq!(created.status, StatusCode::OK, "{}", html(&created));
    assert_eq!(created.headers[header::CACHE_CONTROL], "no-store");
    let shown = html(&created);
    let at = shown.find("data-testid=\"secret\">").unwrap() + 21;
    let secret = &shown[at..at + shown[at..].find('<').unwrap()];
    assert!(secret.starts_with("kiln_p_"), "{secret}");
    let project_page = html(&get(&router, &path, Some(&cookie)).await);
    assert!(project_page.contains(">ci<"));
    assert!(
        !project_page.contains(secret),
        "the secret is never rendered twice"
    );
    let token_id: String =
        sqlx::query_scalar("SELECT id FROM tokens WHERE name = 'ci' AND project_id = $1")
            .bind(&t.project.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let revoked = post_form(
        &router,
        &format!("{path}/tokens/{token_id}/revoke"),
        Some(&cookie),
        None,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER);
    let at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM tokens WHERE id = $1")
            .bind(&token_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(at.is_some());

    // The builds list: filtered by status, refreshing itself on the first page.
    let operator = common::operator();
    let spec = kiln::builds::BuildSpec {
        command: "build".into(),
        options: serde_json::json!([]),
        save: false,
        ephemeral_cache: false,
    };
    let (done, _, _) = app
        .builds
        .create(&operator, Some(&t.project.id), spec.clone())
        .await
        .unwrap();
    let (live, _, _) = app
        .builds
        .create(&operator, Some(&t.project.id), spec)
        .await
        .unwrap();
    app.builds
        .finish(
            &operator,
            &done.id,
            kiln::db::builds::Outcome::Failed("exit 1".into()),
        )
        .await
        .unwrap();
    let all = get(&router, &format!("{path}/builds"), Some(&cookie)).await;
    assert_eq!(all.status, StatusCode::OK);
    let text = html(&all);
    assert!(text.contains(&done.id) && text.contains(&live.id));
    // Live through server-sent events (a script from our origin), or a reload every 5
    // seconds without script.
    let events_path = format!("{path}/builds/events?status=");
    assert!(
        text.contains(&format!("data-live=\"{events_path}\"")),
        "{text}"
    );
    assert!(text.contains("<noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>"));
    let script = text
        .split("<script src=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let js = get(&router, script, None).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(
        js.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    let mut events = {
        use tower::ServiceExt;
        let req = Request::builder()
            .uri(&events_path)
            .header(header::COOKIE, &cookie)
            .body(Body::empty())
            .unwrap();
        let res = router.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        res.into_body()
    };
    let next_rows = |body: &mut Body| {
        let body = std::mem::take(body);
        async move {
            use http_body_util::BodyExt;
            let mut body = body;
            let mut text = String::new();
            loop {
                let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                    .await
                    .expect("an event within 10 s")
                    .unwrap()
                    .unwrap();
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
                if text.contains("event: rows") && text.ends_with("\n\n") {
                    return (text, body);
                }
            }
        }
    };
    let (first, rest) = next_rows(&mut events).await;
    events = rest;
    assert!(
        first.contains(&live.id) && first.contains("state-queued"),
        "{first}"
    );
    app.builds
        .finish(&operator, &live.id, kiln::db::builds::Outcome::Success)
        .await
        .unwrap();
    let (second, _) = next_rows(&mut events).await;
    assert!(
        second.contains(&live.id) && second.contains("state-success"),
        "{second}"
    );
    // Another organization's user cannot follow this list.
    let stranger = get(&router, &events_path, None).await;
    assert_eq!(stranger.status, StatusCode::SEE_OTHER);
    let failed = html(
        &get(
            &router,
            &format!("{path}/builds?status=failed"),
            Some(&cookie),
        )
        .await,
    );
    assert!(failed.contains(&done.id) && !failed.contains(&live.id));
    let bad = get(
        &router,
        &format!("{path}/builds?status=exploded"),
        Some(&cookie),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn trust_relationships_are_added_validated_and_removed() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "trust").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));
    let cookie = sign_in(&router, &email, "a long password").await;
    let path = format!("/dashboard/projects/{}", t.project.id);
    let page = html(&get(&router, &path, Some(&cookie)).await);
    let token = csrf(&page);
    assert!(page.contains("Trust relationships") && page.contains("None yet."));
    let action = format!("{path}/trust-policies");

    let added = post_form(
        &router,
        &action,
        Some(&cookie),
        None,
        &[
            ("csrf", &token),
            ("provider", "github"),
            ("repository_owner", "acme"),
            ("repository", "api"),
        ],
    )
    .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", html(&added));
    let page = html(&get(&router, &path, Some(&cookie)).await);
    assert!(page.contains("GitHub acme/api"));

    // Missing fields and unknown providers are refused on the page; nothing is stored.
    for form in [
        vec![
            ("csrf", token.as_str()),
            ("provider", "gitlab"),
            ("project_path", ""),
        ],
        vec![("csrf", token.as_str()), ("provider", "jenkins")],
    ] {
        let reply = post_form(&router, &action, Some(&cookie), None, &form).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{form:?}");
        assert!(html(&reply).contains("role=\"alert\""));
    }
    let forged = post_form(
        &router,
        &action,
        Some(&cookie),
        None,
        &[
            ("csrf", "x"),
            ("provider", "gitlab"),
            ("project_path", "acme/web"),
        ],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM trust_policies WHERE project_id = $1")
            .bind(&t.project.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(count, 1);

    let policy: String = sqlx::query_scalar("SELECT id FROM trust_policies WHERE project_id = $1")
        .bind(&t.project.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let removed = post_form(
        &router,
        &format!("{action}/{policy}/remove"),
        Some(&cookie),
        None,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(removed.status, StatusCode::SEE_OTHER);
    assert!(html(&get(&router, &path, Some(&cookie)).await).contains("None yet."));
}

#[tokio::test]
async fn usage_shows_build_minutes_per_day() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "usage").await;
    let other = tenant(&db.pool, "other").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let app = app(&db);
    let router = kiln::api::router(app.clone());
    let operator = common::operator();
    let spec = kiln::builds::BuildSpec {
        command: "build".into(),
        options: serde_json::json!([]),
        save: false,
        ephemeral_cache: false,
    };
    for _ in 0..2 {
        let (build, _, _) = app
            .builds
            .create(&operator, Some(&t.project.id), spec.clone())
            .await
            .unwrap();
        app.builds
            .finish(&operator, &build.id, kiln::db::builds::Outcome::Success)
            .await
            .unwrap();
    }
    let cookie = sign_in(&router, &email, "a long password").await;
    let reply = get(
        &router,
        &format!("/dashboard/projects/{}/usage", t.project.id),
        Some(&cookie),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = html(&reply);
    assert!(text.contains("<svg class=\"usage\""), "{text}");
    // The day the builds finished on (not "now": the test may straddle midnight).
    let today: String = sqlx::query_scalar(
        "SELECT ((finished_at AT TIME ZONE 'UTC')::date)::text FROM builds WHERE project_id = $1 LIMIT 1",
    )
    .bind(&t.project.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        text.contains(&format!("<td>{today}</td><td>2</td>")),
        "{text}"
    );
    let theirs = get(
        &router,
        &format!("/dashboard/projects/{}/usage", other.project.id),
        Some(&cookie),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn projects_are_created_from_the_list_with_errors_beside_the_field() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "create").await;
    let other = tenant(&db.pool, "elsewhere").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));
    let cookie = sign_in(&router, &email, "a long password").await;
    let index = html(&get(&router, "/dashboard", Some(&cookie)).await);
    let token = csrf(&index);
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM projects")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let before = count().await;

    // An empty name: 422, the error beside the field, nothing created.
    let empty = post_form(
        &router,
        "/dashboard/projects",
        Some(&cookie),
        None,
        &[
            ("csrf", &token),
            ("organization_id", &t.org_id),
            ("name", "  "),
        ],
    )
    .await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(html(&empty).contains("role=\"alert\""), "{}", html(&empty));
    assert_eq!(count().await, before);
    // Another organization: not found, nothing created.
    let foreign = post_form(
        &router,
        "/dashboard/projects",
        Some(&cookie),
        None,
        &[
            ("csrf", &token),
            ("organization_id", &other.org_id),
            ("name", "mine now"),
        ],
    )
    .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    // A forged cross-site form: refused, nothing created.
    let forged = post_form(
        &router,
        "/dashboard/projects",
        Some(&cookie),
        Some("https://evil.example"),
        &[
            ("csrf", &token),
            ("organization_id", &t.org_id),
            ("name", "forged"),
        ],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(count().await, before);

    let created = post_form(
        &router,
        "/dashboard/projects",
        Some(&cookie),
        None,
        &[
            ("csrf", &token),
            ("organization_id", &t.org_id),
            ("name", "web app"),
        ],
    )
    .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", html(&created));
    let location = created.headers[header::LOCATION]
        .to_str()
        .unwrap()
        .to_string();
    let project = html(&get(&router, &location, Some(&cookie)).await);
    assert!(project.contains("<h1>web app</h1>"), "{project}");
    assert_eq!(count().await, before + 1);
    // The list shows it, with its cache sizes and no build yet.
    let index = html(&get(&router, "/dashboard", Some(&cookie)).await);
    assert!(index.contains("web app") && index.contains("none yet"));
}

#[tokio::test]
async fn owners_see_their_machines_drain_them_and_filter_the_audit_log() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "ops").await;
    let other = tenant(&db.pool, "theirs").await;
    let insert = |id: &'static str, project: Option<String>, state: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO machines (id, provider, platform, project_id, state, active_builds)
                 VALUES ($1, 'local', 'amd64', $2, $3, 0)",
            )
            .bind(id)
            .bind(project)
            .bind(state)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert("machineours01", Some(t.project.id.clone()), "assigned").await;
    insert("machinetheirs1", Some(other.project.id.clone()), "ready").await;
    insert("machinewarm001", None, "ready").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));
    let cookie = sign_in(&router, &email, "a long password").await;
    let index = html(&get(&router, "/dashboard", Some(&cookie)).await);
    let path = format!("/dashboard/organizations/{}/operations", t.org_id);
    assert!(index.contains(&path), "owners are offered the page");

    let page = get(&router, &path, Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    let body = html(&page);
    assert!(body.contains("machineours01") && body.contains(&t.project.name));
    assert!(!body.contains("machinetheirs1") && !body.contains("machinewarm001"));
    assert!(body.contains("project.create"), "the audit log is shown");
    let token = csrf(&body);

    // Draining a machine of another organization, or of the warm pool: not found.
    for machine in ["machinetheirs1", "machinewarm001"] {
        let reply = post_form(
            &router,
            &format!(
                "/dashboard/organizations/{}/machines/{machine}/drain",
                t.org_id
            ),
            Some(&cookie),
            None,
            &[("csrf", &token)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{machine}");
    }
    // A forged drain changes nothing.
    let drain = format!(
        "/dashboard/organizations/{}/machines/machineours01/drain",
        t.org_id
    );
    let forged = post_form(&router, &drain, Some(&cookie), None, &[("csrf", "forged")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let state = |id: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM machines WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(state("machineours01").await, "assigned");
    let drained = post_form(&router, &drain, Some(&cookie), None, &[("csrf", &token)]).await;
    assert_eq!(drained.status, StatusCode::SEE_OTHER);
    assert_eq!(state("machineours01").await, "draining");
    assert_eq!(state("machinetheirs1").await, "ready");
    assert_eq!(state("machinewarm001").await, "ready");
    let again = post_form(&router, &drain, Some(&cookie), None, &[("csrf", &token)]).await;
    assert!(
        again.headers[header::LOCATION]
            .to_str()
            .unwrap()
            .ends_with("drained=0")
    );

    // Filters: by action, by date; a bad date is refused beside its field.
    let only_drains = html(
        &get(
            &router,
            &format!("{path}?action=machine.drain"),
            Some(&cookie),
        )
        .await,
    );
    assert!(only_drains.contains("machine.drain") && !only_drains.contains("project.create"));
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let future = html(&get(&router, &format!("{path}?since={tomorrow}"), Some(&cookie)).await);
    assert!(future.contains("No events match."));
    let bad = get(&router, &format!("{path}?since=yesterday"), Some(&cookie)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(html(&bad).contains("Enter a date such as"));

    // A plain member sees neither the link nor the page; another organization's owner
    // gets a 404.
    let member = domain_member(&db, &t.org_id).await;
    let member_cookie = sign_in(&router, &member, "a long password").await;
    let index = html(&get(&router, "/dashboard", Some(&member_cookie)).await);
    assert!(!index.contains(&path));
    let refused = get(&router, &path, Some(&member_cookie)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(!html(&refused).contains("machineours01"));
    common::set_password(&db.pool, &other.user_id, "a long password").await;
    let their_email = email_of(&db, &other.user_id).await;
    let their_cookie = sign_in(&router, &their_email, "a long password").await;
    let hidden = get(&router, &path, Some(&their_cookie)).await;
    assert_eq!(hidden.status, StatusCode::NOT_FOUND);
}

/// A new member (not an owner) of `org_id` with a password; returns their email.
async fn domain_member(db: &TestDb, org_id: &str) -> String {
    let d = common::domain(&db.pool);
    let email = format!("{}@member.test", kiln::db::ids::new_id());
    let user = d
        .orgs
        .create_user(&common::operator(), &email, "member")
        .await
        .unwrap();
    d.orgs
        .set_member(
            &common::operator(),
            org_id,
            &user.id,
            kiln::auth::Role::Member,
        )
        .await
        .unwrap();
    common::set_password(&db.pool, &user.id, "a long password").await;
    email
}

#[tokio::test]
async fn server_admins_see_every_machine_and_the_installations_audit_log() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "admin").await;
    let other = tenant(&db.pool, "elsewhere").await;
    for (id, project) in [
        ("machinewarm002", None),
        ("machineother02", Some(other.project.id.clone())),
    ] {
        sqlx::query(
            "INSERT INTO machines (id, provider, platform, project_id, state, active_builds)
             VALUES ($1, 'local', 'amd64', $2, 'ready', 0)",
        )
        .bind(id)
        .bind(project)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let kiln_app = app(&db);
    let router = kiln::api::router(kiln_app.clone());
    let cookie = sign_in(&router, &email, "a long password").await;

    // Not yet an admin: no link, no page.
    let index = html(&get(&router, "/dashboard", Some(&cookie)).await);
    assert!(!index.contains("/dashboard/operations\""));
    let refused = get(&router, "/dashboard/operations", Some(&cookie)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(!html(&refused).contains("machinewarm002"));

    // Only an operator grants it; the signed-in session has it at once.
    let d = &kiln_app;
    let user_principal = kiln::auth::Principal {
        kind: kiln::auth::PrincipalKind::Token(kiln::auth::TokenKind::User),
        user_id: Some(t.user_id.clone()),
        ..kiln::auth::Principal::operator("self")
    };
    assert!(
        d.orgs
            .set_server_admin(&user_principal, &t.user_id, true)
            .await
            .is_err()
    );
    assert!(
        d.orgs
            .set_server_admin(&common::operator(), &t.user_id, true)
            .await
            .unwrap()
    );
    let app_router = router.clone();
    let index = html(&get(&app_router, "/dashboard", Some(&cookie)).await);
    assert!(index.contains("href=\"/dashboard/operations\""), "{index}");
    let page = get(&app_router, "/dashboard/operations", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    let body = html(&page);
    assert!(body.contains("machinewarm002") && body.contains("machineother02"));
    assert!(
        body.contains("user.grant_server_admin"),
        "the installation's audit log"
    );
    let token = csrf(&body);
    let drained = post_form(
        &app_router,
        "/dashboard/operations/machines/machinewarm002/drain",
        Some(&cookie),
        None,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(drained.status, StatusCode::SEE_OTHER);
    let state: String =
        sqlx::query_scalar("SELECT state FROM machines WHERE id = 'machinewarm002'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(state, "draining");
    // Still no way into another organization's projects.
    let theirs = get(
        &app_router,
        &format!("/dashboard/projects/{}", other.project.id),
        Some(&cookie),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);

    // Revoked: gone at once.
    d.orgs
        .set_server_admin(&common::operator(), &t.user_id, false)
        .await
        .unwrap();
    let app_router = router.clone();
    let refused = get(&app_router, "/dashboard/operations", Some(&cookie)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn live_views_are_bounded_per_session_and_in_total() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "live").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let app = common::app_with(
        &db,
        &[
            ("KILN_LIMITS__LIVE_STREAMS_PER_SESSION", "2"),
            ("KILN_LIMITS__LIVE_STREAMS_TOTAL", "3"),
        ],
    );
    let router = kiln::api::router(app.clone());
    let first = sign_in(&router, &email, "a long password").await;
    let second = sign_in(&router, &email, "a long password").await;
    let third = sign_in(&router, &email, "a long password").await;
    let path = format!("/dashboard/projects/{}/builds/events", t.project.id);
    let open = |cookie: &str| {
        use tower::ServiceExt;
        let req = Request::builder()
            .uri(&path)
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        router.clone().oneshot(req)
    };
    let a1 = open(&first).await.unwrap();
    let a2 = open(&first).await.unwrap();
    assert_eq!((a1.status(), a2.status()), (StatusCode::OK, StatusCode::OK));
    let refused = open(&first).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let text = String::from_utf8_lossy(
        &http_body_util::BodyExt::collect(refused.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .to_string();
    assert!(text.contains("already has 2 live views open"), "{text}");
    let b1 = open(&second).await.unwrap();
    assert_eq!(b1.status(), StatusCode::OK);
    // The replica's bound: nobody else gets one now.
    assert_eq!(
        open(&third).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(app.live_streams.count(), 3);
    // A closed view (the browser left) frees its place.
    drop(a1);
    assert_eq!(app.live_streams.count(), 2);
    assert_eq!(open(&third).await.unwrap().status(), StatusCode::OK);
    drop((a2, b1));
}

/// A sign-in form posted from `address` (as the server records a TCP peer).
async fn sign_in_from(
    router: &axum::Router,
    address: [u8; 4],
    email: &str,
    password: &str,
) -> Reply {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([("email", email), ("password", password)])
        .finish();
    let mut req = Request::builder()
        .method("POST")
        .uri("/dashboard/sign-in")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            address, 40000,
        ))));
    send(router, req).await
}

#[tokio::test]
async fn sign_in_is_throttled_per_email_and_address_and_a_stranger_cannot_lock_out_the_owner() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "throttle").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let router = kiln::api::router(app(&db));
    let stranger = [203, 0, 113, 66];
    for _ in 0..kiln::auth::throttle::MAX_FAILED_SIGN_INS {
        let reply = sign_in_from(&router, stranger, &email, "wrong").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // Locked out at the stranger's address: even the right password is refused, with
    // when to try again, and no session is started.
    let locked = sign_in_from(&router, stranger, &email, "a long password").await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        html(&locked).contains("try again in 15 minutes"),
        "{}",
        html(&locked)
    );
    assert!(!locked.headers.contains_key(header::SET_COOKIE));
    // The owner, from their own address, signs in as usual.
    let owner = sign_in_from(&router, [198, 51, 100, 7], &email, "a long password").await;
    assert_eq!(owner.status, StatusCode::SEE_OTHER, "{}", html(&owner));
    assert!(owner.headers.contains_key(header::SET_COOKIE));
    // The stranger gets no more guesses at other accounts than the address budget.
    let mut refused_at = None;
    for n in 0..kiln::auth::throttle::MAX_FAILED_PER_ADDRESS {
        let reply = sign_in_from(&router, stranger, &format!("u{n}@x.test"), "guess").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            refused_at = Some(n);
            break;
        }
    }
    assert_eq!(
        refused_at,
        Some(
            kiln::auth::throttle::MAX_FAILED_PER_ADDRESS
                - kiln::auth::throttle::MAX_FAILED_SIGN_INS
        ),
        "the ten guesses at the owner count against the address too"
    );
}

#[tokio::test]
async fn sign_in_refuses_what_is_not_an_email_before_storing_anything() {
    let db = TestDb::new().await;
    let app = app(&db);
    let router = kiln::api::router(app.clone());
    for bad in [
        "",
        "no-at-sign",
        "two@@x.test",
        "a b@x.test",
        &"x".repeat(400),
    ] {
        let reply = sign_in_from(&router, [192, 0, 2, 1], bad, "whatever").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(html(&reply).contains("like name@example.com"), "{bad:?}");
    }
    // A form over the limit is refused before it is read whole.
    let huge = "a".repeat(4_000_000) + "@x.test";
    let reply = sign_in_from(&router, [192, 0, 2, 1], &huge, "whatever").await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(html(&reply).contains("too large"), "{}", html(&reply));
    assert_eq!(app.sign_ins.tracked(), 0);
}

#[tokio::test]
async fn another_organizations_user_reaches_nothing_on_any_page_or_action() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "victim").await;
    let stranger = tenant(&db.pool, "stranger").await;
    let app = app(&db);
    let operator = common::operator();
    let spec = kiln::builds::BuildSpec {
        command: "build".into(),
        options: serde_json::json!([]),
        save: false,
        ephemeral_cache: false,
    };
    let (build, _, _) = app
        .builds
        .create(&operator, Some(&t.project.id), spec)
        .await
        .unwrap();
    let (token, _) = app
        .tokens
        .create_project_token(&operator, Some(&t.project.id), "ci", None)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO machines (id, provider, platform, project_id, state, active_builds)
         VALUES ('machinevictim1', 'local', 'amd64', $1, 'ready', 0)",
    )
    .bind(&t.project.id)
    .execute(&db.pool)
    .await
    .unwrap();
    common::set_password(&db.pool, &stranger.user_id, "a long password").await;
    let email = email_of(&db, &stranger.user_id).await;
    let router = kiln::api::router(app.clone());
    let cookie = sign_in(&router, &email, "a long password").await;
    let own = html(&get(&router, "/dashboard", Some(&cookie)).await);
    let csrf_token = csrf(&own);
    let (p, b, o) = (&t.project.id, &build.id, &t.org_id);
    for path in [
        format!("/dashboard/projects/{p}"),
        format!("/dashboard/projects/{p}/builds"),
        format!("/dashboard/projects/{p}/builds/events"),
        format!("/dashboard/projects/{p}/usage"),
        format!("/dashboard/projects/{p}/builds/{b}"),
        format!("/dashboard/projects/{p}/builds/{b}/logs/sha256:x"),
        format!("/dashboard/organizations/{o}/operations"),
    ] {
        let reply = get(&router, &path, Some(&cookie)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "GET {path}");
        assert!(!html(&reply).contains(&t.project.name), "GET {path}");
    }
    let forms: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            format!("/dashboard/projects/{p}/settings"),
            vec![
                ("cache_size_gb_amd64", "5"),
                ("cache_size_gb_arm64", "5"),
                ("build_timeout_minutes", "5"),
            ],
        ),
        (
            format!("/dashboard/projects/{p}/reset"),
            vec![("confirm", "yes")],
        ),
        (
            format!("/dashboard/projects/{p}/tokens"),
            vec![("name", "mine")],
        ),
        (
            format!("/dashboard/projects/{p}/tokens/{}/revoke", token.id),
            vec![],
        ),
        (
            format!("/dashboard/projects/{p}/trust-policies"),
            vec![
                ("provider", "github"),
                ("repository_owner", "evil"),
                ("repository", "repo"),
            ],
        ),
        (format!("/dashboard/projects/{p}/builds/{b}/share"), vec![]),
        (
            format!("/dashboard/organizations/{o}/machines/machinevictim1/drain"),
            vec![],
        ),
        (
            "/dashboard/projects".to_string(),
            vec![("organization_id", o.as_str()), ("name", "intruder")],
        ),
    ];
    let audit_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (path, fields) in &forms {
        let mut form = vec![("csrf", csrf_token.as_str())];
        form.extend(fields.iter().copied());
        let reply = post_form(&router, path, Some(&cookie), None, &form).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "POST {path}: {}",
            html(&reply)
        );
    }
    // Nothing changed anywhere.
    let audit_after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(audit_after, audit_before);
    let (size, shared): (i32, bool) = sqlx::query_as(
        "SELECT p.cache_size_gb_amd64, b.shared FROM projects p JOIN builds b ON b.project_id = p.id
         WHERE b.id = $1",
    )
    .bind(b)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((size, shared), (t.project.cache_size_gb_amd64, false));
    let machine: String =
        sqlx::query_scalar("SELECT state FROM machines WHERE id = 'machinevictim1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(machine, "ready");
}

#[tokio::test]
async fn the_model_list_shows_each_model_with_its_copy_from_line() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "models").await;
    common::set_password(&db.pool, &t.user_id, "a long password").await;
    let email = email_of(&db, &t.user_id).await;
    let store = tempfile::tempdir().unwrap();
    let store_dir = store.path().display().to_string();
    let app = common::app_with(
        &db,
        &[
            ("KILN_MODELS__LOCAL__DIR", store_dir.as_str()),
            ("KILN_SERVER__PUBLIC_URL", "https://kiln.example.com"),
        ],
    );
    let model = tempfile::tempdir().unwrap();
    std::fs::write(model.path().join("README.md"), "---\nlicense: mit\n---\n").unwrap();
    std::fs::create_dir(model.path().join("1_Pooling")).unwrap();
    std::fs::write(model.path().join("1_Pooling/<b>.json"), "{}").unwrap();
    app.models
        .import_directory(
            &common::operator(),
            kiln::registry::models::DirectoryImport {
                name: "acme/tiny".into(),
                dir: model.path().to_path_buf(),
                revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
                tags: vec![],
                source: None,
                license: None,
                hub_repository: None,
            },
        )
        .await
        .unwrap();
    let router = kiln::api::router(app);
    let cookie = sign_in(&router, &email, "a long password").await;

    let index = get(&router, "/dashboard", Some(&cookie)).await;
    assert!(html(&index).contains("href=\"/dashboard/models\""));
    let list = get(&router, "/dashboard/models", Some(&cookie)).await;
    assert_eq!(list.status, StatusCode::OK);
    let page = html(&list);
    assert!(
        page.contains("href=\"/dashboard/models/acme/tiny\""),
        "{page}"
    );
    assert!(page.contains("COPY --from=kiln.example.com/acme/tiny:latest / /model"));
    assert!(
        page.contains("<code>0123456789ab</code>"),
        "the revision, short"
    );

    let detail = get(&router, "/dashboard/models/acme/tiny", Some(&cookie)).await;
    assert_eq!(detail.status, StatusCode::OK);
    let page = html(&detail);
    assert!(page.contains("mit"), "the license");
    assert!(
        page.contains("1_Pooling/&lt;b&gt;.json"),
        "file names are escaped"
    );
    assert!(page.contains(
        "COPY --from=kiln.example.com/acme/tiny:0123456789abcdef0123456789abcdef01234567 / /model"
    ));
    let missing = get(&router, "/dashboard/models/acme/nope", Some(&cookie)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let anonymous = get(&router, "/dashboard/models", None).await;
    assert_eq!(anonymous.status, StatusCode::SEE_OTHER);
}
