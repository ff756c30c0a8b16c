//! The JSON API under `/api/v1`, used by the dashboard and by scripts. Translation only:
//! each handler maps the request onto one domain call and the answer to JSON.
//!
//! Handlers are registered through `utoipa_axum::routes!`, which also collects their
//! `#[utoipa::path]` descriptions: the OpenAPI 3.1 document at `/api/v1/openapi.json` is
//! generated from the handlers that serve, so it cannot drift from them. Every listing
//! pages the same way (`page_size`, `page_token` → `next_page_token`, empty on the last
//! page) and every error is an [`ErrorBody`].

mod builds;
mod models;
mod orgs;
mod projects;
mod usage;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::app::AppState;
use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kiln API",
        description = "Kiln's REST API: projects and their cache settings, tokens, trust \
            relationships, builds, usage, and operator tools. Authenticate with \
            `Authorization: Bearer <token>`. The same operations are served over Connect as \
            Depot's public API."
    ),
    servers((url = "/api/v1")),
    components(schemas(ErrorBody)),
    modifiers(&BearerToken),
    security(("token" = [])),
    tags(
        (name = "organizations", description = "Who you are, your organizations and their audit log"),
        (name = "projects", description = "Projects, their settings, tokens and trust relationships"),
        (name = "cache", description = "Layer-cache volumes"),
        (name = "builds", description = "Builds, their steps, logs and share links"),
        (name = "usage", description = "Builds, build time, time saved and cache storage"),
        (name = "operators", description = "Builder machines (operators only)"),
        (name = "models", description = "The model registry: models served as OCI images at /v2/"),
    )
)]
struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A Kiln token: user, organization or project (kiln_u_…, kiln_o_…, kiln_p_…)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The API's routes and its OpenAPI document, built from the same handlers.
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(orgs::routes())
        .merge(projects::routes())
        .merge(builds::routes())
        .merge(usage::routes())
        .merge(models::routes())
        .split_for_parts()
}

/// The OpenAPI document (for tooling and tests).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

pub fn routes() -> Router<AppState> {
    let (router, document) = api();
    let document: Arc<str> = document
        .to_json()
        .expect("the OpenAPI document serializes")
        .into();
    router.route(
        "/openapi.json",
        get(move || {
            let document = document.clone();
            async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "public, max-age=300"),
                    ],
                    document.to_string(),
                )
                    .into_response()
            }
        }),
    )
}

/// Page parameters every listing takes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Rows per page: 1 to 1000 (default 100).
    #[param(minimum = 0, maximum = 1000)]
    pub page_size: Option<i64>,
    /// The `next_page_token` of the previous page; absent for the first page.
    pub page_token: Option<String>,
}

impl PageQuery {
    fn token(&self) -> &str {
        self.page_token.as_deref().unwrap_or_default()
    }
}
