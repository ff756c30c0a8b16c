//! One LISTEN connection per process, fanned out to the parts that wait on it.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

/// A Postgres notification, fanned out to in-process waiters.
#[derive(Debug)]
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

#[derive(Debug, Clone)]
pub enum Event {
    Notification {
        channel: String,
        payload: String,
    },
    /// The connection was (re)established; notifications may have been missed before it.
    Connected,
}

/// Reconnect delays grow from this to `MAX_BACKOFF` while the connection keeps failing.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection that stayed up this long counts as healthy: the next failure starts the
/// backoff afresh.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Listens on `channels` until `cancel` fires, reconnecting with exponential backoff,
/// and calls `on_event` for every notification and every (re)connection.
pub async fn listen(
    pool: PgPool,
    channels: Vec<&'static str>,
    cancel: CancellationToken,
    on_event: impl Fn(Event),
) {
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    while !cancel.is_cancelled() {
        if !first {
            metrics::counter!("kiln_listen_reconnects_total").increment(1);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        first = false;
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::debug!(error = %err, "LISTEN connection failed; retrying");
                continue;
            }
        };
        // We reconnect ourselves, with backoff, so a flapping connection is not retried
        // in a tight loop.
        listener.eager_reconnect(false);
        if let Err(err) = listener.listen_all(channels.iter().copied()).await {
            tracing::debug!(error = %err, "LISTEN failed; retrying");
            continue;
        }
        let connected_at = tokio::time::Instant::now();
        on_event(Event::Connected);
        loop {
            let next = tokio::select! {
                next = listener.try_recv() => next,
                _ = cancel.cancelled() => return,
            };
            match next {
                Ok(Some(n)) => on_event(Event::Notification {
                    channel: n.channel().to_string(),
                    payload: n.payload().to_string(),
                }),
                // The connection dropped (a restart, pg_terminate_backend): reconnect.
                Ok(None) => {
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
        if connected_at.elapsed() >= HEALTHY_AFTER {
            backoff = MIN_BACKOFF;
        }
    }
}

/// Queues a notification; inside a transaction it is delivered at commit, or never.
pub async fn send<'e>(
    db: impl sqlx::PgExecutor<'e>,
    channel: &str,
    payload: &str,
) -> crate::error::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(db)
        .await?;
    Ok(())
}
