//! Who may move which money: API keys, the roles they carry, and per-key
//! rate limits that hold across every API process.
//!
//! A request's key is checked without a Redis round trip of its own on the
//! hot path: a process trusts a key record it read for at most
//! `TALLY_API_KEY_CACHE_MS` (at most 1 s, so revocation takes effect within
//! it everywhere), and spends rate-limit tokens it leased from Redis in small
//! batches ([`rate_limit`]). The secret is checked on every request, in
//! constant time, against the keyed hash Redis keeps.

mod keys;
pub mod rate_limit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use keys::{
    GeneratedKey, KEY_PREFIX, KeyError, KeyId, PEPPER_LENGTH_MIN, Pepper, PresentedKey, Role,
};
use rate_limit::RateLimiter;

use crate::config::AccessSettings;
use crate::domain::AccountId;
use crate::store::api_keys::{KeyRecord, get_api_key};
use crate::store::rate_limits::RateLimit;
use crate::store::{Store, StoreError, now_ms};

/// Most key records one process keeps; past it, stale ones are dropped.
pub const KEY_CACHE_ENTRIES_MAX: usize = 100_000;
/// The longest `TALLY_API_KEY_CACHE_MS` may be: revocation must reach every
/// process within a second.
pub const KEY_CACHE_MS_MAX: u64 = 1_000;

fn truncate(text: &str) -> String {
    crate::domain::truncate_for_message(text)
}

/// The holder of a checked key, as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: KeyId,
    pub role: Role,
    /// The account a `customer` key is bound to.
    pub account: Option<AccountId>,
    /// The key's own limits; `None` takes the server's default.
    pub reads_per_s: Option<u32>,
    pub writes_per_s: Option<u32>,
}

impl Caller {
    /// Whether this caller may see `account` and what belongs to it.
    pub fn may_read_account(&self, account: &AccountId) -> bool {
        self.role.reads_everything() || self.account.as_ref() == Some(account)
    }

    /// Whether `account` is this customer's own (operators own none).
    pub fn owns(&self, account: &AccountId) -> bool {
        self.role == Role::Customer && self.account.as_ref() == Some(account)
    }
}

/// Reads or writes: each has its own limit per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    Read,
    Write,
}

/// Why a request was not let in.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// No key, or one that is unknown, malformed, expired or revoked: the
    /// same answer for all, so a caller learns nothing about other keys.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The key (or, for failed authentications, the client address) is
    /// past its limit.
    #[error("rate limit reached")]
    RateLimited { retry_after: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks keys and limits for one API process.
pub struct Authenticator {
    store: Store,
    pepper: Pepper,
    settings: AccessSettings,
    cache: KeyCache,
    limiter: RateLimiter,
}

impl Authenticator {
    pub fn new(store: Store, settings: AccessSettings) -> anyhow::Result<Self> {
        let pepper = settings.pepper()?;
        Ok(Authenticator {
            cache: KeyCache::new(Duration::from_millis(settings.api_key_cache_ms)),
            limiter: RateLimiter::new(),
            store,
            pepper,
            settings,
        })
    }

    pub fn settings(&self) -> &AccessSettings {
        &self.settings
    }

    pub fn pepper(&self) -> &Pepper {
        &self.pepper
    }

    /// The caller a bearer token names, if it is a live key of ours.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Denied> {
        const INVALID: &str = "the API key is not valid (unknown, expired or revoked)";
        let presented = PresentedKey::parse(token).ok_or(Denied::Unauthenticated(
            "the bearer token is not a tally API key (tally_<role>_<id>_<secret>)",
        ))?;
        let Some(record) = self.cache.get(&self.store, &presented.id).await? else {
            return Err(Denied::Unauthenticated(INVALID));
        };
        // The role is part of what the client sent: a key whose prefix was
        // edited does not pass, even with the right secret.
        if record.role != presented.role
            || !record.is_live(now_ms())
            || !presented.matches(&self.pepper, &record.secret_hash)
        {
            return Err(Denied::Unauthenticated(INVALID));
        }
        Ok(Caller {
            key_id: record.id.clone(),
            role: record.role,
            account: record.account.clone(),
            reads_per_s: record.reads_per_s,
            writes_per_s: record.writes_per_s,
        })
    }

    /// Spends one of the caller's tokens for `class`.
    pub async fn limit(&self, caller: &Caller, class: RequestClass) -> Result<(), Denied> {
        let per_s = match class {
            RequestClass::Read => caller
                .reads_per_s
                .unwrap_or(self.settings.rate_limit_reads_per_s),
            RequestClass::Write => caller
                .writes_per_s
                .unwrap_or(self.settings.rate_limit_writes_per_s),
        };
        let limit = RateLimit {
            per_s,
            burst: per_s.saturating_mul(self.settings.rate_limit_burst_s).max(1),
        };
        let holder = match class {
            RequestClass::Read => format!("{}:reads", caller.key_id),
            RequestClass::Write => format!("{}:writes", caller.key_id),
        };
        self.take(&holder, limit).await
    }

    /// Counts a failed authentication against the client's address: past
    /// the limit, the answer is 429 rather than 401, and guessing keys from
    /// one address is slowed to `TALLY_AUTH_FAILURES_PER_S`.
    pub async fn note_failure(&self, client: &str) -> Result<(), Denied> {
        let limit = RateLimit {
            per_s: self.settings.auth_failures_per_s,
            burst: self.settings.auth_failure_burst,
        };
        self.take(&format!("auth_failures:{client}"), limit).await
    }

    async fn take(&self, holder: &str, limit: RateLimit) -> Result<(), Denied> {
        match self.limiter.take(&self.store, holder, limit).await? {
            Ok(()) => Ok(()),
            Err(retry_after) => Err(Denied::RateLimited { retry_after }),
        }
    }
}

/// Key records read from Redis, trusted for a bounded time.
struct KeyCache {
    ttl: Duration,
    entries: Mutex<HashMap<KeyId, (Instant, Arc<KeyRecord>)>>,
}

impl KeyCache {
    fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl: ttl.min(Duration::from_millis(KEY_CACHE_MS_MAX)),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The key's record, read again once the cached one is older than the
    /// TTL. Unknown ids are not cached, so guesses cannot fill the cache.
    async fn get(&self, store: &Store, id: &KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        {
            let entries = self.entries.lock().expect("key cache lock");
            if let Some((read_at, record)) = entries.get(id)
                && read_at.elapsed() < self.ttl
            {
                return Ok(Some(record.clone()));
            }
        }
        // Timed from before the read: a revocation that lands while the read
        // is on its way is seen within the TTL of when it landed.
        let read_at = Instant::now();
        let mut conn = store.conn().await?;
        let Some(record) = get_api_key(&mut conn, id).await? else {
            self.entries.lock().expect("key cache lock").remove(id);
            return Ok(None);
        };
        let record = Arc::new(record);
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= KEY_CACHE_ENTRIES_MAX {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= KEY_CACHE_ENTRIES_MAX {
                entries.clear();
            }
        }
        entries.insert(id.clone(), (read_at, record.clone()));
        Ok(Some(record))
    }
}
