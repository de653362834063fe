//! Advances and their installments: creation, the scheduler's leases, and
//! collection.

use std::sync::LazyLock;

use redis::Script;

use super::keys::{Keys, StreamKind};
use super::slots::Shard;
use super::{Conn, Record, StoreError, StoreResult, verdict};
use crate::domain::{AccountId, Amount, Idempotency, SystemAccount};

static CREATE_ADVANCE: LazyLock<Script> = lua_script!("create_advance.lua");
static LEASE_DUE: LazyLock<Script> = lua_script!("lease_due_installments.lua");
static COLLECT: LazyLock<Script> = lua_script!("collect_installment.lua");

pub fn scripts() -> [&'static Script; 3] {
    [&CREATE_ADVANCE, &LEASE_DUE, &COLLECT]
}

/// The consumer group of the installment collectors.
pub const COLLECT_GROUP: &str = "collectors";
/// The installment jobs, and where the unreadable ones go.
pub const INSTALLMENT_JOBS: super::streams::JobStream = super::streams::JobStream {
    kind: StreamKind::Installments,
    group: COLLECT_GROUP,
};
/// Installments per advance.
pub const INSTALLMENTS: u32 = 12;

pub struct NewAdvance {
    pub id: String,
    pub account_id: AccountId,
    pub amount: Amount,
    pub period_ms: u64,
    pub now_ms: i64,
    pub idempotency: Option<Idempotency>,
    pub idempotency_ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    #[error("account not found")]
    AccountNotFound,
    #[error("the Idempotency-Key was used for another request (advance {0})")]
    IdempotencyConflict(String),
    /// The advance would take this account (the customer, or @bank, which
    /// lends it) past the balance limit; nothing was written.
    #[error("the advance would take the balance of account {0} past the largest amount held")]
    BalanceLimit(AccountId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates the advance; returns its id and whether this was a replay.
/// On the account's shard, where the API draws the advance's id.
pub async fn create(
    conn: &mut impl Conn,
    keys: &Keys,
    advance: &NewAdvance,
) -> Result<(String, bool), AdvanceError> {
    let shard = keys.account_shard(&advance.account_id);
    let (idempotency_key, fingerprint) = match &advance.idempotency {
        Some(idem) => (
            keys.idempotency(shard, "advances", idem.key.as_str()),
            idem.fingerprint.as_str(),
        ),
        None => (keys.idempotency(shard, "advances", "-"), ""),
    };
    let reply: Vec<String> = CREATE_ADVANCE
        .key(keys.advance(&advance.id))
        .key(keys.account(&advance.account_id))
        .key(keys.system_account(SystemAccount::Bank, shard))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.installments_due(shard))
        .key(keys.advances(shard))
        .key(keys.account_advances(&advance.account_id))
        .key(keys.events(shard))
        .key(idempotency_key)
        .key(keys.account_entries(&advance.account_id))
        .arg(&advance.id)
        .arg(advance.account_id.as_str())
        .arg(advance.amount.cents())
        .arg(INSTALLMENTS)
        .arg(advance.period_ms)
        .arg(advance.now_ms)
        .arg(fingerprint)
        .arg(advance.idempotency_ttl_secs)
        .arg(SystemAccount::Bank.id().as_str())
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    let word = |i: usize| reply.get(i).cloned().unwrap_or_default();
    match (verdict(&reply), word(1).as_str()) {
        ("created", _) => Ok((word(1), false)),
        ("replayed", _) => Ok((word(1), true)),
        ("refused", "account_not_found") => Err(AdvanceError::AccountNotFound),
        ("refused", "idempotency_conflict") => Err(AdvanceError::IdempotencyConflict(word(2))),
        ("refused", "balance_limit") if reply.len() == 3 => {
            match super::balance_limit_account(reply.get(2)) {
                Some(account) => Err(AdvanceError::BalanceLimit(account)),
                None => Err(StoreError::UnexpectedReply(reply).into()),
            }
        }
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// The scheduler's step on one shard: lease what is due at `now_ms`,
/// re-lease what expired. Returns (leased, re-leased with a new job,
/// re-leased without one because the collectors had not read its job yet).
pub async fn lease_due(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    now_ms: i64,
    lease_ms: u64,
    limit: usize,
) -> StoreResult<(u64, u64, u64)> {
    let moved: (u64, u64, u64) = LEASE_DUE
        .key(keys.installments_due(shard))
        .key(keys.installments_leased(shard))
        .key(keys.installments(shard))
        .arg(now_ms)
        .arg(lease_ms)
        .arg(limit)
        .arg(COLLECT_GROUP)
        .invoke_async(conn)
        .await?;
    Ok(moved)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Collected {
    Paid(i64),
    /// Not covered: the amount moved to installment `carried_to`.
    Failed {
        amount: i64,
        carried_to: u32,
    },
    /// No lease: another delivery collected it.
    Skipped,
    /// The advance or the account lacks a field the collection needs;
    /// nothing was written.
    Malformed(String),
    /// Paying would take this account (the customer, or @bank) past the
    /// balance limit. Nothing was written: the lease and the job stay, and
    /// the installment is neither paid nor failed.
    BalanceLimit(AccountId),
}

#[expect(
    clippy::too_many_arguments,
    reason = "the script's arguments, each named where it is called"
)]
pub async fn collect(
    conn: &mut impl Conn,
    keys: &Keys,
    advance_id: &str,
    account: &AccountId,
    n: u32,
    stream_id: &str,
    worker: &str,
    installments_max: u32,
) -> StoreResult<Collected> {
    let shard = keys.account_shard(account);
    let reply: Vec<String> = COLLECT
        .key(keys.advance(advance_id))
        .key(keys.account(account))
        .key(keys.system_account(SystemAccount::Bank, shard))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.events(shard))
        .key(keys.installments_leased(shard))
        .key(keys.installments_due(shard))
        .key(keys.installments(shard))
        .key(keys.account_entries(account))
        .key(keys.advances_repaid(shard))
        .arg(format!("{advance_id}:{n}"))
        .arg(n)
        .arg(super::now_ms())
        .arg(COLLECT_GROUP)
        .arg(stream_id)
        .arg(SystemAccount::Bank.id().as_str())
        .arg(worker)
        .arg(installments_max)
        .invoke_async(conn)
        .await?;
    let number = |i: usize| reply.get(i).and_then(|word| word.parse::<i64>().ok());
    match verdict(&reply) {
        "paid" => number(1).map(Collected::Paid),
        "failed" => number(1)
            .zip(number(2))
            .map(|(amount, to)| Collected::Failed {
                amount,
                carried_to: to as u32,
            }),
        "skipped" => Some(Collected::Skipped),
        "malformed" => reply.get(1).cloned().map(Collected::Malformed),
        "balance_limit" if reply.len() == 2 => {
            super::balance_limit_account(reply.get(1)).map(Collected::BalanceLimit)
        }
        _ => None,
    }
    .ok_or_else(|| StoreError::UnexpectedReply(reply.clone()))
}

#[derive(Debug, Clone)]
pub struct Installment {
    pub n: u32,
    pub amount_cents: i64,
    pub due_ms: i64,
    /// `scheduled`, `processing` (leased to a worker), `paid` or `failed`.
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct Advance {
    pub id: String,
    pub account_id: AccountId,
    pub amount_cents: i64,
    pub created_at_ms: i64,
    pub installments: Vec<Installment>,
}

impl Advance {
    fn sum(&self, status: &str) -> i64 {
        self.installments
            .iter()
            .filter(|i| i.status == status)
            .map(|i| i.amount_cents)
            .sum()
    }

