//! The REST API's public-API operations: settings edits guarded by ETag/If-Match, builds
//! without a CLI, steps, share links and usage, with consistent pages and errors.
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};

use common::http::{Reply, request, send};
use common::{TestDb, app, tenant};

fn body(reply: &Reply) -> Value {
    reply.json_or_text()
}

async fn patch_if_match(
    router: &axum::Router,
    path: &str,
    token: &str,
    if_match: &str,
    patch: Value,
) -> Reply {
    let req = Request::builder()
        .method("PATCH")
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::IF_MATCH, if_match)
        .body(Body::from(patch.to_string()))
        .unwrap();
    send(router, req).await
}

#[tokio::test]
async fn concurrent_settings_edits_lose_with_412_and_change_nothing() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "etag").await;
    let router = kiln::api::router(app(&db));
    let path = format!("/api/v1/projects/{}", t.project.id);
    let token = t.user_token.as_str();

    let read = request(&router, "GET", &path, Some(token), None).await;
    assert_eq!(read.status, StatusCode::OK);
    let etag = read.headers[header::ETAG].to_str().unwrap().to_string();
    assert!(etag.starts_with("\"v"), "{etag}");

    // Two people read the same version; the first write wins, the second gets 412.
    let first = patch_if_match(
        &router,
        &path,
        token,
        &etag,
        json!({"cache_size_gb_amd64": 60}),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", body(&first));
    let newer = first.headers[header::ETAG].to_str().unwrap().to_string();
    assert_ne!(newer, etag);
    let second = patch_if_match(
        &router,
        &path,
        token,
        &etag,
        json!({"cache_size_gb_amd64": 90}),
    )
    .await;
    assert_eq!(second.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(body(&second)["code"], "failed_precondition");
    assert!(
        body(&second)["message"]
            .as_str()
            .unwrap()
            .contains("read it again")
    );
    let now = request(&router, "GET", &path, Some(token), None).await;
    assert_eq!(body(&now)["project"]["cache_size_gb_amd64"], 60);
    assert_eq!(now.headers[header::ETAG].to_str().unwrap(), newer);

    // Weak and foreign tags never match; `*` and a list holding the current tag do.
    for stale in ["W/\"v2\"", "\"abc\"", "\"v999\""] {
        let r = patch_if_match(&router, &path, token, stale, json!({"name": "x"})).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{stale}");
    }
    let listed = patch_if_match(
        &router,
        &path,
        token,
        &format!("\"v0\", {newer}"),
        json!({"cache_size_gb_arm64": 70}),
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", body(&listed));
    let any = patch_if_match(
        &router,
        &path,
        token,
        "*",
        json!({"cache_size_gb_arm64": 80}),
    )
    .await;
    assert_eq!(any.status, StatusCode::OK);
    // Without If-Match, updates are unconditional.
    let plain = request(
        &router,
        "PATCH",
        &path,
        Some(token),
        Some(json!({"cache_retention_days": 9})),
    )
    .await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(body(&plain)["project"]["name"], t.project.name.as_str());

    // The audit log holds the four updates that went through (not the refused ones),
    // filtered and paged.
    let audit = format!("/api/v1/organizations/{}/audit-events", t.org_id);
    let updates = request(
        &router,
        "GET",
        &format!(
            "{audit}?action=project.update&target_id={}&page_size=3",
            t.project.id
        ),
        Some(token),
        None,
    )
    .await;
    assert_eq!(updates.status, StatusCode::OK, "{:?}", body(&updates));
    assert_eq!(body(&updates)["events"].as_array().unwrap().len(), 3);
    let next = body(&updates)["next_page_token"]
        .as_str()
        .unwrap()
        .to_string();
    let last = request(
        &router,
        "GET",
        &format!("{audit}?action=project.update&page_size=3&page_token={next}"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&last)["events"].as_array().unwrap().len(), 1);
    assert_eq!(body(&last)["next_page_token"], "");
    let none = request(
        &router,
        "GET",
        &format!("{audit}?action=project.delete"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&none)["events"], json!([]));
    for bad in [
        "since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
        "page_size=0.5",
        "page_token=x",
        "actor=me",
    ] {
        let r = request(&router, "GET", &format!("{audit}?{bad}"), Some(token), None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", body(&r));
    }
}

#[tokio::test]
async fn builds_steps_sharing_and_usage_over_rest() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "rest").await;
    let other = tenant(&db.pool, "other").await;
    let router = kiln::api::router(app(&db));
    let token = t.user_token.as_str();
    let project = &t.project.id;

    let created = request(
        &router,
        "POST",
        &format!("/api/v1/projects/{project}/builds"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", body(&created));
    let build = body(&created)["build"]["id"].as_str().unwrap().to_string();
    let build_token = body(&created)["build_token"].as_str().unwrap().to_string();
    let foreign = request(
        &router,
        "POST",
        &format!("/api/v1/projects/{}/builds", other.project.id),
        Some(token),
        None,
    )
    .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);

    // The BuildKit endpoint operations, with the build's token.
    let bad = request(
        &router,
        "GET",
        &format!("/api/v1/builds/{build}/endpoint?platform=sparc"),
        Some(&build_token),
        None,
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(body(&bad)["message"].as_str().unwrap().contains("amd64"));
    let health = request(
        &router,
        "POST",
        &format!("/api/v1/builds/{build}/health"),
        Some(&build_token),
        None,
    )
    .await;
    assert_eq!(health.status, StatusCode::OK, "{:?}", body(&health));
    assert!(body(&health)["cancels_at"].is_string());
    let release = request(
        &router,
        "POST",
        &format!("/api/v1/builds/{build}/release?platform=arm64"),
        Some(&build_token),
        None,
    )
    .await;
    assert_eq!(release.status, StatusCode::NO_CONTENT);

    // Tokens are renamed over REST too.
    let created_token = request(
        &router,
        "POST",
        &format!("/api/v1/projects/{project}/tokens"),
        Some(token),
        Some(json!({"name": "ci"})),
    )
    .await;
    let token_id = body(&created_token)["token"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let renamed = request(
        &router,
        "PATCH",
        &format!("/api/v1/tokens/{token_id}"),
        Some(token),
        Some(json!({"name": "deploys"})),
    )
    .await;
    assert_eq!(
        renamed.status,
        StatusCode::NO_CONTENT,
        "{:?}",
        body(&renamed)
    );
    let listed_tokens = request(
        &router,
        "GET",
        &format!("/api/v1/projects/{project}/tokens"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&listed_tokens)["tokens"][0]["name"], "deploys");
    let foreign_rename = request(
        &router,
        "PATCH",
        &format!("/api/v1/tokens/{token_id}"),
        Some(&other.user_token),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(foreign_rename.status, StatusCode::NOT_FOUND);

    let finish = format!("/api/v1/builds/{build}/finish");
    let bad = request(
        &router,
        "POST",
        &finish,
        Some(&build_token),
        Some(json!({"status": "exploded"})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = request(
        &router,
        "POST",
        &finish,
        Some(&build_token),
        Some(json!({"status": "success", "error": "x"})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let done = request(
        &router,
        "POST",
        &finish,
        Some(&build_token),
        Some(json!({"status": "failed", "error": "exit 1"})),
    )
    .await;
    assert_eq!(done.status, StatusCode::NO_CONTENT, "{:?}", body(&done));

    let steps = request(
        &router,
        "GET",
        &format!("/api/v1/builds/{build}/steps?page_size=5"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(steps.status, StatusCode::OK);
    assert_eq!(body(&steps)["steps"], json!([]));
    assert_eq!(body(&steps)["next_page_token"], "");
    for bad in [
        "page_size=-1",
        "page_size=100000",
        "page_token=forged",
        "colour=red",
        "page_size=ten",
    ] {
        let r = request(
            &router,
            "GET",
            &format!("/api/v1/builds/{build}/steps?{bad}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", body(&r));
        assert!(body(&r)["message"].is_string());
    }
    let listed = request(
        &router,
        "GET",
        &format!("/api/v1/projects/{project}/builds?page_size=1"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&listed)["builds"][0]["id"], build.as_str());

    let shared = request(
        &router,
        "POST",
        &format!("/api/v1/builds/{build}/share"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(shared.status, StatusCode::OK, "{:?}", body(&shared));
    let url = body(&shared)["share_url"].as_str().unwrap().to_string();
    let path = url[url.find("/shared/").unwrap()..].to_string();
    let page = request(&router, "GET", &path, None, None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page.body).contains("exit 1"));
    let stop = request(
        &router,
        "DELETE",
        &format!("/api/v1/builds/{build}/share"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(stop.status, StatusCode::NO_CONTENT);
    assert_eq!(
        request(&router, "GET", &path, None, None).await.status,
        StatusCode::NOT_FOUND
    );
    let stranger = request(
        &router,
        "POST",
        &format!("/api/v1/builds/{build}/share"),
        Some(&other.user_token),
        None,
    )
    .await;
    assert_eq!(stranger.status, StatusCode::NOT_FOUND);

    let usage = request(&router, "GET", "/api/v1/usage", Some(token), None).await;
    assert_eq!(usage.status, StatusCode::OK, "{:?}", body(&usage));
    assert_eq!(body(&usage)["projects"][0]["build_count"], 1);
    let mine = request(
        &router,
        "GET",
        &format!("/api/v1/projects/{project}/usage"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&mine)["usage"]["build_count"], 1);
    let theirs = request(
        &router,
        "GET",
        &format!("/api/v1/projects/{project}/usage"),
        Some(&other.user_token),
        None,
    )
    .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);
    let page = request(
        &router,
        "GET",
        "/api/v1/usage/projects?page_size=1",
        Some(token),
        None,
    )
    .await;
    assert_eq!(body(&page)["projects"].as_array().unwrap().len(), 1);
    for bad in [
        "start=2026-02-01T00:00:00Z&end=2026-01-01T00:00:00Z",
        "start=yesterday",
        "start=1900-01-01T00:00:00Z",
    ] {
        let r = request(
            &router,
            "GET",
            &format!("/api/v1/usage?{bad}"),
            Some(token),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", body(&r));
    }
}

#[tokio::test]
async fn project_listings_page_by_name_and_wrong_input_changes_nothing() {
    let db = TestDb::new().await;
    let t = tenant(&db.pool, "pages").await;
    for name in ["b-web", "a-api", "c-ops"] {
        common::project(&db.pool, &t.org_id, name).await;
    }
    let router = kiln::api::router(app(&db));
    let token = t.user_token.as_str();
    let first = request(
        &router,
        "GET",
        "/api/v1/projects?page_size=2",
        Some(token),
        None,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", body(&first));
    let names: Vec<String> = body(&first)["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a-api", "b-web"]);
    let next = body(&first)["next_page_token"]
        .as_str()
        .unwrap()
        .to_string();
    let second = request(
        &router,
        "GET",
        &format!("/api/v1/projects?page_size=2&page_token={next}"),
        Some(token),
        None,
    )
    .await;
    let second = body(&second);
    let rest: Vec<&str> = second["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["c-ops", t.project.name.as_str()]);
    assert_eq!(second["next_page_token"], "");

    // Connect JSON with a field of the wrong type, or an unknown one: a clear 400, and no
    // build is created.
    let builds_before: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for bad in [
        json!({"projectId": 5}),
        json!({"projectId": t.project.id, "colour": "red"}),
    ] {
        let req = Request::builder()
            .method("POST")
            .uri("/depot.build.v1.BuildService/CreateBuild")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bad.to_string()))
            .unwrap();
        let reply = send(&router, req).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body(&reply)["code"], "invalid_argument", "{bad}");
        assert!(body(&reply)["message"].as_str().unwrap().len() > 10);
    }
    let req = Request::builder()
        .method("POST")
        .uri("/depot.core.v1.UsageService/GetUsage")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"startAt": "not a time"}).to_string()))
        .unwrap();
    assert_eq!(send(&router, req).await.status, StatusCode::BAD_REQUEST);
    let builds_after: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(builds_before, builds_after);
}
