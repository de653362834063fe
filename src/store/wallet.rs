//! Wallet transactions: accepted into the account's queue, applied in order
//! by the wallet workers.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::{Conn, Record, StoreError, StoreResult, verdict};
use crate::domain::{AccountId, Amount, Idempotency, SystemAccount};

static ENQUEUE: LazyLock<Script> = lua_script!("enqueue_wallet_transaction.lua");
static APPLY: LazyLock<Script> = lua_script!("apply_wallet_transaction.lua");
static RELEASE: LazyLock<Script> = lua_script!("release_wallet_account.lua");

pub fn scripts() -> [&'static Script; 3] {
    [&ENQUEUE, &APPLY, &RELEASE]
}

/// The consumer group of the wallet workers.
pub const WALLET_GROUP: &str = "wallet";
/// The wallet jobs, and where the unreadable ones go.
pub const WALLET_JOBS: super::streams::JobStream = super::streams::JobStream {
    kind: super::keys::StreamKind::Wallet,
    group: WALLET_GROUP,
};
/// Bound on `transactions:errors`, a report for people that no consumer
/// acknowledges: Redis keeps about the newest this many rejections.
pub const ERRORS_STREAM_LENGTH_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalletKind {
    Deposit,
    Withdrawal,
    CardPayment,
}

impl WalletKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Withdrawal => "withdrawal",
            Self::CardPayment => "card_payment",
        }
    }

    /// Where the money comes from (deposits) or goes (the others).
    pub fn counterpart(self) -> AccountId {
        match self {
            Self::CardPayment => SystemAccount::Card.id(),
            Self::Deposit | Self::Withdrawal => SystemAccount::Bank.id(),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "deposit" => Some(Self::Deposit),
            "withdrawal" => Some(Self::Withdrawal),
            "card_payment" => Some(Self::CardPayment),
            _ => None,
        }
    }
}

pub struct NewWalletTransaction {
    pub id: String,
    pub account_id: AccountId,
    pub kind: WalletKind,
    pub amount: Amount,
    pub description: String,
    pub merchant: String,
    pub idempotency: Option<Idempotency>,
    pub idempotency_ttl_secs: u64,
    pub at_ms: i64,
    /// Most transactions the account may have waiting, this one included.
    pub queue_max: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Queued(String),
    Replayed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("account not found")]
    AccountNotFound,
    #[error("the account already has {waiting} transactions waiting")]
    QueueFull { waiting: usize },
    #[error("the Idempotency-Key was used for another request (transaction {0})")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Queues a transaction on its account's shard (the API draws its id there).
