//! Every Redis key tally uses is spelled here and nowhere else. Scripts get
//! their keys from these functions through `KEYS`, never by concatenating
//! inside Lua. (Redis Cluster needs more than hash tags here: most scripts
//! write global keys beside an account's; see `slots.rs` and CLUSTER.md.)

use crate::domain::{AccountId, BatchId, OrderId, Symbol};

/// Customer account index: a sorted set of ids, all with score 0, so that
/// `ZRANGE BYLEX` pages through them in id (that is, creation) order.
pub const ACCOUNTS: &str = "tally:accounts";
/// The journal: one stream entry per movement of money.
pub const JOURNAL: &str = "tally:journal";
/// The journal's index for the report: every entry id, zero-padded so text
/// order is id order (sorted set, all scores 0). Ranks page it in O(log N).
pub const JOURNAL_INDEX: &str = "tally:journal:index";
/// Sums of journal entries trimmed past retention (hash: account id -> cents,
/// and `kind:<kind>` -> cents), so the audit still adds up after a trim.
pub const JOURNAL_CARRIED: &str = "tally:journal:carried";
/// Audits reading the journal (sorted set: audit token -> until, ms). While
/// one is in force the trim waits, so an entry cannot leave the journal for
/// the carried sums between the audit's read of the two.
pub const JOURNAL_TRIM_PAUSES: &str = "tally:journal:trim_pauses";
/// A transfer or bank transaction (hash), kept for the idempotency ttl: it
/// answers a replay of its Idempotency-Key and a second run of its call.
pub fn transaction(id: &str) -> String {
    format!("tally:transaction:{id}")
}
/// Settle jobs, one per batch, consumed by the settlement workers.
pub const SETTLE_STREAM: &str = "tally:settle";
/// Settle jobs that failed for good (stream), for operators.
pub const SETTLE_DEAD_STREAM: &str = "tally:settle:dead";
/// Settle jobs waiting for their next attempt (sorted set: job JSON by due ms).
pub const SETTLE_RETRIES: &str = "tally:settle:retries";
/// Batches that failed, by failure time (sorted set), for operators.
pub const FAILED_BATCHES: &str = "tally:batches:failed";
/// Accounting events (stream): the transactional outbox the notifier delivers.
pub const EVENTS_STREAM: &str = "tally:events";
/// Counters for operators and the bench (hash: batches_settled).
pub const STATS: &str = "tally:stats";
/// Batch ids by creation time (sorted set).
pub const BATCHES: &str = "tally:batches";
/// Every symbol that has ever been ordered (set), so the audit finds all buckets.
pub const SYMBOLS: &str = "tally:symbols";

/// An account (hash: id, name, balance in cents, created_at).
pub fn account(id: &AccountId) -> String {
    format!("tally:account:{id}")
}

/// A purchase order (hash).
pub fn order(id: &OrderId) -> String {
    format!("tally:order:{id}")
}

/// A symbol's pending bucket (hash: value, quantity, count, epoch).
pub fn bucket(symbol: &Symbol) -> String {
    format!("tally:bucket:{symbol}")
}

/// Order ids waiting in a symbol's bucket (list).
pub fn bucket_orders(symbol: &Symbol) -> String {
    format!("tally:bucket:{symbol}:orders")
}

/// Which batch each closed epoch of a bucket became (hash: epoch -> batch id).
pub fn bucket_batches(symbol: &Symbol) -> String {
    format!("tally:bucket:{symbol}:batches")
}

/// A batch of orders bought in one exchange call (hash).
pub fn batch(id: &BatchId) -> String {
    format!("tally:batch:{id}")
}

/// The order ids of a batch (list).
pub fn batch_orders(id: &BatchId) -> String {
    format!("tally:batch:{id}:orders")
}

/// What one Idempotency-Key did for one kind of request (string).
pub fn idempotency(scope: &str, key: &str) -> String {
    format!("tally:idempotency:{scope}:{key}")
}

