//! Who may move which money: API keys, the roles they carry, and per-key
//! rate limits that hold across every API process.
//!
//! A request's key is checked without a Redis round trip of its own on the
//! hot path: a process keeps the key records it read while no key is
//! revoked (every revocation moves an epoch on, which each process reads five
//! times a second; it stops trusting its copies if it has not confirmed the
//! epoch within `TALLY_API_KEY_CACHE_MS`, at most 1 s), and spends rate-limit
//! tokens it leased from Redis in small batches ([`rate_limit`]). The secret
//! is checked on every request, in constant time, against the keyed hash
//! Redis keeps.

mod keys;
pub mod rate_limit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use keys::{
    GeneratedKey, KEY_PREFIX, KeyError, KeyId, PEPPER_LENGTH_MIN, Pepper, PresentedKey, Role,
};
use rate_limit::{LeaseBook, Spend};

use crate::config::AccessSettings;
use crate::domain::AccountId;
use crate::store::api_keys::{KeyCheck, KeyRecord, authenticate_key, get_api_key};
use crate::store::rate_limits::{RateLimit, Take, take_rate_tokens};
use crate::store::{Store, StoreError, now_ms};

/// Most key records one process keeps; past it, stale ones are dropped.
pub const KEY_CACHE_ENTRIES_MAX: usize = 100_000;
/// While Redis cannot be reached, how long a key this process checked may
/// still read `/metrics` (which then says that Redis is down).
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

impl RequestClass {
    /// Names the bucket, and the key record's own limit (`<class>_per_s`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Read => "reads",
            RequestClass::Write => "writes",
        }
    }
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
    /// Leased tokens of keys, per class.
    leases: LeaseBook,
    /// Whether a key was revoked lately, read a few times a second.
    watch: Arc<RevocationWatch>,
    /// Leased tokens of client addresses' failed authentications: a book of
    /// their own, so addresses cannot crowd out keys' leases.
    failures: LeaseBook,
}

impl Authenticator {
    pub fn new(store: Store, settings: AccessSettings) -> anyhow::Result<Self> {
        let pepper = settings.pepper()?;
        Ok(Authenticator {
            cache: KeyCache::new(Duration::from_millis(settings.api_key_cache_ms)),
            leases: LeaseBook::new(),
            failures: LeaseBook::new(),
            watch: Arc::new(RevocationWatch::default()),
            store,
            pepper,
            settings,
        })
    }

    pub fn settings(&self) -> &AccessSettings {
        &self.settings
    }

    /// Reads the revocation epoch once, then follows it in the background
    /// for as long as this authenticator lives. Until it runs, no cached
    /// record is trusted (every request reads its key).
    pub async fn start(&self) -> Result<(), StoreError> {
        let asked_at = Instant::now();
        let mut conn = self.store.conn().await?;
        let epoch = crate::store::api_keys::revocation_epoch(&mut conn, self.store.keys()).await?;
        self.watch.confirm(epoch, asked_at);
        self.watch.start(&self.store);
        Ok(())
    }

    pub fn pepper(&self) -> &Pepper {
        &self.pepper
    }

