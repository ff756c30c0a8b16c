//! A shared build, read-only and without signing in, at its share link
//! (`depot.core.v1.BuildService.ShareBuild`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;

use super::message;
use super::pages::{TimedStep, duration, state_label, steps_section};
use super::web::{layout, page};
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
    let steps: Vec<TimedStep<'_>> = details.steps.iter().map(TimedStep::from).collect();
    let body = html! {
        h1 { "Build " span.code { (build.id) } }
        section.card {
            p {
                "Status: " strong data-testid="status" { (state_label(&build.state)) }
                " · " (duration(build))
                " · started " (build.created_at.format("%Y-%m-%d %H:%M UTC"))
            }
            @if let Some(error) = &build.error { p.error role="alert" { (error) } }
            p.muted { "A read-only page shared by this build's project." }
        }
        (steps_section(build, &steps))
    };
    let mut response = page(
        StatusCode::OK,
        layout(&format!("Build {}", build.id), None, body),
    );
    response.headers_mut().insert(
        axum::http::HeaderName::from_static("x-robots-tag"),
        axum::http::HeaderValue::from_static("noindex"),
    );
    response
}
