//! Rate limits that hold across every API process without a Redis round
//! trip per request.
//!
//! The bucket lives in Redis (GCRA, `gcra_take` in `lua/lib.lua`). A process
//! leases a few tokens at a time and spends them locally; a lease it does not
//! spend within [`LEASE_MS`] (5 s) lapses. The lease doubles while the process
//! spends each one before it lapses and halves when it does not (Redis
//! grants at most a quarter of the burst at once), so a quiet key costs one
//! round trip a request and a busy one a round trip every few requests.
//! Every token spent was granted by Redis, so the limit holds however many
//! processes share a key; a lapsed lease only makes the limit stricter.
//! After a refusal the process answers 429 locally until the time Redis
//! gave, so a client hammering past its limit costs no Redis work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long leased tokens stay spendable in one process.
pub const LEASE_MS: u64 = 5_000;
/// Most tokens one process asks for at once (Redis grants at most a
/// quarter of the burst).
pub const LEASE_WANT_MAX: u32 = 1_024;
/// Longest one request's lease (or top-up) stands for the holder's: while
/// it is out, the holder's other requests ask Redis for their own token only
/// (or no top-up), so N requests at once lease one lease, not N (which took
/// N leases from the bucket for N tokens spent, and refused the key while
/// it was far under its limit). Cleared by the answer; this bounds a lost one.
pub const REFILL_WAIT_MAX: Duration = Duration::from_secs(1);
/// Most buckets one book tracks; past it, lapsed leases are dropped.
pub const LEASES_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    until: Option<Instant>,
    size: u32,
    refused_until: Option<Instant>,
    /// Until when another request's lease or top-up stands for this holder's.
    refilling_until: Option<Instant>,
}

/// What spending a token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// A leased token was spent; `top_up` more would refill a lease that
    /// is half gone (0 when it is not, or another request is topping it up),
    /// for a caller that asks Redis anyway: it must.
    Spent { top_up: u32 },
    /// Redis refused lately: retry after this.
    Refused(Duration),
    /// No token in hand: ask Redis for this many.
    Need(u32),
}

/// The leases of one process, by holder (a key and class, or an address).
#[derive(Default)]
pub struct LeaseBook {
    leases: Mutex<HashMap<String, Lease>>,
}

