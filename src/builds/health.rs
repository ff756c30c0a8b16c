//! ReportBuildHealth coalescing. The CLI reports every 5 s per build and platform, but
//! the reaper only needs to know a build is alive to within a fraction of the health
//! timeout. So each replica remembers when it last recorded each build, records it again
//! only after `write_every`, and writes what is due in one statement per flush: 5,000
//! live builds cost a few hundred row updates a second, in one or two statements.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::builds;
use crate::error::Result;

pub struct HealthTracker {
    pool: PgPool,
    state: Mutex<State>,
    flush_every: Duration,
    write_every: Duration,
}

#[derive(Default)]
struct State {
    /// Builds whose report is due to be written at the next flush.
    pending: HashSet<String>,
    /// When each build was last queued for writing.
    written: HashMap<String, Instant>,
}

impl HealthTracker {
    pub fn new(pool: PgPool, flush_every: Duration, write_every: Duration) -> Self {
        HealthTracker {
            pool,
            state: Mutex::new(State::default()),
            flush_every,
            write_every,
        }
    }

    /// Records a report; cheap, in memory.
    pub fn report(&self, build_id: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        let due = state
            .written
            .get(build_id)
            .is_none_or(|at| now.duration_since(*at) >= self.write_every);
        if due {
            state.written.insert(build_id.to_string(), now);
            state.pending.insert(build_id.to_string());
        }
    }

    /// Writes every due report; returns how many builds it touched.
    pub async fn flush(&self) -> Result<usize> {
        let batch: Vec<String> = match self.state.lock() {
            Ok(mut state) => {
                // Forget builds not heard from for a while, so the map stays small.
                let horizon = self.write_every * 4;
                state.written.retain(|_, at| at.elapsed() < horizon);
                state.pending.drain().collect()
            }
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = builds::record_health(&self.pool, &batch).await {
            if let Ok(mut state) = self.state.lock() {
                state.pending.extend(batch);
            }
            return Err(err);
        }
        metrics::counter!("kiln_build_health_writes_total").increment(1);
        metrics::counter!("kiln_build_health_rows_total").increment(batch.len() as u64);
        Ok(batch.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_within_the_write_interval_coalesce() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .unwrap();
        let tracker = HealthTracker::new(pool, Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            tracker.report("a");
            tracker.report("b");
        }
        let state = tracker.state.lock().unwrap();
        assert_eq!(state.pending.len(), 2);
    }
}
