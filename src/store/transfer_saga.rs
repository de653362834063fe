//! The transfer saga: a transfer between customers on two shards, where one
//! script cannot write both (a cluster; CLUSTER.md, "Transfers between
//! shards", after TigerBeetle's pending, then post or void). Three steps, each
//! one script on one shard:
//!
//! 1. **Debit** (`debit_transfer.lua`, the payer's shard): check funds, debit
//!    the payer, credit `@transit` there, record the transfer `pending` with
//!    an intent. The only step that refuses for lack of funds.
//! 2. **Credit** (`credit_transfer.lua`, the payee's shard): decide once,
//!    `credited` (the payee credited from `@transit` there) or `refused` (the
//!    payee's balance would leave the exact range).
//! 3. **Finish** (`finish_transfer.lua`, the payer's shard): `completed`; or
//!    on `refused`, the void: the payer credited back from `@transit`, the
//!    reversal journaled, `failed`.
//!
//! The API runs all three and answers as a one-step transfer would. Between
//! steps the money sits in `@transit`, which the audit counts
//! ([`in_flight`]). A crash leaves the intent: a sweeper ([`sweep`]) takes it
//! past its takeover time and runs 2 and 3, each safe to run twice.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::order_saga::{TAKEOVER_AFTER_MS, claim_intents};
use super::slots::Shard;
use super::transfers::{Movement, MovementError, MovementOutcome, Refusal};
use super::{Conn, StoreError, StoreResult, verdict};
use crate::domain::{AccountId, SystemAccount};

static DEBIT_TRANSFER: LazyLock<Script> = lua_script!("debit_transfer.lua");
static CREDIT_TRANSFER: LazyLock<Script> = lua_script!("credit_transfer.lua");
static FINISH_TRANSFER: LazyLock<Script> = lua_script!("finish_transfer.lua");

pub fn scripts() -> [&'static Script; 3] {
    [&DEBIT_TRANSFER, &CREDIT_TRANSFER, &FINISH_TRANSFER]
}

/// How long a payee's decision is kept: far longer than any saga stays
/// unfinished while a sweeper runs (a second), so that no step runs twice
/// without finding it.
pub const CREDIT_DECISION_TTL_SECS: u64 = 7 * 24 * 3_600;

/// The oldest pending transfer whose credit step may still run: half the
/// decision's life. An older one with no decision on record is not credited
/// (a decision made earlier may have expired since: crediting again could
/// pay twice); it is logged for an operator, its money still in `@transit`.
pub const CREDIT_AGE_MAX_MS: i64 = (CREDIT_DECISION_TTL_SECS as i64) * 1_000 / 2;

/// Whether a movement between these accounts must be a saga: two customers
/// on two shards. (A movement with a system account happens on the
/// customer's shard, through the system account's sub-account there.)
pub fn crosses_shards(keys: &Keys, payer: &AccountId, payee: &AccountId) -> bool {
    matches!(
        (keys.shard_of_account(payer), keys.shard_of_account(payee)),
        (Some(a), Some(b)) if a != b
    )
}

/// Runs the whole saga for `movement` (two customers on two shards) and
/// answers as `transfers::move_money` answers a one-step transfer. A replay
/// of its Idempotency-Key whose saga a crash left unfinished is finished
/// first.
pub async fn move_money(
    conn: &mut impl Conn,
    keys: &Keys,
    movement: &Movement,
) -> Result<MovementOutcome, MovementError> {
    let payee_exists: bool = conn
        .exists(keys.account(&movement.payee))
        .await
        .map_err(StoreError::from)?;
    match debit(conn, keys, movement, payee_exists).await? {
        Debited::Pending => Ok(complete(conn, keys, &movement.id)
            .await?
            .unwrap_or(MovementOutcome::Success)),
        Debited::Ended(outcome) => Ok(outcome),
        Debited::Replayed(id) => {
            complete(conn, keys, &id).await?;
            Ok(MovementOutcome::Replayed(id))
        }
    }
}

/// What step 1 said.
#[derive(Debug, PartialEq, Eq)]
pub enum Debited {
    /// Debited: steps 2 and 3 are next.
    Pending,
    /// Refused (journaled, nothing moved), or a second run of a saga that ended.
    Ended(MovementOutcome),
    /// The Idempotency-Key's request: this transaction.
    Replayed(String),
}