    /// The caller a bearer token names, if it is a live key of ours with a
    /// token to spend for `class`. With a fresh record and a leased token in
    /// hand this makes no Redis call; otherwise one (`authenticate_key.lua`).
    /// `allow_stale` lets a key checked in the last minute through while
    /// Redis is out of reach (for `/metrics`, which answers from this
    /// process's own figures then). While the client's address is refused
    /// for failed authentications (`address_refused`), only a key this
    /// process holds a fresh record of gets in: guesses from that address
    /// cost no Redis work.
    pub async fn admit(
        &self,
        token: &str,
        class: RequestClass,
        allow_stale: bool,
        address_refused: Option<Duration>,
    ) -> Result<Caller, Denied> {
        let presented = PresentedKey::parse(token).ok_or(Denied::Unauthenticated(
            "the bearer token is not a tally API key (tally_<role>_<id>_<secret>)",
        ))?;
        let holder = format!("{}:{}", presented.id, class.as_str());
        let fresh = self
            .watch
            .current(self.cache.ttl)
            .and_then(|epoch| self.cache.fresh(&presented.id, epoch));
        if let (None, Some(retry_after)) = (&fresh, address_refused) {
            return Err(Denied::RateLimited { retry_after });
        }
        let (in_hand, want) = match self.leases.spend(&holder, fresh.is_none()) {
            // With a stale record the round trip is made anyway: it tops up
            // a lease that is half gone, so a steady key makes one a second.
            Spend::Spent { top_up } => (Some(Ok(())), top_up),
            Spend::Refused(retry_after) => (Some(Err(retry_after)), 0),
            Spend::Need(want) => (None, want),
        };
        if let Some(record) = &fresh {
            let caller = self.check(&presented, record)?;
            return match in_hand {
                Some(Ok(())) => Ok(caller),
                Some(Err(retry_after)) => Err(Denied::RateLimited { retry_after }),
                None => self
                    .refill(&holder, record, class, want)
                    .await
                    .map(|()| caller),
            };
        }
        let epoch = self.watch.current(self.cache.ttl);
        let read_at = Instant::now();
        let check = KeyCheck {
            secret_hash: &presented.secret_hash(&self.pepper),
            class: class.as_str(),
            default_per_s: match class {
                RequestClass::Read => self.settings.rate_limit_reads_per_s,
                RequestClass::Write => self.settings.rate_limit_writes_per_s,
            },
            burst_s: self.settings.rate_limit_burst_s,
            want,
        };
        let checked = async {
            let mut conn = self.store.conn().await?;
            authenticate_key(&mut conn, self.store.keys(), &presented.id, check).await
        };
        let (record, take) = match checked.await {
            Ok(Some(checked)) => checked,
            Ok(None) => {
                self.cache.forget(&presented.id);
                return Err(Denied::Unauthenticated(INVALID_KEY));
            }
            Err(err) => {
                return self
                    .admit_unchecked(&presented, fresh, allow_stale, err)
                    .await;
            }
        };
        let record = self.cache.insert(read_at, epoch, record);
        let caller = self.check(&presented, &record)?;
        match (in_hand, take) {
            (Some(Ok(())), Some(Take::Granted(granted))) => {
                self.leases.top_up(&holder, granted);
                Ok(caller)
            }
            (Some(Ok(())), _) => Ok(caller),
            (Some(Err(retry_after)), _) => Err(Denied::RateLimited { retry_after }),
            (None, Some(Take::Granted(granted))) => {
                self.leases.grant(&holder, granted);
                Ok(caller)
            }
            (None, Some(Take::Refused { retry_after })) => {
                self.leases.refuse(&holder, retry_after);
                Err(Denied::RateLimited { retry_after })
            }
            // The script took nothing, yet the record checks: it changed
            // between the two reads. Refuse; the next request reads again.
            (None, None) => Err(Denied::Unauthenticated(INVALID_KEY)),
        }
    }

    /// The caller a console session stands for: the key it signed in with,
    /// if that key is still live with the same role (a revoked or expired
    /// key ends its sessions), with a token of the key's rate limit spent.
    /// The secret was checked at sign-in; the session's own token, which
    /// only that browser holds, stands in for it since.
    pub async fn admit_session(
        &self,
        key_id: &KeyId,
        role: Role,
        class: RequestClass,
    ) -> Result<Caller, Denied> {
        let holder = format!("{key_id}:{}", class.as_str());
        let fresh = self
            .watch
            .current(self.cache.ttl)
            .and_then(|epoch| self.cache.fresh(key_id, epoch));
        let record = match fresh {
            Some(record) => record,
            None => {
                let epoch = self.watch.current(self.cache.ttl);
                let read_at = Instant::now();
                let mut conn = self.store.conn().await?;
                match get_api_key(&mut conn, self.store.keys(), key_id).await? {
                    Some(record) => self.cache.insert(read_at, epoch, record),
                    None => return Err(Denied::Unauthenticated(INVALID_KEY)),
                }
            }
        };
        if record.role != role || !record.is_live(now_ms()) {
            return Err(Denied::Unauthenticated(INVALID_KEY));
        }
        match self.leases.spend(&holder, false) {
            Spend::Spent { .. } => {}
            Spend::Refused(retry_after) => return Err(Denied::RateLimited { retry_after }),
            Spend::Need(want) => self.refill(&holder, &record, class, want).await?,
        }
        Ok(Caller {
            key_id: record.id.clone(),
            role: record.role,
            account: record.account.clone(),
        })
    }

    /// Redis did not run the check: a full Redis refuses every script that
    /// may write, and one out of reach answers nothing. A limit Redis cannot
    /// check lets the request through (limits guard capacity, not the
    /// ledger, and a request that needs Redis then fails on its own), but
    /// the key is still checked, against a plain read of its record.
    async fn admit_unchecked(
        &self,
        presented: &PresentedKey,
        fresh: Option<Arc<KeyRecord>>,
        allow_stale: bool,
        err: StoreError,
    ) -> Result<Caller, Denied> {
        tracing::warn!(error = %err, key_id = %presented.id, "rate limit unchecked: Redis did not run the key check");
        if let Some(record) = fresh {
            return self.check(presented, &record);
        }
        let epoch = self.watch.current(self.cache.ttl);
        let read_at = Instant::now();
        let read = async {
            let mut conn = self.store.conn().await?;
            get_api_key(&mut conn, self.store.keys(), &presented.id).await
        };
        match read.await {
            Ok(Some(record)) => {
                let record = self.cache.insert(read_at, epoch, record);
                self.check(presented, &record)
            }
            Ok(None) => Err(Denied::Unauthenticated(INVALID_KEY)),
            Err(err) => match self.cache.stale(&presented.id).filter(|_| allow_stale) {
                Some(record) => self.check(presented, &record),
                None => Err(err.into()),
            },
        }
    }

