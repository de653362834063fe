//! Every Redis key tally uses is spelled here and nowhere else. Scripts get
//! their keys from these functions through `KEYS`, never by concatenating
//! inside Lua.
//!
//! Keys live on logical shards (`slots.rs`, CLUSTER.md): `tally:{<tag>}:...`,
//! one hash tag per shard, so that every key of one shard shares one hash
//! slot and a script that stays inside a shard is legal on Redis Cluster,
//! while a standalone Redis ignores the tags. Where things live:
//! - a customer account's shard (from its id): the account, its orders,
//!   wallet queue and transactions, the transfers it pays, its advances and
//!   idempotency records;
//! - every shard: its own journal (with index and carried sums), events,
//!   wallet and installment streams, account and advance indexes, and its
//!   sub-account of each system account (`@bank` is the sum of its N);
//! - a symbol's home shard (a hash of the symbol): its bucket, batches,
//!   settle stream, failed batches and counters.
//!
//! Ids made by tally carry their shard in their random bits
//! ([`ShardLayout::new_id_in`]), so a `GET` finds its record with no lookup.
//! A few keys stay untagged: each is only ever used alone (one command, or
//! a script with that one key).

use std::sync::Arc;

use uuid::Uuid;

use super::slots::{Shard, ShardLayout};
use crate::domain::{AccountId, BatchId, OrderId, Symbol, SystemAccount};

/// The shard count a deployment runs with (set once, before data exists),
/// stamped here by the first process; later ones refuse another count.
pub const SHARD_COUNT: &str = "tally:shards";

/// A key of today's layout that the single-node layout before shards also
/// had: its presence means data that `tally migrate` must move first.
pub const UNSHARDED_BANK: &str = "tally:account:@bank";

/// Set by `tally migrate` while it moves data of the single-node layout to
/// this one (string: the shard count it moves to), so that a run after a
/// crash part way knows the sharded keys it finds are its own.
pub const MIGRATION: &str = "tally:migration";

/// Held while an API process runs an audit (string: the holder's token,
/// expiring after the request timeout), so two audits never run at once.
pub const AUDIT_RUNNING: &str = "tally:audit:running";

/// Held while a worker process runs the periodic audit (string: the
/// holder's token), so one process at a time does. A lock of its own: an
/// operator's `GET /audit` is not refused while it runs.
pub const PERIODIC_AUDIT_RUNNING: &str = "tally:audit:periodic";

/// `tally dev`'s demo customer account (string: its id).
pub const DEV_DEMO_ACCOUNT: &str = "tally:dev:demo_account";

/// The ids of the keys the last `tally dev` printed (set), revoked by the next.
pub const DEV_KEYS: &str = "tally:dev:keys";

/// A rate-limit bucket (string: GCRA arrival time, µs), expiring once full.
/// `holder` is a key id and its class (`reads`, `writes`), or a client
/// address for failed authentications.
pub fn rate_limit(holder: &str) -> String {
    format!("tally:rate_limit:{holder}")
}

/// The streams consumer groups read, each with a short label (metrics) and
/// the name of its dead-letter stream: the workers trim each of them once
/// every group is done with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Settle,
    Wallet,
    Installments,
    Events,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Settle,
        StreamKind::Wallet,
        StreamKind::Installments,
        StreamKind::Events,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StreamKind::Settle => "settle",
            StreamKind::Wallet => "wallet",
            StreamKind::Installments => "installments",
            StreamKind::Events => "events",
        }
    }
}

/// The key names of one deployment: its shard layout and the tag strings.
/// Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    layout: Arc<ShardLayout>,
}

impl Default for Keys {
    /// The default shard count's keys.
    fn default() -> Self {
        Keys::new(crate::config::SHARDS_DEFAULT)
    }
}