/// Wallet jobs (stream): one entry per account with queued transactions.
pub const WALLET_STREAM: &str = "tally:wallet";
/// Wallet jobs no worker could read (stream), for operators.
pub const WALLET_DEAD_STREAM: &str = "tally:wallet:dead";
/// Rejected wallet transactions (stream), with their reasons.
pub const WALLET_ERRORS_STREAM: &str = "transactions:errors";
/// Event deliveries waiting for their next attempt (sorted set: job JSON by due ms).
pub const EVENTS_RETRIES: &str = "tally:events:retries";
/// Events the webhook would not take after every retry (stream).
pub const EVENTS_DEAD_STREAM: &str = "tally:events:dead";

/// A wallet transaction (hash).
pub fn wallet_transaction(id: &str) -> String {
    format!("tally:wallet:transaction:{id}")
}

/// An account's wallet transactions waiting to be applied, in order (list).
pub fn wallet_queue(account: &AccountId) -> String {
    format!("tally:wallet:queue:{account}")
}

/// Set while an account has a job on the wallet stream (string).
pub fn wallet_scheduled(account: &AccountId) -> String {
    format!("tally:wallet:scheduled:{account}")
}

/// An account's wallet transactions by id, that is by time (sorted set, scores 0).
pub fn wallet_history(account: &AccountId) -> String {
    format!("tally:wallet:history:{account}")
}

/// Installments not yet due (sorted set: "advance_id:n" by due ms).
pub const INSTALLMENTS_DUE: &str = "tally:installments:due";
/// Installments leased to a worker (sorted set: "advance_id:n" by lease expiry ms).
pub const INSTALLMENTS_LEASED: &str = "tally:installments:leased";
/// Installment jobs (stream).
pub const INSTALLMENTS_STREAM: &str = "tally:installments";
/// Installment jobs no worker could read (stream), for operators.
pub const INSTALLMENTS_DEAD_STREAM: &str = "tally:installments:dead";

/// The streams consumer groups read, each with a short label (metrics):
/// the workers trim each of them once every group is done with an entry.
pub const CONSUMED_STREAMS: [(&str, &str); 4] = [
    ("settle", SETTLE_STREAM),
    ("wallet", WALLET_STREAM),
    ("installments", INSTALLMENTS_STREAM),
    ("events", EVENTS_STREAM),
];
/// Every advance by creation time (sorted set).
pub const ADVANCES: &str = "tally:advances";

/// An advance with its installments (hash: `i<n>:amount`, `i<n>:due`, `i<n>:status`, ...).
pub fn advance(id: &str) -> String {
    format!("tally:advance:{id}")
}

/// An account's advances by creation time (sorted set).
pub fn account_advances(account: &AccountId) -> String {
    format!("tally:account:{account}:advances")
}

/// Every API key by creation time (sorted set: key id by ms).
pub const API_KEYS: &str = "tally:api_keys";

/// Moved on by every revocation (string: a counter): API processes read it
/// a few times a second and drop their cached key records when it moves.
pub const API_KEYS_EPOCH: &str = "tally:api_keys:epoch";

/// An API key's record (hash: role, bound account, secret hash, times, limits).
/// The secret itself is never stored.
pub fn api_key(id: &crate::access::KeyId) -> String {
    format!("tally:api_key:{id}")
}

/// A rate-limit bucket (string: GCRA arrival time, µs), expiring once full.
/// `holder` is a key id and its class (`reads`, `writes`), or a client
/// address for failed authentications.
pub fn rate_limit(holder: &str) -> String {
    format!("tally:rate_limit:{holder}")
}

/// Held while an API process runs an audit (string: the holder's token,
/// expiring after the request timeout), so two audits never run at once.
pub const AUDIT_RUNNING: &str = "tally:audit:running";

/// `tally dev`'s demo customer account (string: its id).
pub const DEV_DEMO_ACCOUNT: &str = "tally:dev:demo_account";

/// The ids of the keys the last `tally dev` printed (set), revoked by the next.
pub const DEV_KEYS: &str = "tally:dev:keys";
