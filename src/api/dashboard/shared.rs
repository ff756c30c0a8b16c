//! A shared build, read-only and without signing in, at its share link
//! (`depot.core.v1.BuildService.ShareBuild`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;

use super::message;
use super::pages::{TimedStep, duration, state_label, waterfall};
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
    let steps: Vec<TimedStep<'_>> = details
        .steps
        .iter()
        .map(|s| TimedStep {
            name: &s.name,
            cached: s.cached,
            started_at: s.started_at,
            completed_at: s.completed_at,
        })
        .collect();
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
        section.card {
            h2 { "Steps" }
            @if details.steps.is_empty() { p.muted { "No steps reported." } } @else {
                (waterfall(build, &steps))
                table {
                    thead { tr { th { "Step" } th { "Cache" } th { "Time" } th { "Error" } } }
                    tbody {
                        @for step in &details.steps {
                            tr {
                                td { (step.name) }
                                td { @if step.cached { "cached" } }
                                td {
                                    @if let (Some(s), Some(c)) = (step.started_at, step.completed_at) {
                                        (format!("{:.1}s", (c - s).num_milliseconds() as f64 / 1000.0))
                                    }
                                }
                                td.error { (step.error.as_deref().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
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
