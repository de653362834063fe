//! What operators do to work that failed, whether from the console or the
//! API: retry or refund a failed batch. Each action's money effect is
//! computed here, by the server, before it is confirmed and after it is
//! done, and every action is recorded in the operator log (who, what, when,
//! the money effect).
//!
//! The log is written once the action succeeded, as its own command: a
//! process that dies in between leaves the action done (and journaled, when
//! it moved money) without its log line.

use std::collections::BTreeSet;

use crate::access::Caller;
use crate::domain::{BatchId, format_units};
use crate::store::console::{OperatorAction, record_operator_action};
use crate::store::orders::{Batch, SettlementStatus, get_batch};
use crate::store::settlement::{self, OperatorError, batch_shard};
use crate::store::{Store, StoreError, StoreResult};

/// The most orders of one batch whose customers the refund's effect names
/// one by one (it counts them all).
pub const EFFECT_ORDERS_READ_MAX: usize = 10_000;

/// Where an action came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Console,
    Api,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Console => "console",
            Via::Api => "api",
        }
    }
}

/// What refunding a batch would move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundEffect {
    pub orders: usize,
    /// Distinct customers credited.
    pub accounts: usize,
    pub cents: i64,
}

impl RefundEffect {
    pub fn describe(&self) -> String {
        let value = format_units(self.cents, 2);
        format!(
            "credits {} account{} {value} in all ({} order{}), debits @exchange {value}",
            self.accounts,
            plural(self.accounts),
            self.orders,
            plural(self.orders),
        )
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}

/// What retrying `batch` does: no money moves until the exchange fills it.
pub fn retry_effect(batch: &Batch) -> String {
    format!(
        "asks the exchange again for {} {} ({}); moves no money until it fills, then pays @exchange {} out",
        batch.quantity, batch.symbol, batch.value, batch.value
    )
}

/// What refunding `batch` would move, from its orders as they are now.
pub async fn refund_effect(store: &Store, batch: &Batch) -> StoreResult<RefundEffect> {
    let mut conn = store.conn().await?;
    let keys = store.keys();
    let ids = &batch.order_ids[..batch.order_ids.len().min(EFFECT_ORDERS_READ_MAX)];
    let mut accounts: BTreeSet<String> = BTreeSet::new();
    let mut cents = 0i64;
    for chunk in ids.chunks(crate::audit::AUDIT_PAGE_SIZE) {
        // One pipeline per chunk: the orders may live on several shards, so
        // on a cluster each order is its own request in it.
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET")
                .arg(keys.order(id))
                .arg("account_id")
                .arg("cost");
        }
        let rows: Vec<(Option<String>, Option<i64>)> = pipe.query_async(&mut conn).await?;
        for (id, (account, cost)) in chunk.iter().zip(rows) {
            let (Some(account), Some(cost)) = (account, cost) else {
                return Err(StoreError::Corrupt {
                    key: keys.order(id),
                    problem: "the order of a batch is missing its account or cost".to_owned(),
                });
            };
            accounts.insert(account);
            cents += cost;
        }
    }
    Ok(RefundEffect {
        orders: batch.order_ids.len(),
        accounts: accounts.len(),
        cents,
    })
}

/// A batch as operators see it, `None` when there is none.
pub async fn batch(store: &Store, id: &BatchId) -> StoreResult<Option<Batch>> {
    let mut conn = store.conn().await?;
    get_batch(&mut conn, store.keys(), id).await
}

/// Sends a failed batch back to the exchange; returns what it does.
pub async fn retry_batch(
    store: &Store,
    caller: &Caller,
    id: &BatchId,
    via: Via,
) -> Result<String, OperatorError> {
    let batch = batch(store, id)
        .await?
        .ok_or_else(|| OperatorError::NotFailed(*id, "missing".to_owned()))?;
    let mut conn = store.conn().await?;
    settlement::requeue_failed_batch(&mut conn, store.keys(), id).await?;
    let effect = retry_effect(&batch);
    record(store, caller, "retry", id, &effect, "", via).await;
    tracing::info!(batch_id = %id, key_id = %caller.key_id, via = via.as_str(), "failed batch requeued by operator");
    Ok(effect)
}