    /// Leases tokens for a key whose record is fresh: a plain take, with the
    /// key's own limit. A limit Redis cannot check lets the request through.
    async fn refill(
        &self,
        holder: &str,
        record: &KeyRecord,
        class: RequestClass,
        want: u32,
    ) -> Result<(), Denied> {
        let per_s = match class {
            RequestClass::Read => record
                .reads_per_s
                .unwrap_or(self.settings.rate_limit_reads_per_s),
            RequestClass::Write => record
                .writes_per_s
                .unwrap_or(self.settings.rate_limit_writes_per_s),
        };
        let limit = RateLimit {
            per_s,
            burst: per_s.saturating_mul(self.settings.rate_limit_burst_s),
        };
        // The bucket authenticate_key.lua takes from too, beside the key's record.
        let bucket = self
            .store
            .keys()
            .api_key_rate_limit(&record.id, class.as_str());
        let take = async {
            let mut conn = self.store.conn().await?;
            take_rate_tokens(&mut conn, &bucket, limit, want).await
        };
        match take.await {
            Ok(Take::Granted(granted)) => {
                self.leases.grant(holder, granted);
                Ok(())
            }
            Ok(Take::Refused { retry_after }) => {
                self.leases.refuse(holder, retry_after);
                Err(Denied::RateLimited { retry_after })
            }
            Err(err) => {
                tracing::warn!(error = %err, holder, "rate limit unchecked: Redis did not answer");
                Ok(())
            }
        }
    }

    /// The caller, if the presented key is this record's and it is live.
    fn check(&self, presented: &PresentedKey, record: &KeyRecord) -> Result<Caller, Denied> {
        // The role is part of what the client sent: a key whose prefix was
        // edited does not pass, even with the right secret.
        if record.role != presented.role
            || !record.is_live(now_ms())
            || !presented.matches(&self.pepper, &record.secret_hash)
        {
            return Err(Denied::Unauthenticated(INVALID_KEY));
        }
        Ok(Caller {
            key_id: record.id.clone(),
            role: record.role,
            account: record.account.clone(),
        })
    }

    /// Whether `client` is refused for failed authentications right now,
    /// without asking Redis: checked first, so an address past its limit
    /// costs no Redis work with every guess.
    pub fn failures_refused(&self, client: &str) -> Option<Duration> {
        self.failures.refused(&failure_holder(client))
    }

    /// Counts a failed authentication against the client's address: past
    /// the limit, the answer is 429 rather than 401, and guessing keys from
    /// one address is slowed to `TALLY_AUTH_FAILURES_PER_S`.
    pub async fn note_failure(&self, client: &str) -> Result<(), Denied> {
        let holder = failure_holder(client);
        let want = match self.failures.spend(&holder, false) {
            Spend::Spent { .. } => return Ok(()),
            Spend::Refused(retry_after) => return Err(Denied::RateLimited { retry_after }),
            Spend::Need(want) => want,
        };
        let limit = RateLimit {
            per_s: self.settings.auth_failures_per_s,
            burst: self.settings.auth_failure_burst,
        };
        let bucket = crate::store::keys::rate_limit(&holder);
        let take = async {
            let mut conn = self.store.conn().await?;
            take_rate_tokens(&mut conn, &bucket, limit, want).await
        };
        match take.await {
            Ok(Take::Granted(granted)) => {
                self.failures.grant(&holder, granted);
                Ok(())
            }
            Ok(Take::Refused { retry_after }) => {
                self.failures.refuse(&holder, retry_after);
                Err(Denied::RateLimited { retry_after })
            }
            Err(err) => {
                tracing::warn!(error = %err, "failed-authentication limit unchecked: Redis did not answer");
                Ok(())
            }
        }
    }
}

const INVALID_KEY: &str = "the API key is not valid (unknown, expired or revoked)";

/// A client address's bucket for failed authentications. IPv6 clients are
/// counted per /64, the block one host is usually given, so rotating through
/// its addresses does not multiply the limit.
fn failure_holder(client: &str) -> String {
    let block = match client.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(address)) => {
            let segments = address.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
        _ => client.to_owned(),
    };
    format!("auth_failures:{block}")
}