/// Step 1, on the payer's shard (`payee_exists`: the API looked on the
/// payee's shard first).
pub async fn debit(
    conn: &mut impl Conn,
    keys: &Keys,
    movement: &Movement,
    payee_exists: bool,
) -> Result<Debited, MovementError> {
    let shard = keys.account_shard(&movement.payer);
    let (idempotency_key, fingerprint) = super::transfers::idempotency_of(keys, shard, movement);
    let reply: Vec<String> = DEBIT_TRANSFER
        .key(keys.account(&movement.payer))
        .key(keys.system_account(SystemAccount::Transit, shard))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.transaction(&movement.id))
        .key(idempotency_key)
        .key(keys.events(shard))
        .key(keys.transfer_intents(shard))
        .key(keys.account_entries(&movement.payer))
        .arg(movement.payer.as_str())
        .arg(movement.payee.as_str())
        .arg(movement.amount.cents())
        .arg(movement.kind)
        .arg(&movement.id)
        .arg(movement.at_ms)
        .arg(super::flag(payee_exists))
        .arg(&movement.canonical_request)
        .arg(fingerprint)
        .arg(movement.idempotency_ttl_secs)
        .arg(&movement.memo)
        .arg(movement.at_ms + TAKEOVER_AFTER_MS)
        .arg(SystemAccount::Transit.id().as_str())
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    let word = |i: usize| reply.get(i).cloned().unwrap_or_default();
    match verdict(&reply) {
        "pending" => Ok(Debited::Pending),
        "success" => Ok(Debited::Ended(MovementOutcome::Success)),
        "fail" if reply.len() == 4 => match Refusal::parse(&word(3)) {
            Some(refusal) => Ok(Debited::Ended(MovementOutcome::Fail {
                refusal,
                reason: word(2),
            })),
            None => Err(StoreError::UnexpectedReply(reply).into()),
        },
        "replayed" => Ok(Debited::Replayed(word(1))),
        "refused" => Err(MovementError::IdempotencyConflict(word(2))),
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// A pending transfer as its record keeps it.
struct Pending {
    payer: AccountId,
    payee: AccountId,
    amount_cents: i64,
    kind: String,
    memo: String,
    /// When it was debited, ms.
    at_ms: i64,
}

/// The pending transfer `id`, or None once it ended (or if there is none).
async fn read_pending(conn: &mut impl Conn, keys: &Keys, id: &str) -> StoreResult<Option<Pending>> {
    let key = keys.transaction(id);
    let fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&key)
        .arg(&["status", "payer", "payee", "amount", "kind", "memo", "at"])
        .query_async(conn)
        .await?;
    if fields.first().and_then(Option::as_deref) != Some("pending") {
        return Ok(None);
    }
    let corrupt = |problem: String| StoreError::Corrupt {
        key: key.clone(),
        problem,
    };
    let field = |at: usize, name: &str| {
        fields
            .get(at)
            .cloned()
            .flatten()
            .ok_or_else(|| corrupt(format!("a pending transfer without `{name}`")))
    };
    let account = |text: String| AccountId::parse(&text).map_err(|err| corrupt(err.to_string()));
    Ok(Some(Pending {
        payer: account(field(1, "payer")?)?,
        payee: account(field(2, "payee")?)?,
        amount_cents: field(3, "amount")?
            .parse()
            .map_err(|_| corrupt("amount is not an integer".to_owned()))?,
        kind: field(4, "kind")?,
        memo: field(5, "memo").unwrap_or_default(),
        at_ms: field(6, "at")?
            .parse()
            .map_err(|_| corrupt("at is not an integer".to_owned()))?,
    }))
}

/// The payee shard's decision on a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Credited,
    /// With the refusal's code (`balance_limit`, `account_not_found`).
    Refused(String),
}

/// Steps 2 and 3 for the pending transfer `id`: its outcome, or None when it
/// was not pending (ended already, or unknown).
pub async fn complete(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
) -> StoreResult<Option<MovementOutcome>> {
    let Some(pending) = read_pending(conn, keys, id).await? else {
        return Ok(None);
    };
    let decision = credit_pending(conn, keys, id, &pending).await?;
    finish(conn, keys, id, &pending, &decision).await
}

/// Step 2 alone, on the payee's shard: None when `id` is not pending.
pub async fn credit(conn: &mut impl Conn, keys: &Keys, id: &str) -> StoreResult<Option<Decision>> {
    match read_pending(conn, keys, id).await? {
        Some(pending) => Ok(Some(credit_pending(conn, keys, id, &pending).await?)),
        None => Ok(None),
    }
}

