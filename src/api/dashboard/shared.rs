//! A shared build, read-only and without signing in, at its share link
//! (`depot.core.v1.BuildService.ShareBuild`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use super::{escape, message, page};
use crate::app::AppState;
use crate::error::Error;

pub async fn shared_build(
    State(app): State<AppState>,
    Path((build_id, token)): Path<(String, String)>,
) -> Response {
    let details = match app.builds.shared(&build_id, &token).await {
        Ok(details) => details,
        Err(Error::NotFound(text)) => {
            return message(StatusCode::NOT_FOUND, "Shared build not found", &text);
        }
        Err(err) => return err.into_response(),
    };
    let build = &details.build;
    let duration = build.finished_at.map_or_else(
        || "running".to_string(),
        |f| {
            let secs = (f - build.started_at.unwrap_or(build.created_at)).num_seconds();
            format!("{}m {:02}s", secs / 60, secs % 60)
        },
    );
    let mut rows = String::new();
    for step in &details.steps {
        let took = match (step.started_at, step.completed_at) {
            (Some(s), Some(c)) => format!("{:.1}s", (c - s).num_milliseconds() as f64 / 1000.0),
            _ => String::new(),
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
            escape(&step.name),
            if step.cached { "cached" } else { "" },
            took,
            escape(step.error.as_deref().unwrap_or_default()),
        ));
    }
    let error = build
        .error
        .as_deref()
        .map(|e| format!(r#"<p class="error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Build <span class="code">{id}</span></h1>
<p>Status: <strong data-testid="status">{state}</strong> · {duration} · started {created}</p>
{error}
<table><thead><tr><th>Step</th><th>Cache</th><th>Time</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>"#,
        id = escape(&build.id),
        state = escape(&build.state),
        created = build.created_at.format("%Y-%m-%d %H:%M UTC"),
    );
    (
        [("cache-control", "no-store"), ("x-robots-tag", "noindex")],
        Html(page("Shared build", &body)),
    )
        .into_response()
}
