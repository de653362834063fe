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
/// While Redis cannot be reached, how long a key this process checked may
/// still make reads (which then learn that Redis is down).
pub const KEY_STALE_IF_ERROR: Duration = Duration::from_secs(60);
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
    pub async fn authenticate(&self, token: &str, class: RequestClass) -> Result<Caller, Denied> {
        const INVALID: &str = "the API key is not valid (unknown, expired or revoked)";
        let presented = PresentedKey::parse(token).ok_or(Denied::Unauthenticated(
            "the bearer token is not a tally API key (tally_<role>_<id>_<secret>)",
        ))?;
        let record = match self.cache.get(&self.store, &presented.id).await {
            Ok(record) => record,
            // Redis is out of reach, so no request can touch the ledger: a
            // read may still learn that (503s, `/metrics` with redis_up 0)
            // with a key this process checked lately. Writes stay refused.
            Err(err) if class == RequestClass::Read => {
                Some(self.cache.stale(&presented.id).ok_or(Denied::Store(err))?)
            }
            Err(err) => return Err(err.into()),
        };
        let Some(record) = record else {
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
            burst: per_s
                .saturating_mul(self.settings.rate_limit_burst_s)
                .max(1),
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

    /// A limit Redis cannot check lets the request through: the limits
    /// guard capacity, not the ledger, and a request that needs Redis fails
    /// on its own (a full Redis refusing writes still serves reads).
    async fn take(&self, holder: &str, limit: RateLimit) -> Result<(), Denied> {
        match self.limiter.take(&self.store, holder, limit).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(retry_after)) => Err(Denied::RateLimited { retry_after }),
            Err(err) => {
                tracing::warn!(error = %err, holder, "rate limit unchecked: Redis did not answer");
                Ok(())
            }
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

    /// The record last read, if it was read within [`KEY_STALE_IF_ERROR`].
    fn stale(&self, id: &KeyId) -> Option<Arc<KeyRecord>> {
        let entries = self.entries.lock().expect("key cache lock");
        let (read_at, record) = entries.get(id)?;
        (read_at.elapsed() < KEY_STALE_IF_ERROR).then(|| record.clone())
    }
}

/// Longest label a key may carry.
pub const KEY_LABEL_LENGTH_MAX: usize = 100;
/// Longest a key may live: about ten years.
pub const KEY_LIFETIME_MAX: Duration = Duration::from_secs(10 * 366 * 24 * 60 * 60);

/// What a new key is to be.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    pub role: Role,
    pub account: Option<AccountId>,
    pub expires_in: Option<Duration>,
    pub label: Option<String>,
    pub reads_per_s: Option<u32>,
    pub writes_per_s: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request itself is wrong (a customer key with no account, ...).
    #[error("{0}")]
    Invalid(String),
    /// The customer account to bind to does not exist.
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes a key and stores its record: the plaintext is in the returned
/// [`GeneratedKey`] and nowhere else. Used by `tally keys create` (straight
/// against Redis: that is how the first admin key is made) and by `POST /keys`.
pub async fn issue_key(
    store: &Store,
    pepper: &Pepper,
    request: KeyRequest,
) -> Result<(GeneratedKey, KeyRecord), IssueError> {
    let invalid = |detail: &str| Err(IssueError::Invalid(detail.to_owned()));
    match (&request.role, &request.account) {
        (Role::Customer, None) => {
            return invalid("a customer key needs the account it is bound to");
        }
        (Role::Customer, Some(account)) if account.is_system() => {
            return invalid("a customer key is bound to a customer account, not a system one");
        }
        (Role::Customer, Some(_)) | (_, None) => {}
        (_, Some(_)) => return invalid("only customer keys are bound to an account"),
    }
    if let Some(label) = &request.label
        && (label.chars().count() > KEY_LABEL_LENGTH_MAX || label.chars().any(char::is_control))
    {
        return Err(IssueError::Invalid(format!(
            "label must be at most {KEY_LABEL_LENGTH_MAX} characters, with no control characters"
        )));
    }
    if request
        .expires_in
        .is_some_and(|expires_in| expires_in.is_zero() || expires_in > KEY_LIFETIME_MAX)
    {
        return invalid("a key expires between 1 second and about 10 years from now");
    }
    let limits = [request.reads_per_s, request.writes_per_s];
    if limits
        .into_iter()
        .flatten()
        .any(|per_s| !(1..=1_000_000).contains(&per_s))
    {
        return invalid("a key's rate limits are 1 to 1,000,000 per second");
    }
    let mut conn = store.conn().await?;
    if let Some(account) = &request.account {
        // Accounts are never deleted, so one that exists now still will when
        // the key is stored.
        if crate::store::accounts::get_account(&mut conn, account)
            .await?
            .is_none()
        {
            return Err(IssueError::AccountNotFound(account.clone()));
        }
    }
    let generated = GeneratedKey::new(request.role, pepper);
    let now = now_ms();
    let record = KeyRecord {
        id: generated.id.clone(),
        role: request.role,
        account: request.account,
        secret_hash: generated.secret_hash.clone(),
        created_at_ms: now,
        expires_at_ms: request
            .expires_in
            .map(|expires_in| now + i64::try_from(expires_in.as_millis()).unwrap_or(i64::MAX / 2)),
        revoked_at_ms: None,
        label: request.label,
        reads_per_s: request.reads_per_s,
        writes_per_s: request.writes_per_s,
    };
    crate::store::api_keys::create_api_key(&mut conn, &record)
        .await
        .map_err(|err| match err {
            crate::store::api_keys::CreateKeyError::Store(err) => err,
            // A fresh random id that exists already is a bug, not a request error.
            err @ crate::store::api_keys::CreateKeyError::KeyExists(_) => {
                StoreError::UnexpectedReply(vec![err.to_string()])
            }
        })?;
    tracing::info!(key_id = %record.id, role = %record.role, "API key created");
    Ok((generated, record))
}
