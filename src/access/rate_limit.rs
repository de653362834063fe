//! Rate limits that hold across every API process without a Redis round
//! trip per request.
//!
//! The bucket lives in Redis (`take_rate_tokens.lua`, GCRA). A process leases
//! a few tokens at a time and spends them locally; a lease it does not spend
//! within [`LEASE_MS`] lapses. The lease grows (doubling, up to a quarter of
//! the burst) while the process spends each one before it lapses, and
//! shrinks when it does not, so a quiet key costs one round trip a request
//! and a busy one a round trip every few requests. Every token spent was
//! granted by Redis, so the limit holds however many processes share a key;
//! a lapsed lease only ever makes the limit stricter. After a refusal the
//! process answers 429 locally until the time Redis gave, so a client
//! hammering past its limit costs no Redis work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::rate_limits::{RateLimit, Take, take_rate_tokens};
use crate::store::{Store, StoreResult};

/// How long leased tokens stay spendable in one process.
pub const LEASE_MS: u64 = 500;
/// A lease is at most this share of the burst (1/4), so no process holds
/// most of a key's tokens while another is refused.
const LEASE_SHARE_OF_BURST: u32 = 4;
/// Most buckets one process tracks; past it, lapsed leases are dropped.
pub const LEASES_MAX: usize = 100_000;

#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    until: Option<Instant>,
    size: u32,
    refused_until: Option<Instant>,
}

#[derive(Default)]
pub struct RateLimiter {
    leases: Mutex<HashMap<String, Lease>>,
}

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spends one token of `holder`'s bucket: `Ok(Err(retry_after))` when
    /// there is none.
    pub async fn take(
        &self,
        store: &Store,
        holder: &str,
        limit: RateLimit,
    ) -> StoreResult<Result<(), Duration>> {
        let now = Instant::now();
        let lease_max = (limit.burst / LEASE_SHARE_OF_BURST).max(1);
        let want = {
            let mut leases = self.leases.lock().expect("rate limit lock");
            match leases.get_mut(holder) {
                Some(lease) => {
                    if let Some(until) = lease.refused_until {
                        if now < until {
                            return Ok(Err(until - now));
                        }
                        lease.refused_until = None;
                    }
                    let live = lease.until.is_some_and(|until| now < until);
                    if live && lease.tokens > 0 {
                        lease.tokens -= 1;
                        return Ok(Ok(()));
                    }
                    if live {
                        (lease.size * 2).clamp(1, lease_max)
                    } else {
                        (lease.size / 2).clamp(1, lease_max)
                    }
                }
                None => 1,
            }
        };
        let mut conn = store.conn().await?;
        let take = take_rate_tokens(&mut conn, holder, limit, want).await?;
        let mut leases = self.leases.lock().expect("rate limit lock");
        if leases.len() >= LEASES_MAX {
            leases.retain(|_, lease| {
                lease.until.is_some_and(|until| now < until)
                    || lease.refused_until.is_some_and(|until| now < until)
            });
            if leases.len() >= LEASES_MAX {
                leases.clear();
            }
        }
        let lease = leases.entry(holder.to_owned()).or_default();
        match take {
            Take::Granted(granted) => {
                // Another request of this process may have leased meanwhile:
                // add to what is still live rather than drop it.
                let live = lease.until.is_some_and(|until| now < until);
                lease.tokens = if live { lease.tokens } else { 0 } + granted - 1;
                lease.until = Some(now + Duration::from_millis(LEASE_MS));
                lease.size = granted;
                Ok(Ok(()))
            }
            Take::Refused { retry_after } => {
                lease.refused_until = Some(now + retry_after);
                Ok(Err(retry_after))
            }
        }
    }
}