/// Key records read from Redis. A record is trusted while no key has been
/// revoked since it was read (the [`RevocationWatch`] says), for at most
/// [`KEY_RECORD_TTL`]: a record changes only when its key is revoked, and
/// expiry is checked against the clock on every request.
struct KeyCache {
    /// How long the watch may go unconfirmed (`TALLY_API_KEY_CACHE_MS`).
    ttl: Duration,
    entries: Mutex<HashMap<KeyId, CachedKey>>,
}

struct CachedKey {
    read_at: Instant,
    /// The revocation epoch known before the read.
    epoch: Option<u64>,
    record: Arc<KeyRecord>,
}

impl KeyCache {
    fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl: ttl.min(Duration::from_millis(KEY_CACHE_MS_MAX)),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The record, if no key was revoked since it was read (`epoch` is the
    /// watch's, confirmed within the TTL) and it is younger than the TTL of
    /// records.
    fn fresh(&self, id: &KeyId, epoch: u64) -> Option<Arc<KeyRecord>> {
        let entries = self.entries.lock().expect("key cache lock");
        let cached = entries.get(id)?;
        (cached.epoch == Some(epoch) && cached.read_at.elapsed() < KEY_RECORD_TTL)
            .then(|| cached.record.clone())
    }

    /// The record last read, if it was read within [`KEY_STALE_IF_ERROR`].
    fn stale(&self, id: &KeyId) -> Option<Arc<KeyRecord>> {
        let entries = self.entries.lock().expect("key cache lock");
        let cached = entries.get(id)?;
        (cached.read_at.elapsed() < KEY_STALE_IF_ERROR).then(|| cached.record.clone())
    }

    /// Keeps a record read at `read_at`, tagged with the revocation epoch
    /// known before the read: a revocation that lands while the read is on
    /// its way moves the epoch on, and the record is read again. Only
    /// records of existing keys are kept, so guesses cannot fill the cache.
    fn insert(&self, read_at: Instant, epoch: Option<u64>, record: KeyRecord) -> Arc<KeyRecord> {
        let record = Arc::new(record);
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= KEY_CACHE_ENTRIES_MAX && !entries.contains_key(&record.id) {
            entries.retain(|_, cached| cached.read_at.elapsed() < KEY_STALE_IF_ERROR);
            if entries.len() >= KEY_CACHE_ENTRIES_MAX {
                entries.clear();
            }
        }
        let cached = CachedKey {
            read_at,
            epoch,
            record: record.clone(),
        };
        entries.insert(record.id.clone(), cached);
        record
    }

    fn forget(&self, id: &KeyId) {
        self.entries.lock().expect("key cache lock").remove(id);
    }
}

/// How often a process reads the revocation epoch.
pub const REVOCATION_POLL: Duration = Duration::from_millis(200);
/// Longest a key record is kept without being read again.
pub const KEY_RECORD_TTL: Duration = Duration::from_secs(60);

/// Follows `tally:api_keys:epoch`, which every revocation moves on, with one
/// small read every [`REVOCATION_POLL`] per process, whatever the number of
/// keys. Cached records are trusted only while the epoch they were read at
/// is the current one and the watch confirmed it within the cache TTL: a
/// process that cannot reach Redis stops trusting its copies within a second.
struct RevocationWatch {
    started: std::sync::Once,
    state: Mutex<Option<(u64, Instant)>>,
}

impl Default for RevocationWatch {
    fn default() -> Self {
        RevocationWatch {
            started: std::sync::Once::new(),
            state: Mutex::new(None),
        }
    }
}

impl RevocationWatch {
    /// The epoch, if confirmed within `within`.
    fn current(&self, within: Duration) -> Option<u64> {
        let state = self.state.lock().expect("revocation watch lock");
        let (epoch, confirmed_at) = (*state)?;
        (confirmed_at.elapsed() < within).then_some(epoch)
    }

    fn confirm(&self, epoch: u64, asked_at: Instant) {
        *self.state.lock().expect("revocation watch lock") = Some((epoch, asked_at));
    }

    /// Starts the poll (once), for as long as the authenticator lives.
    fn start(self: &Arc<Self>, store: &Store) {
        self.started.call_once(|| {
            let watch = Arc::downgrade(self);
            let store = store.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(REVOCATION_POLL);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(watch) = watch.upgrade() else {
                        return;
                    };
                    let asked_at = Instant::now();
                    let read = async {
                        let mut conn = store.conn().await?;
                        crate::store::api_keys::revocation_epoch(&mut conn, store.keys()).await
                    };
                    match read.await {
                        Ok(epoch) => watch.confirm(epoch, asked_at),
                        Err(err) => tracing::debug!(error = %err, "revocation epoch unread"),
                    }
                }
            });
        });
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
        if crate::store::accounts::get_account(&mut conn, store.keys(), account)
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
    crate::store::api_keys::create_api_key(&mut conn, store.keys(), &record).await?;
    tracing::info!(key_id = %record.id, role = %record.role, "API key created");
    Ok((generated, record))
}
