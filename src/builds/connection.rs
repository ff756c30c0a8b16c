//! GetBuildKitConnection: files the platform's builder request on first ask, assigns it
//! inline (an idle builder is handed out at once), then holds the request until the
//! builder is ready, up to `builds.connection_wait_seconds`, answering `Active` the moment
//! it is; after that, `Pending`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::auth::{Action, Principal};
use crate::builds::{BuildRef, Builds};
use crate::db::builds::{self, Platform};
use crate::db::notify::Notification;
use crate::error::{Error, Result};
use crate::scheduler::{Assignment, Scheduler};

/// Where the CLI should connect for one platform of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuilderConnection {
    /// The builder serves: connect with this client certificate.
    Active(ActiveBuilder),
    /// Still starting: ask again after `wait_ms`.
    Pending { wait_ms: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveBuilder {
    /// `tcp://host:port` (the CLI requires the scheme).
    pub endpoint: String,
    /// The name in BuildKit's server certificate.
    pub server_name: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub ca_cert_pem: String,
}

pub async fn get(
    builds: &Builds,
    scheduler: &Scheduler,
    events: &broadcast::Sender<Arc<Notification>>,
    principal: &Principal,
    build_id: &str,
    platform: Platform,
) -> Result<BuilderConnection> {
    let build = builds
        .authorize(principal, build_id, Action::WriteBuild)
        .await?;
    if build.finished {
        return Err(Error::FailedPrecondition(
            "this build has already finished; start a new build".into(),
        ));
    }
    // Subscribe before looking, so a builder that becomes ready in between is not missed.
    let mut events = events.subscribe();
    builds::request_platform(builds.pool(), &build.id, platform).await?;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(builds.config.connection_wait_seconds);
    loop {
        if scheduler.assign(&build.id, platform).await? == Assignment::Ready
            && let Some(active) = active(builds, scheduler, &build, platform).await?
        {
            return Ok(BuilderConnection::Active(active));
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
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await;
        if woken.is_err() {
            return Ok(BuilderConnection::Pending {
                wait_ms: builds.config.pending_wait_ms,
            });
        }
    }
}

async fn active(
    builds: &Builds,
    scheduler: &Scheduler,
    build: &BuildRef,
    platform: Platform,
) -> Result<Option<ActiveBuilder>> {
    let Some((endpoint, server_name)) =
        builds::ready_endpoint(builds.pool(), &build.id, platform).await?
    else {
        return Ok(None);
    };
    let pki = scheduler.pki().await?;
    // Valid for the longest a build may run, plus slack for the final calls.
    let remaining = (build.cancels_at - chrono::Utc::now()).num_seconds().max(0) + 3600;
    let client = pki.client_certificate(&build.id, time::Duration::seconds(remaining))?;
    metrics::counter!("kiln_buildkit_connections_total").increment(1);
    Ok(Some(ActiveBuilder {
        endpoint,
        server_name,
        client_cert_pem: client.cert_pem,
        client_key_pem: client.key_pem,
        ca_cert_pem: pki.ca_pem.clone(),
    }))
}

/// ReleaseEndpoint: gives the platform's builder back (the build goes on; asking for a
/// connection again files a new request).
pub async fn release(
    builds: &Builds,
    principal: &Principal,
    build_id: &str,
    platform: Platform,
) -> Result<()> {
    let build = builds
        .authorize(principal, build_id, Action::WriteBuild)
        .await?;
    if builds::release_platform(builds.pool(), &build.id, platform).await? {
        builds.announce(&build.id).await;
    }
    Ok(())
}
