//! The sign-in throttle of the dashboard and of `depot login`'s approval page: it slows
//! password guessing (and the argon2 work each guess costs) without letting a stranger
//! lock a user out.
//!
//! Failed and pending attempts are counted three ways within a window:
//! - per email and client address: `MAX_FAILED_SIGN_INS`, the cost of guessing one
//!   account from one address;
//! - per client address, whatever the email: `MAX_FAILED_PER_ADDRESS`, so one address
//!   cannot spread its guesses over many accounts;
//! - per email, from every address: `MAX_FAILED_PER_EMAIL`, a ceiling on guessing one
//!   account from many addresses.
//!
//! A stranger's wrong guesses therefore lock out only their own address: the owner signs
//! in from another. An attempt is reserved under one lock before the password is checked,
//! so concurrent guesses cannot slip past a limit together. Only validated emails are
//! ever stored, each table holds at most `MAX_TRACKED` entries, and entries older than
//! the window are dropped, so callers without an account cannot grow it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed sign-ins allowed per email and client address within `THROTTLE_WINDOW`.
pub const MAX_FAILED_SIGN_INS: u32 = 10;
/// Failed sign-ins allowed per client address within the window, whatever the emails.
pub const MAX_FAILED_PER_ADDRESS: u32 = 30;
/// Failed sign-ins allowed per email within the window, from all addresses together.
pub const MAX_FAILED_PER_EMAIL: u32 = 100;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries each table holds at most; past it, the oldest idle entry makes room.
pub const MAX_TRACKED: usize = 20_000;
/// How often expired entries are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Attempts {
    failures: u32,
    in_flight: u32,
    since: Instant,
}

impl Attempts {
    fn new(now: Instant) -> Attempts {
        Attempts {
            failures: 0,
            in_flight: 0,
            since: now,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.in_flight == 0 && now.duration_since(self.since) >= THROTTLE_WINDOW
    }

    fn idle(&self) -> bool {
        self.in_flight == 0
    }
}

/// One table of counters, bounded by entries and by age.
struct Table<K> {
    entries: HashMap<K, Attempts>,
    limit: u32,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(limit: u32) -> Table<K> {
        Table {
            entries: HashMap::new(),
            limit,
        }
    }

    /// The wait left if `key` is at its limit (an unknown key never is).
    fn blocked(&mut self, key: &K, now: Instant) -> Option<Duration> {
        let entry = self.entries.get_mut(key)?;
        if entry.expired(now) {
            self.entries.remove(key);
            return None;
        }
        (entry.failures + entry.in_flight >= self.limit)
            .then(|| THROTTLE_WINDOW.saturating_sub(now.duration_since(entry.since)))
    }

    fn reserve(&mut self, key: &K, now: Instant) {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_TRACKED {
            self.make_room(now);
        }
        let entry = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| Attempts::new(now));
        if entry.expired(now) {
            *entry = Attempts::new(now);
        }
        entry.in_flight += 1;
    }

    /// Settles one reserved attempt; `forget` drops the entry when nothing else holds it.
    fn settle(&mut self, key: &K, failed: bool, forget: bool) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        if failed {
            entry.failures += 1;
        }
        if entry.in_flight == 0 && (forget || entry.failures == 0) {
            self.entries.remove(key);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, a| !a.expired(now));
    }

    /// Drops expired entries; if none were, the oldest idle one.
    fn make_room(&mut self, now: Instant) {
        self.sweep(now);
        if self.entries.len() < MAX_TRACKED {
            return;
        }
        let oldest = self
            .entries
            .iter()
            .filter(|(_, a)| a.idle())
            .min_by_key(|(_, a)| a.since)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            self.entries.remove(&key);
        }
    }
}

struct Tables {
    pairs: Table<(String, IpAddr)>,
    addresses: Table<IpAddr>,
    emails: Table<String>,
    swept_at: Instant,
}

/// Why an attempt was not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// How long until the caller may try again.
    pub wait: Duration,
}

pub struct SignInThrottle {
    tables: Mutex<Tables>,
}

impl Default for SignInThrottle {
    fn default() -> Self {
        SignInThrottle {
            tables: Mutex::new(Tables {
                pairs: Table::new(MAX_FAILED_SIGN_INS),
                addresses: Table::new(MAX_FAILED_PER_ADDRESS),
                emails: Table::new(MAX_FAILED_PER_EMAIL),
                swept_at: Instant::now(),
            }),
        }
    }
}

/// One reserved sign-in attempt. Report how it went with `succeeded` or `failed`;
/// dropping it without either releases the reservation without counting a failure.
pub struct SignInAttempt<'a> {
    throttle: &'a SignInThrottle,
    email: String,
    address: IpAddr,
    settled: bool,
}

