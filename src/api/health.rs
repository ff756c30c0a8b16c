//! Liveness, readiness and metrics endpoints. None of them needs a token.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::app::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Answers while the process is up.
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(json!({"status": "ok"})))
}

/// Ready when the database answers and carries every migration this binary knows.
async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let not_ready = |reason: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "reason": reason})),
        )
    };
    let check = async {
        if app.is_migrated() {
            sqlx::query("SELECT 1").execute(&app.db).await.map(|_| true)
        } else {
            crate::db::is_migrated(&app.db).await
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(true)) => {
            app.mark_migrated();
            (StatusCode::OK, axum::Json(json!({"status": "ready"})))
        }
        Ok(Ok(false)) => not_ready("database is not migrated yet"),
        Ok(Err(_)) | Err(_) => not_ready("database unreachable"),
    }
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let size = app.db.size();
    let idle = app.db.num_idle() as u32;
    metrics::gauge!("kiln_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("kiln_db_pool_connections", "state" => "in_use")
        .set(size.saturating_sub(idle) as f64);
    metrics::gauge!("kiln_db_pool_max_connections").set(app.config.database.max_connections as f64);
    metrics::gauge!("kiln_ready").set(if app.is_migrated() { 1.0 } else { 0.0 });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}
