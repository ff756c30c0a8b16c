//! One LISTEN connection per process, fanned out to the parts that wait on it.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub enum Event {
    Notification {
        channel: String,
        payload: String,
    },
    /// The connection was (re)established; notifications may have been missed before it.
    Connected,
}

/// Listens on `channels` until `cancel` fires, reconnecting with backoff, and calls
/// `on_event` for every notification and every (re)connection.
pub async fn listen(
    pool: PgPool,
    channels: Vec<&'static str>,
    cancel: CancellationToken,
    on_event: impl Fn(Event),
) {
    let mut backoff = Duration::from_millis(250);
    'connect: while !cancel.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::debug!(error = %err, "LISTEN connection failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(err) = listener.listen_all(channels.iter().copied()).await {
            tracing::debug!(error = %err, "LISTEN failed; retrying");
            continue;
        }
        backoff = Duration::from_millis(250);
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
                // The connection dropped; sqlx reconnects on the next call.
                Ok(None) => on_event(Event::Connected),
                Err(err) => {
                    tracing::debug!(error = %err, "LISTEN connection lost; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}