impl Keys {
    pub fn new(shard_count: u16) -> Self {
        Keys {
            layout: Arc::new(ShardLayout::new(shard_count)),
        }
    }

    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// Every shard, in order.
    pub fn shards(&self) -> impl Iterator<Item = Shard> + '_ {
        self.layout.shards()
    }

    /// Every per-shard key: `tally:{<tag>}:<name>`. lib.lua's `shard_of_key`
    /// reads the shard back from a journal key's tag.
    fn at(&self, shard: Shard, name: std::fmt::Arguments<'_>) -> String {
        format!("tally:{{{}}}:{name}", self.layout.tag(shard))
    }

    // --- where things live ---

    /// Written before each wait for replicas (`WAIT` counts what the waiting
    /// connection wrote): a counter on the first shard.
    pub fn replica_ack(&self) -> String {
        self.replica_ack_on(self.layout.first())
    }

    /// The same counter on `shard`: on a cluster, one per master, on a
    /// shard that master serves.
    pub fn replica_ack_on(&self, shard: Shard) -> String {
        self.at(shard, format_args!("replica_ack"))
    }

    /// A customer account's shard; `None` for a system account, which has a
    /// sub-account on every shard.
    pub fn shard_of_account(&self, id: &AccountId) -> Option<Shard> {
        id.uuid().map(|uuid| self.layout.of_id(&uuid))
    }

    /// The shard of a record whose id tally drew there (orders, batches,
    /// transactions, advances, keys).
    pub fn shard_of_id(&self, id: &Uuid) -> Shard {
        self.layout.of_id(id)
    }

    /// The shard of a record whose id is stored as text; ids that are not
    /// UUIDs (none tally makes) fall to shard 0, where nothing is found.
    pub fn shard_of_text_id(&self, id: &str) -> Shard {
        Uuid::try_parse(id)
            .map(|uuid| self.layout.of_id(&uuid))
            .unwrap_or_else(|_| self.layout.first())
    }

    /// A symbol's home shard.
    pub fn shard_of_symbol(&self, symbol: &Symbol) -> Shard {
        self.layout.of_symbol(symbol.as_str())
    }

    /// A fresh id (UUIDv7) that lives on `shard`.
    pub fn new_id_in(&self, shard: Shard) -> Uuid {
        self.layout.new_id_in(shard)
    }

    /// A fresh customer account id. With an Idempotency-Key it is drawn on
    /// the key's shard (a hash of the key), so that a replay, which draws
    /// another id, finds the first request's record there.
    pub fn new_account_id(&self, idempotency_key: Option<&str>) -> AccountId {
        match idempotency_key {
            Some(key) => AccountId::from_uuid(self.new_id_in(self.layout.of_symbol(key))),
            None => AccountId::new_customer(),
        }
    }

    /// A fresh order id on its customer's shard.
    pub fn new_order_id(&self, account: &AccountId) -> OrderId {
        let shard = self
            .shard_of_account(account)
            .unwrap_or(self.layout.first());
        OrderId::from_uuid(self.new_id_in(shard))
    }

    /// A fresh batch id on its symbol's home shard.
    pub fn new_batch_id(&self, symbol: &Symbol) -> BatchId {
        BatchId::from_uuid(self.new_id_in(self.shard_of_symbol(symbol)))
    }

    // --- accounts ---

    /// A customer account (hash: id, name, balance in cents, created_at).
    /// A system account id names its sub-account on shard 0: use
    /// [`Keys::account_on`] where a system account may appear.
    pub fn account(&self, id: &AccountId) -> String {
        match self.shard_of_account(id) {
            Some(shard) => self.at(shard, format_args!("account:{id}")),
            None => self.at(self.layout.first(), format_args!("account:{id}")),
        }
    }

    /// `id`'s account as a script on `shard` sees it: a customer's own
    /// (which must live there for the script to be single-slot), or a system
    /// account's sub-account on `shard`.
    pub fn account_on(&self, shard: Shard, id: &AccountId) -> String {
        match self.shard_of_account(id) {
            Some(_) => self.account(id),
            None => self.at(shard, format_args!("account:{id}")),
        }
    }

    /// A system account's sub-account on `shard` (hash, as an account).
    pub fn system_account(&self, system: SystemAccount, shard: Shard) -> String {
        self.account_on(shard, &system.id())
    }

    /// A customer's journal entries (stream: `entry` the journal entry's id,
    /// `shard` its journal's shard), in the order they were written: those
    /// that moved its money, or that it asked for and were refused. The
    /// console's account page pages through it; the journal's trim trims it.
    pub fn account_entries(&self, id: &AccountId) -> String {
        self.on_account(id, format_args!("account:{id}:entries"))
    }

    /// A customer's orders (stream: `order` the order's id), in the order
    /// they were placed.
    pub fn account_orders(&self, id: &AccountId) -> String {
        self.on_account(id, format_args!("account:{id}:orders"))
    }

    /// Customer account index of a shard: a sorted set of ids, all with
    /// score 0, so that `ZRANGE BYLEX` pages through them in id (that is,
    /// creation) order.
    pub fn accounts(&self, shard: Shard) -> String {
        self.at(shard, format_args!("accounts"))
    }

    // --- the journal, per shard ---

    /// A shard's journal: one stream entry per movement of money.
    pub fn journal(&self, shard: Shard) -> String {
        self.at(shard, format_args!("journal"))
    }

    /// The journal's index for the report: every entry id, zero-padded so
    /// text order is id order (sorted set, all scores 0). Ranks page it in
    /// O(log N).
    pub fn journal_index(&self, shard: Shard) -> String {
        self.at(shard, format_args!("journal:index"))
    }

    /// Sums of a shard's journal entries trimmed past retention (hash:
    /// account id -> cents, and `kind:<kind>` -> cents), so the audit still
    /// adds up after a trim.
    pub fn journal_carried(&self, shard: Shard) -> String {
        self.at(shard, format_args!("journal:carried"))
    }

    /// Audits reading a shard's journal (sorted set: audit token -> until,
    /// ms). While one is in force the trim waits, so an entry cannot leave
    /// the journal for the carried sums between the audit's read of the two.
    pub fn journal_trim_pauses(&self, shard: Shard) -> String {
        self.at(shard, format_args!("journal:trim_pauses"))
    }

    // --- accounting events, per shard ---

    /// Accounting events (stream): the transactional outbox the notifier delivers.
    pub fn events(&self, shard: Shard) -> String {
        self.at(shard, format_args!("events"))
    }

    /// Event deliveries waiting for their next attempt (sorted set: job JSON by due ms).
    pub fn events_retries(&self, shard: Shard) -> String {
        self.at(shard, format_args!("events:retries"))
    }

    /// Events the webhook would not take after every retry (stream).
    pub fn events_dead(&self, shard: Shard) -> String {
        self.at(shard, format_args!("events:dead"))
    }

    // --- orders, buckets and batches ---

    /// A purchase order (hash), on its customer's shard; `listed` is its
    /// entry's id on its customer's list of orders.
    pub fn order(&self, id: &OrderId) -> String {
        self.at(self.shard_of_id(&id.uuid()), format_args!("order:{id}"))
    }

    /// Orders debited on a shard whose saga is not known to be finished
    /// (sorted set: order id by when a sweeper may take it over, ms).
    pub fn order_intents(&self, shard: Shard) -> String {
        self.at(shard, format_args!("order_intents"))
    }

    /// Transfers debited on a shard whose saga (to another shard's payee) is
    /// not finished (sorted set: transaction id by when a sweeper may take
    /// it over, ms).
    pub fn transfer_intents(&self, shard: Shard) -> String {
        self.at(shard, format_args!("transfer_intents"))
    }

    /// Failed batches of a home shard being refunded through the refund saga
    /// (sorted set: batch id by when a sweeper may take it over, ms).
    pub fn refund_intents(&self, shard: Shard) -> String {
        self.at(shard, format_args!("refund_intents"))
    }

    /// Whether a payee took a transfer from another shard (string
    /// `credited` or `refused CODE`, expiring), on the payee's shard.
    pub fn transfer_credit(&self, payee: &AccountId, id: &str) -> String {
        self.at(
            self.account_shard(payee),
            format_args!("transfer_credit:{id}"),
        )
    }

    /// That an order joined its symbol's bucket, and in which epoch (string,
    /// expiring), on the symbol's home shard: admission happens once.
    pub fn order_admission(&self, symbol: &Symbol, id: &OrderId) -> String {
        self.at(self.shard_of_symbol(symbol), format_args!("admitted:{id}"))
    }

    /// A symbol's pending bucket (hash: value, quantity, count, epoch).
    pub fn bucket(&self, symbol: &Symbol) -> String {
        self.at(
            self.shard_of_symbol(symbol),
            format_args!("bucket:{symbol}"),
        )
    }

    /// Order ids waiting in a symbol's bucket (list).
    pub fn bucket_orders(&self, symbol: &Symbol) -> String {
        self.at(
            self.shard_of_symbol(symbol),
            format_args!("bucket:{symbol}:orders"),
        )
    }

    /// Which batch each closed epoch of a bucket became (hash: epoch -> batch id).
    pub fn bucket_batches(&self, symbol: &Symbol) -> String {
        self.at(
            self.shard_of_symbol(symbol),
            format_args!("bucket:{symbol}:batches"),
        )
    }

    /// A batch of orders bought in one exchange call (hash), on its symbol's
    /// home shard.
    pub fn batch(&self, id: &BatchId) -> String {
        self.at(self.shard_of_id(&id.uuid()), format_args!("batch:{id}"))
    }

    /// The order ids of a batch (list).
    pub fn batch_orders(&self, id: &BatchId) -> String {
        self.at(
            self.shard_of_id(&id.uuid()),
            format_args!("batch:{id}:orders"),
        )
    }

    /// Batch ids of the symbols homed on a shard, by creation time (sorted set).
    pub fn batches(&self, shard: Shard) -> String {
        self.at(shard, format_args!("batches"))
    }

    /// Every symbol homed on a shard that has ever been ordered (set), so
    /// the audit finds all buckets.
    pub fn symbols(&self, shard: Shard) -> String {
        self.at(shard, format_args!("symbols"))
    }

    /// Settle jobs, one per batch, consumed by the settlement workers.
    pub fn settle(&self, shard: Shard) -> String {
        self.at(shard, format_args!("settle"))
    }

    /// Settle jobs that failed for good (stream), for operators.
    pub fn settle_dead(&self, shard: Shard) -> String {
        self.at(shard, format_args!("settle:dead"))
    }

    /// Settle jobs waiting for their next attempt (sorted set: job JSON by due ms).
    pub fn settle_retries(&self, shard: Shard) -> String {
        self.at(shard, format_args!("settle:retries"))
    }

    /// Batches that failed, by failure time (sorted set), for operators.
    pub fn failed_batches(&self, shard: Shard) -> String {
        self.at(shard, format_args!("batches:failed"))
    }

    /// Counters for operators and the bench (hash: batches_settled).
    pub fn stats(&self, shard: Shard) -> String {
        self.at(shard, format_args!("stats"))
    }

    // --- transfers and idempotency ---

    /// A transfer or bank transaction (hash), kept for the idempotency ttl:
    /// it answers a replay of its Idempotency-Key and a second run of its
    /// call. On the shard its id was drawn in (the paying customer's).
    pub fn transaction(&self, id: &str) -> String {
        self.at(self.shard_of_text_id(id), format_args!("transaction:{id}"))
    }

    /// What one Idempotency-Key did for one kind of request (string), on the
    /// shard of the account the request acts for.
    pub fn idempotency(&self, shard: Shard, scope: &str, key: &str) -> String {
        self.at(shard, format_args!("idempotency:{scope}:{key}"))
    }

    // --- the wallet ---

    /// Wallet jobs (stream): one entry per account with queued transactions.
    pub fn wallet(&self, shard: Shard) -> String {
        self.at(shard, format_args!("wallet"))
    }

    /// Wallet jobs no worker could read (stream), for operators.
    pub fn wallet_dead(&self, shard: Shard) -> String {
        self.at(shard, format_args!("wallet:dead"))
    }

    /// Rejected wallet transactions (stream), with their reasons: the
    /// `transactions:errors` stream, one per shard.
    pub fn wallet_errors(&self, shard: Shard) -> String {
        format!("transactions:errors:{{{}}}", self.layout.tag(shard))
    }

    /// A wallet transaction (hash), on its account's shard.
    pub fn wallet_transaction(&self, id: &str) -> String {
        self.at(
            self.shard_of_text_id(id),
            format_args!("wallet:transaction:{id}"),
        )
    }

    /// An account's wallet transactions waiting to be applied, in order (list).
    pub fn wallet_queue(&self, account: &AccountId) -> String {
        self.on_account(account, format_args!("wallet:queue:{account}"))
    }

    /// Set while an account has a job on the wallet stream (string).
    pub fn wallet_scheduled(&self, account: &AccountId) -> String {
        self.on_account(account, format_args!("wallet:scheduled:{account}"))
    }

    /// A shard's applied wallet transactions, by when they were applied
    /// (sorted set, ms): retention takes them out of Redis in this order.
    pub fn wallet_applied(&self, shard: Shard) -> String {
        self.at(shard, format_args!("wallet:applied"))
    }

    /// An account's wallet transactions by id, that is by time (sorted set, scores 0).
    pub fn wallet_history(&self, account: &AccountId) -> String {
        self.on_account(account, format_args!("wallet:history:{account}"))
    }

    fn on_account(&self, account: &AccountId, name: std::fmt::Arguments<'_>) -> String {
        self.at(self.account_shard(account), name)
    }

    /// A customer account's shard (shard 0 for a system account, which
    /// never has records of its own there).
    pub fn account_shard(&self, account: &AccountId) -> Shard {
        self.shard_of_account(account)
            .unwrap_or(self.layout.first())
    }

    // --- advances and installments ---

    /// Advances on a shard by creation time (sorted set).
    pub fn advances(&self, shard: Shard) -> String {
        self.at(shard, format_args!("advances"))
    }

    /// An advance with its installments (hash: `i<n>:amount`, `i<n>:due`,
    /// `i<n>:status`, ...), on its account's shard.
    pub fn advance(&self, id: &str) -> String {
        self.at(self.shard_of_text_id(id), format_args!("advance:{id}"))
    }

    /// Advances repaid on a shard (sorted set: id by when repaid), which
    /// retention reads.
    pub fn advances_repaid(&self, shard: Shard) -> String {
        self.at(shard, format_args!("advances:repaid"))
    }

    /// An account's advances by creation time (sorted set).
    pub fn account_advances(&self, account: &AccountId) -> String {
        self.on_account(account, format_args!("account:{account}:advances"))
    }

    /// Installments not yet due (sorted set: "advance_id:n" by due ms).
    pub fn installments_due(&self, shard: Shard) -> String {
        self.at(shard, format_args!("installments:due"))
    }

    /// Installments leased to a worker (sorted set: "advance_id:n" by lease expiry ms).
    pub fn installments_leased(&self, shard: Shard) -> String {
        self.at(shard, format_args!("installments:leased"))
    }

    /// Installment jobs (stream).
    pub fn installments(&self, shard: Shard) -> String {
        self.at(shard, format_args!("installments"))
    }

    /// Installment jobs no worker could read (stream), for operators.
    pub fn installments_dead(&self, shard: Shard) -> String {
        self.at(shard, format_args!("installments:dead"))
    }

    // --- job streams, generically ---

    /// A job stream of a shard.
    pub fn job_stream(&self, stream: StreamKind, shard: Shard) -> String {
        match stream {
            StreamKind::Settle => self.settle(shard),
            StreamKind::Wallet => self.wallet(shard),
            StreamKind::Installments => self.installments(shard),
            StreamKind::Events => self.events(shard),
        }
    }

    /// Where a job stream's jobs go when no worker could handle them.
    pub fn job_stream_dead(&self, stream: StreamKind, shard: Shard) -> String {
        match stream {
            StreamKind::Settle => self.settle_dead(shard),
            StreamKind::Wallet => self.wallet_dead(shard),
            StreamKind::Installments => self.installments_dead(shard),
            StreamKind::Events => self.events_dead(shard),
        }
    }

    // --- API keys ---

    /// API keys on a shard by creation time (sorted set: key id by ms).
    pub fn api_keys(&self, shard: Shard) -> String {
        self.at(shard, format_args!("api_keys"))
    }

    /// An API key's record (hash: role, bound account, secret hash, times,
    /// limits), on the shard its id was drawn in. The secret itself is never
    /// stored.
    pub fn api_key(&self, id: &crate::access::KeyId) -> String {
        self.at(self.api_key_shard(id), format_args!("api_key:{id}"))
    }

    /// Moved on by every revocation of a key on this shard (string: a
    /// counter): API processes read the sum over the shards a few times a
    /// second and drop their cached key records when it moves.
    pub fn api_keys_epoch(&self, shard: Shard) -> String {
        self.at(shard, format_args!("api_keys:epoch"))
    }

    /// An API key's rate-limit bucket for a class of requests (`reads`,
    /// `writes`), beside its record (see [`rate_limit`]).
    pub fn api_key_rate_limit(&self, id: &crate::access::KeyId, class: &str) -> String {
        self.at(
            self.api_key_shard(id),
            format_args!("rate_limit:{id}:{class}"),
        )
    }

    /// A key id is a UUID's 32 hex digits.
    pub fn api_key_shard(&self, id: &crate::access::KeyId) -> Shard {
        self.shard_of_text_id(id.as_str())
    }

    /// What an operator did with a dead letter (string `replayed <new id>`
    /// or `discarded`, expiring), beside its dead-letter stream: a second
    /// run of the same resolution answers as the first did.
    pub fn dead_letter_resolution(&self, stream: StreamKind, shard: Shard, id: &str) -> String {
        format!("{}:resolved:{id}", self.job_stream_dead(stream, shard))
    }

    /// Dead letters an operator resolved on a shard (stream: the letter's
    /// fields, with `resolved_stream`, `resolved_letter`, `resolution` and
    /// `replayed_as`), until retention archives them.
    pub fn dead_letters_resolved(&self, shard: Shard) -> String {
        self.at(shard, format_args!("dead_letters:resolved"))
    }

    // --- the operator's console ---

    /// A console session (hash: key id, role, CSRF token, times), named by
    /// the SHA-256 of its cookie's token (so Redis never holds a token a
    /// browser could present), on the shard that hash falls on. It expires
    /// on its own.
    pub fn console_session(&self, token_hash: &str) -> String {
        self.at(
            self.layout.of_symbol(token_hash),
            format_args!("console:session:{token_hash}"),
        )
    }

    /// What operators did on a shard (stream: who, what, the money effect),
    /// trimmed to a bound; on the shard of what they acted on.
    pub fn operator_log(&self, shard: Shard) -> String {
        self.at(shard, format_args!("operator_log"))
    }

    /// The last periodic audit's result (hash: at, clean, figures, report
    /// text), read by the console.
    pub fn last_audit(&self) -> String {
        self.at(self.layout.first(), format_args!("audit:last"))
    }

    // --- the archive ---

    /// The archive's identity (string: the id written in the archive
    /// directory's `ARCHIVE` file): a directory of another dataset is refused.
    pub fn archive_identity(&self) -> String {
        self.at(self.layout.first(), format_args!("archive:id"))
    }

    /// Held by the one process archiving a shard at a time (string: token).
    pub fn archive_lock(&self, shard: Shard) -> String {
        self.at(shard, format_args!("archive:lock"))
    }

    /// How much of each of a shard's archive files is committed (hash: UTC
    /// day -> bytes). Set by the script that removes what was archived.
    pub fn archive_committed(&self, shard: Shard) -> String {
        self.at(shard, format_args!("archive:committed"))
    }

    /// What records that left a shard still count for in the audit (hash:
    /// `batches_value` -> cents).
    pub fn archive_carried(&self, shard: Shard) -> String {
        self.at(shard, format_args!("archive:carried"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slots::hash_slot;

    /// Every key a script on `shard` may name, from the shard's own keys and
    /// records whose ids were drawn there.
    fn keys_of(keys: &Keys, shard: Shard) -> Vec<String> {
        let customer = AccountId::from_uuid(keys.new_id_in(shard));
        let order = OrderId::from_uuid(keys.new_id_in(shard));
        let batch = BatchId::from_uuid(keys.new_id_in(shard));
        let record = keys.new_id_in(shard).to_string();
        let key_id = crate::access::KeyId::parse(&keys.new_id_in(shard).simple().to_string())
            .expect("a key id");
        let mut all = vec![
            keys.account(&customer),
            keys.account_on(shard, &customer),
            keys.accounts(shard),
            keys.journal(shard),
            keys.journal_index(shard),
            keys.journal_carried(shard),
            keys.journal_trim_pauses(shard),
            keys.order(&order),
            keys.batch(&batch),
            keys.batch_orders(&batch),
            keys.batches(shard),
            keys.symbols(shard),
            keys.settle_retries(shard),
            keys.failed_batches(shard),
            keys.stats(shard),
            keys.transaction(&record),
            keys.idempotency(shard, "orders", "k"),
            keys.wallet_errors(shard),
            keys.wallet_transaction(&record),
            keys.wallet_queue(&customer),
            keys.wallet_scheduled(&customer),
            keys.wallet_history(&customer),
            keys.advances(shard),
            keys.advance(&record),
            keys.account_advances(&customer),
            keys.installments_due(shard),
            keys.installments_leased(shard),
            keys.events_retries(shard),
            keys.api_keys(shard),
            keys.api_key(&key_id),
            keys.api_keys_epoch(shard),
            keys.api_key_rate_limit(&key_id, "reads"),
        ];
        for system in SystemAccount::ALL {
            all.push(keys.system_account(system, shard));
        }
        for stream in StreamKind::ALL {
            all.push(keys.job_stream(stream, shard));
            all.push(keys.job_stream_dead(stream, shard));
            all.push(keys.dead_letter_resolution(stream, shard, "1-0"));
        }
        all.push(keys.operator_log(shard));
        all
    }

    #[test]
    fn every_key_of_a_shard_shares_its_slot() {
        for count in [1, 3, 16] {
            let keys = Keys::new(count);
            for shard in keys.shards() {
                let slot = hash_slot(keys.journal(shard).as_bytes());
                for key in keys_of(&keys, shard) {
                    assert_eq!(hash_slot(key.as_bytes()), slot, "{count} shards: {key}");
                }
            }
        }
    }

    #[test]
    fn a_symbols_records_live_on_its_home_shard() {
        let keys = Keys::default();
        let symbol = Symbol::parse("ABAN").unwrap();
        let home = keys.shard_of_symbol(&symbol);
        let batch = keys.new_batch_id(&symbol);
        let slot = hash_slot(keys.settle(home).as_bytes());
        for key in [
            keys.bucket(&symbol),
            keys.bucket_orders(&symbol),
            keys.bucket_batches(&symbol),
            keys.batch(&batch),
        ] {
            assert_eq!(hash_slot(key.as_bytes()), slot, "{key}");
        }
        let customer = AccountId::new_customer();
        assert_eq!(
            keys.shard_of_id(&keys.new_order_id(&customer).uuid()),
            keys.account_shard(&customer),
            "an order lives with its customer"
        );
    }

    #[test]
    fn an_idempotency_key_draws_new_accounts_on_one_shard() {
        let keys = Keys::default();
        let first = keys.new_account_id(Some("key-1"));
        let replay = keys.new_account_id(Some("key-1"));
        assert_ne!(first, replay);
        assert_eq!(keys.account_shard(&first), keys.account_shard(&replay));
    }
}