impl SignInThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves an attempt for `email` (already validated: see `login::validate_email`)
    /// from `address`, or says how long to wait.
    pub fn begin(&self, email: &str, address: IpAddr) -> Result<SignInAttempt<'_>, Throttled> {
        let email = email.trim().to_lowercase();
        let now = Instant::now();
        let mut tables = self.lock();
        if now.duration_since(tables.swept_at) >= SWEEP_EVERY {
            tables.pairs.sweep(now);
            tables.addresses.sweep(now);
            tables.emails.sweep(now);
            tables.swept_at = now;
        }
        let pair = (email.clone(), address);
        let wait = [
            tables.pairs.blocked(&pair, now),
            tables.addresses.blocked(&address, now),
            tables.emails.blocked(&email, now),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            return Err(Throttled { wait });
        }
        tables.pairs.reserve(&pair, now);
        tables.addresses.reserve(&address, now);
        tables.emails.reserve(&email, now);
        Ok(SignInAttempt {
            throttle: self,
            email,
            address,
            settled: false,
        })
    }

    /// Entries held, across the three tables (for tests and metrics).
    pub fn tracked(&self) -> usize {
        let tables = self.lock();
        tables.pairs.entries.len() + tables.addresses.entries.len() + tables.emails.entries.len()
    }

    fn settle(&self, email: &str, address: IpAddr, outcome: Outcome) {
        let mut tables = self.lock();
        let failed = outcome == Outcome::Failed;
        // A success clears the guesses made at this account from this address only:
        // guesses from elsewhere and at other accounts still count.
        let succeeded = outcome == Outcome::Succeeded;
        tables
            .pairs
            .settle(&(email.to_string(), address), failed, succeeded);
        tables.addresses.settle(&address, failed, false);
        tables.emails.settle(&email.to_string(), failed, false);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    Abandoned,
}

impl SignInAttempt<'_> {
    pub fn succeeded(mut self) {
        self.settled = true;
        self.throttle
            .settle(&self.email, self.address, Outcome::Succeeded);
    }

    pub fn failed(mut self) {
        self.settled = true;
        self.throttle
            .settle(&self.email, self.address, Outcome::Failed);
    }
}

impl Drop for SignInAttempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.throttle
                .settle(&self.email, self.address, Outcome::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn concurrent_attempts_count_against_the_limit() {
        let throttle = SignInThrottle::default();
        let held: Vec<_> = (0..MAX_FAILED_SIGN_INS)
            .map(|_| {
                throttle
                    .begin("a@example.com", ip(1))
                    .expect("within the limit")
            })
            .collect();
        // Every allowed guess is in flight: the next one waits, whatever their outcome.
        assert!(throttle.begin("A@example.com ", ip(1)).is_err());
        assert!(throttle.begin("b@example.com", ip(1)).is_ok());
        for attempt in held {
            attempt.failed();
        }
        assert!(throttle.begin("a@example.com", ip(1)).is_err());
    }

    #[test]
    fn success_clears_and_abandoned_attempts_do_not_count() {
        let throttle = SignInThrottle::default();
        for _ in 0..MAX_FAILED_SIGN_INS - 1 {
            throttle.begin("a@example.com", ip(1)).unwrap().failed();
        }
        drop(throttle.begin("a@example.com", ip(1)).unwrap());
        throttle.begin("a@example.com", ip(1)).unwrap().succeeded();
        for _ in 0..MAX_FAILED_SIGN_INS {
            throttle.begin("a@example.com", ip(1)).unwrap().failed();
        }
        assert!(throttle.begin("a@example.com", ip(1)).is_err());
    }

    #[test]
    fn a_strangers_guesses_lock_out_only_their_own_address() {
        let throttle = SignInThrottle::default();
        for _ in 0..MAX_FAILED_SIGN_INS {
            throttle
                .begin("owner@example.com", ip(66))
                .unwrap()
                .failed();
        }
        let Err(refused) = throttle.begin("owner@example.com", ip(66)) else {
            panic!("the stranger's address is locked out");
        };
        assert!(refused.wait > THROTTLE_WINDOW - Duration::from_secs(5));
        throttle
            .begin("owner@example.com", ip(7))
            .expect("the owner's own address is not locked")
            .succeeded();
    }

    #[test]
    fn one_address_cannot_spread_guesses_over_many_accounts() {
        let throttle = SignInThrottle::default();
        for n in 0..MAX_FAILED_PER_ADDRESS {
            throttle
                .begin(&format!("user{n}@example.com"), ip(66))
                .unwrap()
                .failed();
        }
        assert!(throttle.begin("fresh@example.com", ip(66)).is_err());
        assert!(throttle.begin("fresh@example.com", ip(67)).is_ok());
    }

    #[test]
    fn many_addresses_together_reach_the_ceiling_of_one_account() {
        let throttle = SignInThrottle::default();
        for n in 0..MAX_FAILED_PER_EMAIL {
            throttle
                .begin(
                    "owner@example.com",
                    IpAddr::from([10, 0, (n / 250) as u8, n as u8]),
                )
                .unwrap()
                .failed();
        }
        assert!(throttle.begin("owner@example.com", ip(1)).is_err());
    }

    #[test]
    fn the_tables_stay_bounded() {
        let throttle = SignInThrottle::default();
        for n in 0..(MAX_TRACKED as u32 + 500) {
            let address = IpAddr::from(n.to_be_bytes());
            throttle
                .begin(&format!("u{n}@example.com"), address)
                .unwrap()
                .failed();
        }
        assert!(
            throttle.tracked() <= 3 * MAX_TRACKED,
            "{}",
            throttle.tracked()
        );
    }
}
