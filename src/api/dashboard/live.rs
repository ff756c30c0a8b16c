//! Bounds on the dashboard's live streams (server-sent events): each holds a task, a
//! subscription and a database query per change, so a session may keep only a few open
//! and the whole replica only so many. Past either bound a stream is refused with 429.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Open {
    total: usize,
    by_session: HashMap<String, usize>,
}

/// The live streams open on this replica, per session and in total.
pub struct LiveStreams {
    open: Arc<Mutex<Open>>,
    per_session: usize,
    total: usize,
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This session has as many open as it may.
    Session(usize),
    /// The replica has as many open as it may.
    Total,
}

/// One open stream; dropping it (the client went away, or the stream ended) frees it.
pub struct LiveStream {
    open: Arc<Mutex<Open>>,
    session: String,
}

impl LiveStreams {
    pub fn new(per_session: usize, total: usize) -> LiveStreams {
        LiveStreams {
            open: Arc::default(),
            per_session,
            total,
        }
    }

    /// Opens a stream for `session` (its token id), or says which bound it hit.
    pub fn open(&self, session: &str) -> Result<LiveStream, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.by_session.get(session).copied().unwrap_or(0);
        if mine >= self.per_session {
            return Err(Refused::Session(self.per_session));
        }
        if open.total >= self.total {
            return Err(Refused::Total);
        }
        open.total += 1;
        *open.by_session.entry(session.to_string()).or_default() += 1;
        metrics::gauge!("kiln_dashboard_live_streams").set(open.total as f64);
        Ok(LiveStream {
            open: self.open.clone(),
            session: session.to_string(),
        })
    }

    /// Streams open now.
    pub fn count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_session.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                open.by_session.remove(&self.session);
            }
        }
        metrics::gauge!("kiln_dashboard_live_streams").set(open.total as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_bounded_per_session_and_in_total_and_freed_on_drop() {
        let streams = LiveStreams::new(2, 3);
        let a1 = streams.open("a").unwrap();
        let _a2 = streams.open("a").unwrap();
        assert_eq!(streams.open("a").err(), Some(Refused::Session(2)));
        let _b1 = streams.open("b").unwrap();
        assert_eq!(streams.open("c").err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(streams.count(), 2);
        let _c1 = streams.open("c").unwrap();
        assert_eq!(streams.open("a").err(), Some(Refused::Total));
    }
}
