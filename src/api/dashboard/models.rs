//! The model registry in the dashboard: every model with its current revision, size,
//! files and the `COPY --from` line to paste, and a page per model with its revisions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};

use super::web::{Session, error_page, layout, page};
use crate::app::AppState;

/// Bytes for people: 1 decimal, powers of 1000 as model hubs show them.
fn size(bytes: i64) -> String {
    let bytes = bytes.max(0) as f64;
    match bytes {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

fn copy_line(line: &str) -> Markup {
    html! { pre.copy { code { (line) } } }
}

pub async fn models(State(app): State<AppState>, session: Session) -> Response {
    let models = match app.models.list(Some(&session.principal)).await {
        Ok(models) => models,
        Err(err) => return error_page(Some(&session), err),
    };
    let body = html! {
        h1 { "Models" }
        p.muted {
            "AI models served as OCI images: embed one in an image with its "
            code { "COPY --from" } " line. Import more with "
            code { "kiln models import" } " or " code { "kiln models import-hub" } "."
        }
        @if models.is_empty() {
            p { "No models yet." }
        } @else {
            table {
                thead { tr { th { "Model" } th { "Revision" } th { "Size" } th { "Files" } th { "Pulls" } th { "Imported" } } }
                tbody {
                    @for model in &models {
                        tr {
                            td { a href=(format!("/dashboard/models/{}", model.name)) { (model.name) } }
                            td { code { (short(&model.revision)) } }
                            td { (size(model.file_bytes)) }
                            td { (model.file_count) }
                            td { (model.pull_count) }
                            td.muted { (model.imported_at.format("%Y-%m-%d %H:%M UTC")) }
                        }
                        tr.detail {
                            td colspan="6" { (copy_line(&app.models.copy_from_line(&model.name, "latest"))) }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, layout("Models", Some(&session), body))
}

fn short(revision: &str) -> &str {
    if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        &revision[..12]
    } else {
        revision
    }
}

pub async fn model(
    State(app): State<AppState>,
    session: Session,
    Path(name): Path<String>,
) -> Response {
    let detail = match app.models.get(Some(&session.principal), &name).await {
        Ok(detail) => detail,
        Err(err) => return error_page(Some(&session), err),
    };
    let model = &detail.model;
    let body = html! {
        p { a href="/dashboard/models" { "← Models" } }
        h1 { (model.name) }
        (copy_line(&detail.copy_from))
        dl {
            @if let Some(source) = &model.source { dt { "Source" } dd { (source) } }
            @if let Some(license) = &model.license { dt { "License" } dd { (license) } }
            dt { "Tags" } dd { (model.tags.join(", ")) }
            dt { "Pulls" } dd { (model.pull_count) }
        }
        @for revision in &detail.revisions {
            section.card {
                h2 { "Revision " code { (revision.revision) } }
                p.muted {
                    (size(revision.file_bytes)) " in " (revision.file_count) " files; image "
                    (size(revision.image_bytes)) " (" (revision.layer_format) " layers); imported "
                    (revision.imported_at.format("%Y-%m-%d %H:%M UTC"))
                }
                p { "Digest " code { (revision.index_digest) } }
                (copy_line(&app.models.copy_from_line(&model.name, &revision.revision)))
                table {
                    thead { tr { th { "File" } th { "Size" } } }
                    tbody {
                        @for file in revision.files.as_array().into_iter().flatten() {
                            tr {
                                td { code { (file["path"].as_str().unwrap_or("")) } }
                                td { (size(file["size"].as_i64().unwrap_or(0))) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, layout(&model.name, Some(&session), body))
}