async fn credit_pending(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
    pending: &Pending,
) -> StoreResult<Decision> {
    if super::now_ms() - pending.at_ms > CREDIT_AGE_MAX_MS {
        let decided: bool = conn
            .exists(keys.transfer_credit(&pending.payee, id))
            .await?;
        if !decided {
            tracing::error!(
                transaction_id = id,
                "a transfer between shards has been pending for longer than its credit step may run: an operator must look"
            );
            return Err(StoreError::Corrupt {
                key: keys.transaction(id),
                problem: "pending past the age its credit step may run at".to_owned(),
            });
        }
    }
    let payee_shard = keys.account_shard(&pending.payee);
    let decision: Vec<String> = CREDIT_TRANSFER
        .key(keys.account(&pending.payee))
        .key(keys.system_account(SystemAccount::Transit, payee_shard))
        .key(keys.journal(payee_shard))
        .key(keys.journal_index(payee_shard))
        .key(keys.transfer_credit(&pending.payee, id))
        .key(keys.account_entries(&pending.payee))
        .arg(pending.payer.as_str())
        .arg(pending.payee.as_str())
        .arg(pending.amount_cents)
        .arg(&pending.kind)
        .arg(id)
        .arg(super::now_ms())
        .arg(&pending.memo)
        .arg(CREDIT_DECISION_TTL_SECS)
        .arg(SystemAccount::Transit.id().as_str())
        .invoke_async(conn)
        .await?;
    match decision.as_slice() {
        [credited] if credited == "credited" => Ok(Decision::Credited),
        [refused, code] if refused == "refused" => Ok(Decision::Refused(code.clone())),
        _ => Err(StoreError::UnexpectedReply(decision)),
    }
}

/// Step 3, on the payer's shard.
async fn finish(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
    pending: &Pending,
    decision: &Decision,
) -> StoreResult<Option<MovementOutcome>> {
    let (decided, code) = match decision {
        Decision::Credited => ("credited", ""),
        Decision::Refused(code) => ("refused", code.as_str()),
    };
    let payer_shard = keys.account_shard(&pending.payer);
    let finished: Vec<String> = FINISH_TRANSFER
        .key(keys.account(&pending.payer))
        .key(keys.system_account(SystemAccount::Transit, payer_shard))
        .key(keys.journal(payer_shard))
        .key(keys.journal_index(payer_shard))
        .key(keys.transaction(id))
        .key(keys.events(payer_shard))
        .key(keys.transfer_intents(payer_shard))
        .key(keys.account_entries(&pending.payer))
        .arg(id)
        .arg(decided)
        .arg(code)
        .arg(super::now_ms())
        .arg(SystemAccount::Transit.id().as_str())
        .invoke_async(conn)
        .await?;
    match verdict(&finished) {
        "success" => Ok(Some(MovementOutcome::Success)),
        "fail" if finished.len() == 3 => match Refusal::parse(&finished[2]) {
            Some(refusal) => Ok(Some(MovementOutcome::Fail {
                refusal,
                reason: finished[1].clone(),
            })),
            None => Err(StoreError::UnexpectedReply(finished)),
        },
        "missing" => Ok(None),
        _ => Err(StoreError::UnexpectedReply(finished)),
    }
}

/// A sweeper's round on one shard at `now_ms`: takes the transfer intents
/// past their takeover time (at most `order_saga::SWEEP_BATCH_MAX`) and finishes their
/// sagas. Returns how many it finished.
pub async fn sweep(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    now_ms: i64,
) -> StoreResult<usize> {
    let taken = claim_intents(conn, &keys.transfer_intents(shard), now_ms).await?;
    let mut finished = 0;
    for id in taken {
        match complete(conn, keys, &id).await {
            Ok(Some(_)) => finished += 1,
            Ok(None) => {
                // Ended already (a lost reply): its intent goes now.
                let _: () = conn.zrem(keys.transfer_intents(shard), &id).await?;
                finished += 1;
            }
            // One that cannot finish holds up none of the others.
            Err(StoreError::Corrupt { key, problem }) => {
                tracing::error!(%key, %problem, "a transfer saga cannot finish");
            }
            Err(err) => return Err(err),
        }
    }
    Ok(finished)
}

/// Transfers of a shard debited and not (yet) credited to their payee, and
/// their value in cents: what `@transit` holds (the audit). A transfer the
/// payee took, not yet finished, is on both shards' `@transit` and sums to
/// zero; one the payee refused is still there until its void.
pub async fn in_flight(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    page_size: usize,
) -> StoreResult<(usize, i64)> {
    let (mut count, mut value) = (0, 0);
    let mut offset = 0;
    loop {
        let last = offset + page_size as isize - 1;
        let ids: Vec<String> = conn
            .zrange(keys.transfer_intents(shard), offset, last)
            .await?;
        if ids.is_empty() {
            break;
        }
        offset += ids.len() as isize;
        for id in ids {
            let Some(pending) = read_pending(conn, keys, &id).await? else {
                continue;
            };
            let decision: Option<String> =
                conn.get(keys.transfer_credit(&pending.payee, &id)).await?;
            if decision.as_deref() != Some("credited") {
                count += 1;
                value += pending.amount_cents;
            }
        }
    }
    Ok((count, value))
}
