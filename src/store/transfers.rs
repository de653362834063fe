//! Transfers between accounts and bank transactions: `transfer.lua`.

use std::sync::LazyLock;

use redis::Script;

use super::keys::Keys;
use super::slots::Shard;
use super::{Conn, Record, StoreError, StoreResult, flag, verdict};
use crate::domain::{AccountId, Amount, Idempotency};

static TRANSFER: LazyLock<Script> = lua_script!("transfer.lua");

pub fn scripts() -> [&'static Script; 1] {
    [&TRANSFER]
}

/// One movement of money from `payer` to `payee`, prepared by the API.
#[derive(Debug, Clone)]
pub struct Movement {
    pub id: String,
    /// `transfer` or `bank_transaction`: the journal entry's kind.
    pub kind: &'static str,
    pub payer: AccountId,
    pub payee: AccountId,
    pub amount: Amount,
    /// The request in canonical form, kept with the transaction for inspection.
    pub canonical_request: String,
    pub memo: String,
    pub at_ms: i64,
    pub idempotency: Option<Idempotency>,
    pub idempotency_ttl_secs: u64,
}

/// Why a movement was refused: the script's code, kept with the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    AccountNotFound,
    InsufficientFunds,
    /// The move would take the payer or the payee past the balance limit
    /// (the reason names which).
    BalanceLimit,
}

impl Refusal {
    pub(crate) fn parse(code: &str) -> Option<Self> {
        match code {
            "account_not_found" => Some(Self::AccountNotFound),
            "insufficient_funds" => Some(Self::InsufficientFunds),
            "balance_limit" => Some(Self::BalanceLimit),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum MovementOutcome {
    Success,
    /// Refused and journaled with this reason; no balance moved.
    Fail {
        refusal: Refusal,
        reason: String,
    },
    /// The Idempotency-Key was seen before with the same request.
    Replayed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MovementError {
    #[error("the Idempotency-Key was used for another request (transaction {0})")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a movement is recorded (its transaction, journal entry, event and
/// idempotency record): the paying customer's shard, or for money paid by a
/// system account, the receiving customer's. A system account takes part
/// through its sub-account there. The API draws the movement's id there.
pub fn movement_shard(keys: &Keys, payer: &AccountId, payee: &AccountId) -> Shard {
    keys.shard_of_account(payer)
        .or_else(|| keys.shard_of_account(payee))
        .unwrap_or(keys.layout().first())
}

/// A movement's Idempotency-Key record on `shard` and its fingerprint (a
/// placeholder key and "" when it has none).
pub(crate) fn idempotency_of<'a>(
    keys: &Keys,
    shard: Shard,
    movement: &'a Movement,
) -> (String, &'a str) {
    match &movement.idempotency {
        Some(idem) => (
            keys.idempotency(shard, movement.kind, idem.key.as_str()),
            idem.fingerprint.as_str(),
        ),
        None => (keys.idempotency(shard, movement.kind, "-"), ""),
    }
}

pub async fn move_money(
    conn: &mut impl Conn,
    keys: &Keys,
    movement: &Movement,
) -> Result<MovementOutcome, MovementError> {
    let shard = movement_shard(keys, &movement.payer, &movement.payee);
    let (idempotency_key, fingerprint) = idempotency_of(keys, shard, movement);
    let mut invocation = TRANSFER.prepare_invoke();
    invocation
        .key(keys.account_on(shard, &movement.payer))
        .key(keys.account_on(shard, &movement.payee))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.transaction(&movement.id))
        .key(idempotency_key)
        .key(keys.events(shard))
        .arg(movement.payer.as_str())
        .arg(movement.payee.as_str())
        .arg(movement.amount.cents())
        .arg(movement.kind)
        .arg(&movement.id)
        .arg(movement.at_ms)
        .arg(flag(movement.payer.is_system()))
        .arg(&movement.canonical_request)
        .arg(fingerprint)
        .arg(movement.idempotency_ttl_secs)
        .arg(&movement.memo)
        .arg(flag(!movement.payer.is_system()))
        .arg(flag(!movement.payee.is_system()));
    for party in [&movement.payer, &movement.payee] {
        if !party.is_system() {
            invocation.key(keys.account_entries(party));
        }
    }
    let reply: Vec<String> = invocation
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    let word = |i: usize| reply.get(i).cloned().unwrap_or_default();
    match verdict(&reply) {
        "success" => Ok(MovementOutcome::Success),
        "fail" if reply.len() == 4 => match Refusal::parse(&word(3)) {
            Some(refusal) => Ok(MovementOutcome::Fail {
                refusal,
                reason: word(2),
            }),
            None => Err(StoreError::UnexpectedReply(reply).into()),
        },
        "replayed" => Ok(MovementOutcome::Replayed(word(1))),
        "refused" => Err(MovementError::IdempotencyConflict(word(2))),
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// A transaction as kept for replays: when, and how it ended.
pub struct StoredMovement {
    pub id: String,
    pub at_ms: i64,
    pub failure: Option<String>,
    /// Why it failed; `None` when it succeeded, or for a failure kept
    /// before the scripts kept the code with it.
    pub refusal: Option<Refusal>,
}

pub async fn stored_movement(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
) -> StoreResult<Option<StoredMovement>> {
    let key = keys.transaction(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let refusal = record
        .optional_text("code")
        .map(|code| {
            Refusal::parse(code).ok_or_else(|| record.corrupt(format!("unknown code `{code}`")))
        })
        .transpose()?;
    Ok(Some(StoredMovement {
        id: record.text("id")?.to_owned(),
        at_ms: record.integer("at")?,
        failure: (record.text("status")? == "failed")
            .then(|| record.optional_text("reason").unwrap_or("").to_owned()),
        refusal,
    }))
}
