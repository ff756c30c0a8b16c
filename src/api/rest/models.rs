//! The model registry over REST: the model list (what the dashboard shows) and hub
//! imports, which run as background jobs. Pulls themselves are the `/v2/` API.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::extract::{ApiJson, Auth};
use crate::app::AppState;
use crate::db::models::ModelListing;
use crate::error::{ErrorBody, Result};
use crate::registry::models::{HubImport, ModelDetail};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_models))
        .routes(routes!(get_model))
        .routes(routes!(import_model))
}

#[derive(Serialize, ToSchema)]
struct ModelEntry {
    #[serde(flatten)]
    model: ModelListing,
    /// The Dockerfile line that embeds it.
    copy_from: String,
}

#[derive(Serialize, ToSchema)]
struct ModelList {
    models: Vec<ModelEntry>,
}

/// Every model with its current revision (`latest`), size, files and `COPY --from` line.
#[utoipa::path(get, path = "/models", tag = "models",
    responses((status = 200, body = ModelList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn list_models(
    State(app): State<AppState>,
    Auth(principal): Auth,
) -> Result<axum::Json<ModelList>> {
    let models = app.models.list(Some(&principal)).await?;
    Ok(axum::Json(ModelList {
        models: models
            .into_iter()
            .map(|model| ModelEntry {
                copy_from: app.models.copy_from_line(&model.name, "latest"),
                model,
            })
            .collect(),
    }))
}

/// One model with every revision and its files. The name's `/` is sent as `%2F`.
#[utoipa::path(get, path = "/models/{name}", tag = "models",
    params(("name" = String, Path, description = "The model's name, e.g. sentence-transformers%2Fall-minilm-l6-v2")),
    responses((status = 200, body = ModelDetail), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn get_model(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelDetail>> {
    Ok(axum::Json(app.models.get(Some(&principal), &name).await?))
}

#[derive(Serialize, ToSchema)]
struct ImportStarted {
    /// The background job (`kiln admin jobs list`).
    job_id: i64,
}

/// Imports a revision of a hub repository in the background (server admins). The job
/// resumes interrupted downloads and checks every file against the hub's hashes.
#[utoipa::path(post, path = "/models/imports", tag = "models", request_body = HubImport,
    responses((status = 202, body = ImportStarted), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn import_model(
    State(app): State<AppState>,
    Auth(principal): Auth,
    ApiJson(import): ApiJson<HubImport>,
) -> Result<(StatusCode, axum::Json<ImportStarted>)> {
    let job_id = app.models.start_hub_import(&principal, import).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(ImportStarted { job_id })))
}