impl LeaseBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spends a leased token of `holder`'s, if there is one. A caller that
    /// `asks_redis` anyway (for the key's record) may be given a top-up to
    /// take along.
    pub fn spend(&self, holder: &str, asks_redis: bool) -> Spend {
        let now = Instant::now();
        let mut leases = self.leases.lock().expect("lease book lock");
        let Some(lease) = leases.get_mut(holder) else {
            return Spend::Need(1);
        };
        if let Some(until) = lease.refused_until {
            if now < until {
                return Spend::Refused(until - now);
            }
            lease.refused_until = None;
        }
        let live = lease.until.is_some_and(|until| now < until);
        let refilling = lease.refilling_until.is_some_and(|until| now < until);
        if live && lease.tokens > 0 {
            lease.tokens -= 1;
            if !asks_redis || lease.tokens >= lease.size / 2 || refilling {
                return Spend::Spent { top_up: 0 };
            }
            lease.refilling_until = Some(now + REFILL_WAIT_MAX);
            return Spend::Spent { top_up: lease.size };
        }
        if refilling {
            return Spend::Need(1);
        }
        // Spent before it lapsed: ask for more; lapsed unspent: for less.
        let want = if live { lease.size * 2 } else { lease.size / 2 };
        lease.refilling_until = Some(now + REFILL_WAIT_MAX);
        Spend::Need(want.clamp(1, LEASE_WANT_MAX))
    }

    /// When `holder` was refused and until when, without spending.
    pub fn refused(&self, holder: &str) -> Option<Duration> {
        let now = Instant::now();
        let leases = self.leases.lock().expect("lease book lock");
        let until = leases.get(holder)?.refused_until?;
        (now < until).then(|| until - now)
    }

    /// Records `granted` tokens from Redis and spends one of them.
    pub fn grant(&self, holder: &str, granted: u32) {
        let now = Instant::now();
        self.with_lease(holder, |lease| {
            // Another request of this process may have leased meanwhile:
            // add to what is still live rather than drop it.
            let live = lease.until.is_some_and(|until| now < until);
            lease.tokens = if live { lease.tokens } else { 0 } + granted.saturating_sub(1);
            lease.until = Some(now + Duration::from_millis(LEASE_MS));
            // A request that asked for its own token only (another's lease
            // was out) does not shrink the lease.
            lease.size = if live {
                lease.size.max(granted)
            } else {
                granted
            };
            lease.refused_until = None;
            lease.refilling_until = None;
        });
    }

    /// Adds `granted` tokens to a lease whose request already spent one
    /// (a top-up taken along with a read of the key's record).
    pub fn top_up(&self, holder: &str, granted: u32) {
        let now = Instant::now();
        self.with_lease(holder, |lease| {
            let live = lease.until.is_some_and(|until| now < until);
            lease.tokens = if live { lease.tokens } else { 0 } + granted;
            lease.until = Some(now + Duration::from_millis(LEASE_MS));
            lease.refilling_until = None;
        });
    }

    /// Records a refusal: answered locally until it runs out.
    pub fn refuse(&self, holder: &str, retry_after: Duration) {
        let now = Instant::now();
        self.with_lease(holder, |lease| {
            lease.refused_until = Some(now + retry_after);
            lease.refilling_until = None;
        });
    }

    fn with_lease(&self, holder: &str, change: impl FnOnce(&mut Lease)) {
        let now = Instant::now();
        let mut leases = self.leases.lock().expect("lease book lock");
        if leases.len() >= LEASES_MAX && !leases.contains_key(holder) {
            leases.retain(|_, lease| {
                lease.until.is_some_and(|until| now < until)
                    || lease.refused_until.is_some_and(|until| now < until)
            });
            if leases.len() >= LEASES_MAX {
                // Forgetting leases only loses tokens: the limit stays.
                leases.clear();
            }
        }
        change(leases.entry(holder.to_owned()).or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_spent_then_grows_and_a_refusal_is_kept() {
        let book = LeaseBook::new();
        assert_eq!(book.spend("k", false), Spend::Need(1));
        book.grant("k", 1);
        // Spent before it lapsed: the next ask doubles.
        assert_eq!(book.spend("k", false), Spend::Need(2));
        book.grant("k", 2);
        // Below half: a caller that asks Redis anyway takes a top-up along.
        assert_eq!(book.spend("k", true), Spend::Spent { top_up: 2 });
        book.top_up("k", 2);
        // 2 in hand: the first keeps half, the second does not.
        assert_eq!(book.spend("k", true), Spend::Spent { top_up: 0 });
        assert_eq!(book.spend("k", false), Spend::Spent { top_up: 0 });
        assert_eq!(book.spend("k", false), Spend::Need(4));
        book.refuse("k", Duration::from_secs(60));
        assert!(matches!(book.spend("k", false), Spend::Refused(_)));
        assert!(book.refused("k").is_some());
        assert!(book.refused("other").is_none());
    }

    #[test]
    fn requests_at_once_lease_one_lease_not_one_each() {
        let book = LeaseBook::new();
        assert_eq!(book.spend("k", false), Spend::Need(1));
        book.grant("k", 1);
        assert_eq!(book.spend("k", false), Spend::Need(2));
        book.grant("k", 2);
        assert_eq!(book.spend("k", false), Spend::Spent { top_up: 0 });
        assert_eq!(book.spend("k", false), Spend::Need(4));
        // Three more arrive before Redis answers that lease: each asks for
        // its own token only (before the fix each asked for 4: 16 tokens
        // taken from the bucket for 4 requests).
        for _ in 0..3 {
            assert_eq!(book.spend("k", false), Spend::Need(1));
        }
        book.grant("k", 1);
        book.grant("k", 4);
        book.grant("k", 1);
        book.grant("k", 1);
        // 3 tokens left of the 7 taken; the lease is still 4.
        for _ in 0..3 {
            assert_eq!(book.spend("k", false), Spend::Spent { top_up: 0 });
        }
        assert_eq!(book.spend("k", false), Spend::Need(8));

        // Top-ups alike: the first request below half tops up, the others
        // meanwhile do not.
        book.grant("k", 8);
        for _ in 0..3 {
            assert_eq!(book.spend("k", true), Spend::Spent { top_up: 0 });
        }
        assert_eq!(book.spend("k", true), Spend::Spent { top_up: 8 });
        assert_eq!(book.spend("k", true), Spend::Spent { top_up: 0 });
        book.top_up("k", 8);
        assert_eq!(book.spend("k", true), Spend::Spent { top_up: 0 });
    }

    #[test]
    fn an_unanswered_lease_stands_for_the_others_only_so_long() {
        let book = LeaseBook::new();
        assert_eq!(book.spend("k", false), Spend::Need(1));
        book.grant("k", 1);
        assert_eq!(book.spend("k", false), Spend::Need(2));
        assert_eq!(
            book.spend("k", false),
            Spend::Need(1),
            "the lease of 2 is out"
        );
        // It never came back (Redis did not answer): past REFILL_WAIT_MAX
        // the next request leases again.
        book.with_lease("k", |lease| {
            lease.refilling_until = Some(Instant::now() - Duration::from_millis(1))
        });
        assert_eq!(book.spend("k", false), Spend::Need(2));
    }
}