    pub fn paid_cents(&self) -> i64 {
        self.sum("paid")
    }

    pub fn scheduled_cents(&self) -> i64 {
        self.sum("scheduled")
    }

    pub fn processing_cents(&self) -> i64 {
        self.sum("processing")
    }

    /// Reconciliation: paid + scheduled + processing equals the amount.
    pub fn reconciles(&self) -> bool {
        self.paid_cents() + self.scheduled_cents() + self.processing_cents() == self.amount_cents
    }
}

/// Most installments an advance can grow to (12 plus one per failed last
/// one): the bound on `TALLY_INSTALLMENTS_MAX`, and on what one read returns.
pub const INSTALLMENTS_MAX: u32 = 1_000;

pub async fn get(conn: &mut impl Conn, keys: &Keys, id: &str) -> StoreResult<Option<Advance>> {
    let key = keys.advance(id);
    let leased_key = keys.installments_leased(keys.shard_of_text_id(id));
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let count = u32::try_from(record.integer("count")?)
        .unwrap_or(0)
        .min(INSTALLMENTS_MAX);
    let mut pipe = redis::pipe();
    for n in 1..=count {
        pipe.cmd("ZSCORE").arg(&leased_key).arg(format!("{id}:{n}"));
    }
    let leased: Vec<Option<String>> = pipe.query_async(conn).await?;
    let mut installments = Vec::with_capacity(count as usize);
    for (n, lease) in (1..=count).zip(leased) {
        let status = record.text(&format!("i{n}:status"))?;
        let status = if status == "scheduled" && lease.is_some() {
            "processing"
        } else {
            status
        };
        installments.push(Installment {
            n,
            amount_cents: record.integer(&format!("i{n}:amount"))?,
            due_ms: record.integer(&format!("i{n}:due"))?,
            status: status.to_owned(),
        });
    }
    Ok(Some(Advance {
        id: id.to_owned(),
        account_id: record.parsed("account_id", AccountId::parse)?,
        amount_cents: record.integer("amount")?,
        created_at_ms: record.integer("created_at")?,
        installments,
    }))
}

/// Installments of `advance` that are `scheduled` (not leased, since a
/// leased one reads `processing`) yet not in the due set either: nothing
/// would ever collect them. Only a script that failed part way could leave
/// one, so the audit looks for them.
pub async fn stranded(
    conn: &mut impl Conn,
    keys: &Keys,
    advance: &Advance,
) -> StoreResult<Vec<u32>> {
    let due_key = keys.installments_due(keys.shard_of_text_id(&advance.id));
    let scheduled: Vec<u32> = advance
        .installments
        .iter()
        .filter(|i| i.status == "scheduled")
        .map(|i| i.n)
        .collect();
    let mut pipe = redis::pipe();
    for n in &scheduled {
        pipe.cmd("ZSCORE")
            .arg(&due_key)
            .arg(format!("{}:{n}", advance.id));
    }
    let due: Vec<Option<String>> = if scheduled.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(conn).await?
    };
    Ok(scheduled
        .into_iter()
        .zip(due)
        .filter(|(_, due)| due.is_none())
        .map(|(n, _)| n)
        .collect())
}

/// A shard's advance ids, oldest first, a page at a time.
pub async fn ids_on(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    offset: usize,
    limit: usize,
) -> StoreResult<Vec<String>> {
    Ok(redis::cmd("ZRANGE")
        .arg(keys.advances(shard))
        .arg(offset)
        .arg(offset + limit - 1)
        .query_async(conn)
        .await?)
}

/// Advance ids, oldest first: one account's, or all of them (each shard's
/// first `offset + limit`, merged by creation time, then id).
pub async fn ids(
    conn: &mut impl Conn,
    keys: &Keys,
    account: Option<&AccountId>,
    offset: usize,
    limit: usize,
) -> StoreResult<Vec<String>> {
    if let Some(account) = account {
        return Ok(redis::cmd("ZRANGE")
            .arg(keys.account_advances(account))
            .arg(offset)
            .arg(offset + limit - 1)
            .query_async(conn)
            .await?);
    }
    let page = super::merged_page(conn, keys, Keys::advances, offset, limit).await?;
    Ok(page.into_iter().map(|(id, _)| id).collect())
}
