//! GetBuildKitConnection: files the platform's builder request on first ask, then answers
//! `active` once a builder is ready for it, or `pending{wait_ms}`.

use crate::app::App;
use crate::auth::{Action, Principal};
use crate::db::builds::{self, Platform};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1 as pb;

pub async fn get(
    app: &App,
    principal: &Principal,
    build_id: &str,
    platform: Platform,
) -> Result<pb::GetBuildKitConnectionResponse> {
    let build = app
        .builds
        .authorize(principal, build_id, Action::WriteBuild)
        .await?;
    if build.finished {
        return Err(Error::FailedPrecondition(
            "this build has already finished; start a new build".into(),
        ));
    }
    builds::request_platform(&app.db, &build.id, platform).await?;
    Ok(pending(app))
}

pub fn pending(app: &App) -> pb::GetBuildKitConnectionResponse {
    pb::GetBuildKitConnectionResponse {
        connection: Some(pb::get_build_kit_connection_response::Connection::Pending(
            pb::get_build_kit_connection_response::PendingConnection {
                wait_ms: app.config.builds.pending_wait_ms as i32,
            },
        )),
    }
}
