//! GetBuildKitConnection: files the platform's builder request on first ask, assigns it
//! inline (an idle builder is handed out at once), then holds the request until the
//! builder is ready, up to `builds.connection_wait_seconds`, answering `active` the moment
//! it is; after that, `pending{wait_ms}`.

use std::time::Duration;

use crate::app::App;
use crate::auth::{Action, Principal};
use crate::builds::BuildRef;
use crate::db::builds::{self, Platform};
use crate::error::{Error, Result};
use crate::proto::depot::cli::v1 as pb;
use crate::proto::depot::cli::v1::get_build_kit_connection_response::{self as conn, Connection};
use crate::scheduler::Assignment;

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
    // Subscribe before looking, so a builder that becomes ready in between is not missed.
    let mut events = app.events.subscribe();
    builds::request_platform(&app.db, &build.id, platform).await?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(app.config.builds.connection_wait_seconds);
    loop {
        if app.scheduler.assign(&build.id, platform).await? == Assignment::Ready
            && let Some(active) = active(app, &build, platform).await?
        {
            return Ok(pb::GetBuildKitConnectionResponse {
                connection: Some(Connection::Active(active)),
            });
        }
        let woken = tokio::time::timeout_at(deadline, async {
            loop {
                match events.recv().await {
                    Ok(event)
                        if event.channel == crate::builds::BUILD_CHANNEL
                            && event.payload == build.id =>
                    {
                        return;
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
        .await;
        if woken.is_err() {
            return Ok(pending(app));
        }
    }
}

async fn active(
    app: &App,
    build: &BuildRef,
    platform: Platform,
) -> Result<Option<conn::ActiveConnection>> {
    let build_id = build.id.as_str();
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT m.endpoint, m.server_name FROM build_platforms bp JOIN machines m ON m.id = bp.builder_id
         WHERE bp.build_id = $1 AND bp.platform = $2 AND bp.state = 'ready' AND m.endpoint IS NOT NULL",
    )
    .bind(build_id)
    .bind(platform.as_str())
    .fetch_optional(&app.db)
    .await?;
    let Some((endpoint, server_name)) = row else {
        return Ok(None);
    };
    let pki = app.scheduler.pki().await?;
    // Valid for the longest a build may run, plus slack for the final calls.
    let remaining = (build.cancels_at - chrono::Utc::now()).num_seconds().max(0) + 3600;
    let client = pki.client_certificate(build_id, time::Duration::seconds(remaining))?;
    metrics::counter!("kiln_buildkit_connections_total").increment(1);
    Ok(Some(conn::ActiveConnection {
        endpoint,
        server_name,
        cert: Some(pb::Cert {
            cert: client.cert_pem,
            key: client.key_pem,
        }),
        ca_cert: Some(pb::Cert {
            cert: pki.ca_pem.clone(),
            key: String::new(),
        }),
        compressor: Some(conn::active_connection::Compressor::Identity(
            conn::active_connection::Identity {},
        )),
    }))
}

pub fn pending(app: &App) -> pb::GetBuildKitConnectionResponse {
    pb::GetBuildKitConnectionResponse {
        connection: Some(Connection::Pending(conn::PendingConnection {
            wait_ms: app.config.builds.pending_wait_ms as i32,
        })),
    }
}
