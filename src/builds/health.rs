//! ReportBuildHealth coalescing: the CLI reports every 5 s per build and platform; each
//! replica collects reports in memory and writes them in one statement per flush, so
//! thousands of concurrent builds cost one UPDATE a second, not thousands.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::builds::{self, Platform};
use crate::error::Result;

pub struct HealthTracker {
    pool: PgPool,
    pending: Mutex<HashSet<(String, Platform)>>,
    flush_every: Duration,
}

impl HealthTracker {
    pub fn new(pool: PgPool, flush_every: Duration) -> Self {
        HealthTracker {
            pool,
            pending: Mutex::new(HashSet::new()),
            flush_every,
        }
    }

    pub fn report(&self, build_id: &str, platform: Platform) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert((build_id.to_string(), platform));
        }
    }

    /// Writes every report collected since the last flush; returns how many.
    pub async fn flush(&self) -> Result<usize> {
        let batch: Vec<(String, Platform)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let (ids, platforms): (Vec<String>, Vec<String>) = batch
            .iter()
            .map(|(id, p)| (id.clone(), p.as_str().to_string()))
            .unzip();
        if let Err(err) = builds::record_health(&self.pool, &ids, &platforms).await {
            // Put them back; the next flush retries.
            if let Ok(mut pending) = self.pending.lock() {
                pending.extend(batch);
            }
            return Err(err);
        }
        metrics::counter!("kiln_build_health_writes_total").increment(1);
        Ok(ids.len())
    }

    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.flush_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = cancel.cancelled() => break,
            }
            if let Err(err) = self.flush().await {
                tracing::debug!(error = %err, "health flush failed; will retry");
            }
        }
        let _ = self.flush().await;
    }
}