/// Gives every customer of a failed batch their money back; returns what
/// it moved.
pub async fn refund_batch(
    store: &Store,
    caller: &Caller,
    id: &BatchId,
    note: &str,
    confirmed_unfilled: bool,
    via: Via,
) -> Result<RefundEffect, OperatorError> {
    let batch = batch(store, id)
        .await?
        .ok_or_else(|| OperatorError::NotFailed(*id, "missing".to_owned()))?;
    // Only a failed batch's orders are read for the effect; the script
    // decides the rest (a refund run again answers as it did the first time).
    let accounts = match batch.status {
        SettlementStatus::Failed => refund_effect(store, &batch).await?.accounts,
        _ => 0,
    };
    let mut conn = store.conn().await?;
    let (orders, cents) = settlement::refund_batch(
        &mut conn,
        store.keys(),
        id,
        note,
        confirmed_unfilled,
        store.sagas(),
    )
    .await?;
    let done = RefundEffect {
        orders,
        accounts,
        cents,
    };
    record(store, caller, "refund", id, &done.describe(), note, via).await;
    tracing::info!(batch_id = %id, orders, cents, key_id = %caller.key_id, via = via.as_str(), "failed batch refunded by operator");
    Ok(done)
}

/// Records an action in the log of the batch's shard. A log Redis refused
/// is reported, not raised: the action is done.
async fn record(
    store: &Store,
    caller: &Caller,
    action: &str,
    id: &BatchId,
    effect: &str,
    note: &str,
    via: Via,
) {
    let entry = OperatorAction {
        key_id: caller.key_id.to_string(),
        role: caller.role.as_str().to_owned(),
        action: action.to_owned(),
        target: id.to_string(),
        effect: effect.to_owned(),
        note: note.to_owned(),
        via: via.as_str().to_owned(),
    };
    let shard = batch_shard(store.keys(), id);
    let recorded = async {
        let mut conn = store.conn().await?;
        record_operator_action(&mut conn, store.keys(), shard, &entry).await
    };
    if let Err(err) = recorded.await {
        tracing::error!(error = %err, batch_id = %id, action, "the operator log did not take an action that was done");
    }
}

/// Records a sign-in to the console, on the shard of the key's records.
pub async fn record_sign_in(store: &Store, caller: &Caller) {
    let entry = OperatorAction {
        key_id: caller.key_id.to_string(),
        role: caller.role.as_str().to_owned(),
        action: "sign-in".to_owned(),
        target: String::new(),
        effect: "none".to_owned(),
        note: String::new(),
        via: Via::Console.as_str().to_owned(),
    };
    let shard = store.keys().api_key_shard(&caller.key_id);
    let recorded = async {
        let mut conn = store.conn().await?;
        record_operator_action(&mut conn, store.keys(), shard, &entry).await
    };
    if let Err(err) = recorded.await {
        tracing::warn!(error = %err, "the operator log did not take a sign-in");
    }
}

/// Replays or discards a dead letter of `stream` (named `ms-seq.shard`),
/// and records it with the operator's reason.
#[allow(clippy::too_many_arguments)]
pub async fn resolve_dead_letter(
    store: &Store,
    caller: &Caller,
    stream: crate::store::keys::StreamKind,
    letter: &str,
    resolution: crate::store::dead_letters::Resolution,
    reason: &str,
    via: Via,
) -> Result<String, crate::store::dead_letters::ResolveError> {
    use crate::store::dead_letters::{self, Resolution, ResolveError};
    let (id, shard) =
        dead_letters::parse_cursor(letter, store.keys()).ok_or(ResolveError::Missing)?;
    let mut conn = store.conn().await?;
    let replayed =
        dead_letters::resolve(&mut conn, store.keys(), stream, shard, id, resolution).await?;
    let effect = match (resolution, replayed) {
        (Resolution::Replay, Some(new_id)) => format!(
            "moves no money; the job is back on the {} stream as {new_id}.{}",
            stream.label(),
            shard.index()
        ),
        _ => "moves no money; the dead letter is gone".to_owned(),
    };
    let entry = OperatorAction {
        key_id: caller.key_id.to_string(),
        role: caller.role.as_str().to_owned(),
        action: format!("{} {}", resolution.as_str(), stream.label()),
        target: letter.to_owned(),
        effect: effect.clone(),
        note: reason.to_owned(),
        via: via.as_str().to_owned(),
    };
    if let Err(err) = record_operator_action(&mut conn, store.keys(), shard, &entry).await {
        tracing::error!(error = %err, letter, "the operator log did not take an action that was done");
    }
    tracing::info!(letter, stream = stream.label(), action = resolution.as_str(), key_id = %caller.key_id, "dead letter resolved by operator");
    Ok(effect)
}