pub async fn enqueue(
    conn: &mut impl Conn,
    keys: &Keys,
    txn: &NewWalletTransaction,
) -> Result<EnqueueOutcome, EnqueueError> {
    let shard = keys.account_shard(&txn.account_id);
    let (idempotency_key, fingerprint) = match &txn.idempotency {
        Some(idem) => (
            keys.idempotency(shard, "wallet", idem.key.as_str()),
            idem.fingerprint.as_str(),
        ),
        None => (keys.idempotency(shard, "wallet", "-"), ""),
    };
    let reply: Vec<String> = ENQUEUE
        .key(keys.account(&txn.account_id))
        .key(keys.wallet_transaction(&txn.id))
        .key(keys.wallet_queue(&txn.account_id))
        .key(keys.wallet_history(&txn.account_id))
        .key(keys.wallet_scheduled(&txn.account_id))
        .key(keys.wallet(shard))
        .key(idempotency_key)
        .arg(&txn.id)
        .arg(txn.account_id.as_str())
        .arg(txn.kind.as_str())
        .arg(txn.amount.cents())
        .arg(&txn.description)
        .arg(&txn.merchant)
        .arg(fingerprint)
        .arg(txn.idempotency_ttl_secs)
        .arg(txn.at_ms)
        .arg(txn.queue_max)
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    let word = |i: usize| reply.get(i).cloned().unwrap_or_default();
    match (verdict(&reply), word(1).as_str()) {
        ("queued", _) => Ok(EnqueueOutcome::Queued(word(1))),
        ("replayed", _) => Ok(EnqueueOutcome::Replayed(word(1))),
        ("refused", "account_not_found") => Err(EnqueueError::AccountNotFound),
        ("refused", "queue_full") => match word(2).parse() {
            Ok(waiting) => Err(EnqueueError::QueueFull { waiting }),
            Err(_) => Err(StoreError::UnexpectedReply(reply).into()),
        },
        ("refused", "idempotency_conflict") => Err(EnqueueError::IdempotencyConflict(word(2))),
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// The id at the head of an account's queue, if any.
pub async fn queue_head(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
) -> StoreResult<Option<String>> {
    Ok(conn.lindex(keys.wallet_queue(account), 0).await?)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Completed,
    Rejected(String),
    /// The head had changed: another delivery applied it.
    Skipped,
}

pub async fn apply(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    txn_id: &str,
    kind: WalletKind,
    worker: &str,
) -> StoreResult<Applied> {
    apply_at(conn, keys, account, txn_id, kind, worker, super::now_ms()).await
}

/// [`apply`] at the moment `now_ms`: the same call run twice (as a cluster
/// client re-sends one whose reply was lost) applies once and answers as it
/// did; another delivery's call is `Skipped`.
pub async fn apply_at(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    txn_id: &str,
    kind: WalletKind,
    worker: &str,
    now_ms: i64,
) -> StoreResult<Applied> {
    let counterpart = kind.counterpart();
    let shard = keys.account_shard(account);
    let reply: Vec<String> = APPLY
        .key(keys.wallet_queue(account))
        .key(keys.wallet_transaction(txn_id))
        .key(keys.account(account))
        .key(keys.account_on(shard, &counterpart))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.events(shard))
        .key(keys.wallet_errors(shard))
        .key(keys.account_entries(account))
        .key(keys.wallet_applied(shard))
        .arg(txn_id)
        .arg(account.as_str())
        .arg(counterpart.as_str())
        .arg(now_ms)
        .arg(worker)
        .arg(ERRORS_STREAM_LENGTH_MAX)
        .invoke_async(conn)
        .await?;
    match verdict(&reply) {
        "completed" => Ok(Applied::Completed),
        "rejected" => Ok(Applied::Rejected(reply.get(1).cloned().unwrap_or_default())),
        "skipped" => Ok(Applied::Skipped),
        _ => Err(StoreError::UnexpectedReply(reply)),
    }
}

/// Acknowledges an account's job; puts it back on the stream if its queue is not empty.
pub async fn release(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    stream_id: &str,
) -> StoreResult<()> {
    let _: Vec<String> = RELEASE
        .key(keys.wallet_queue(account))
        .key(keys.wallet_scheduled(account))
        .key(keys.wallet(keys.account_shard(account)))
        .arg(WALLET_GROUP)
        .arg(stream_id)
        .arg(account.as_str())
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// A wallet transaction as stored.
#[derive(Debug, Clone)]
pub struct WalletTransaction {
    pub id: String,
    pub account_id: AccountId,
    pub kind: WalletKind,
    pub amount: Amount,
    pub description: String,
    pub merchant: String,
    pub status: String,
    pub reason: Option<String>,
    pub created_at_ms: i64,
    pub applied_at_ms: Option<i64>,
    pub accepted_seq: i64,
    pub applied_seq: Option<i64>,
    pub worker: Option<String>,
}

pub async fn get(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
) -> StoreResult<Option<WalletTransaction>> {
    let key = keys.wallet_transaction(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let optional_integer = |field: &str| {
        record
            .optional_text(field)
            .and_then(|text| text.parse().ok())
    };
    Ok(Some(WalletTransaction {
        id: record.text("id")?.to_owned(),
        account_id: record.parsed("account_id", AccountId::parse)?,
        kind: record.parsed("kind", |text| WalletKind::parse(text).ok_or("unknown kind"))?,
        amount: record.parsed("amount", |text| {
            text.parse::<i64>()
                .map_err(|err| err.to_string())
                .and_then(|cents| Amount::from_cents(cents).map_err(|err| err.to_string()))
        })?,
        description: record.optional_text("description").unwrap_or("").to_owned(),
        merchant: record.optional_text("merchant").unwrap_or("").to_owned(),
        status: record.text("status")?.to_owned(),
        reason: record.optional_text("reason").map(str::to_owned),
        created_at_ms: record.integer("created_at")?,
        applied_at_ms: optional_integer("applied_at"),
        accepted_seq: record.integer("accepted_seq")?,
        applied_seq: optional_integer("applied_seq"),
        worker: record.optional_text("worker").map(str::to_owned),
    }))
}

/// Up to `limit` transaction ids of an account, newest first, older than `before`.
pub async fn history(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<String>> {
    let high = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
    Ok(conn
        .zrevrangebylex_limit(keys.wallet_history(account), high, "-", 0, limit as isize)
        .await?)
}
