//! The refund saga: an operator's refund of a failed batch whose orders'
//! customers live on other shards than the batch, where one script cannot
//! reach them all (a cluster; CLUSTER.md: the order saga in reverse). Three
//! steps, each one script on one shard:
//!
//! 1. **Begin** (`begin_refund.lua`, the batch's home shard): the failed
//!    batch becomes `refunding`, with an intent. The only step that refuses.
//! 2. **Refund the orders** (`refund_orders.lua`, once per customer shard):
//!    each order's cost back to its customer from `@exchange`'s sub-account
//!    there, the order marked, so a second run refunds it no more.
//! 3. **Finish** (`finish_refund.lua`, the home shard): `refunded`, the event.
//!
//! The operator's call runs all three and answers as a one-step refund. A
//! crash leaves the intent: a sweeper ([`sweep`]) runs 2 and 3 again. While
//! a batch is `refunding`, the audit counts its orders not yet refunded as
//! still owed by `@exchange` ([`still_owed`]).

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::order_saga::{TAKEOVER_AFTER_MS, claim_intents};
use super::settlement::{OperatorError, batch_shard, operator_refusal};
use super::slots::Shard;
use super::{Conn, StoreError, StoreResult, verdict};
use crate::domain::{AccountId, BatchId, OrderId, SystemAccount};

static BEGIN_REFUND: LazyLock<Script> = lua_script!("begin_refund.lua");
static REFUND_ORDERS: LazyLock<Script> = lua_script!("refund_orders.lua");
static FINISH_REFUND: LazyLock<Script> = lua_script!("finish_refund.lua");

pub fn scripts() -> [&'static Script; 3] {
    [&BEGIN_REFUND, &REFUND_ORDERS, &FINISH_REFUND]
}

/// Most orders one `refund_orders.lua` call refunds.
pub const REFUND_GROUP_MAX: usize = 256;

/// Refunds the failed batch `batch_id` through the saga and answers as
/// `settlement::refund_batch` does: the orders refunded and their value.
pub async fn refund_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    note: &str,
    confirmed_unfilled: bool,
    now_ms: i64,
) -> Result<(usize, i64), OperatorError> {
    begin(conn, keys, batch_id, note, confirmed_unfilled, now_ms).await?;
    complete(conn, keys, batch_id).await
}

/// Step 1: the batch becomes `refunding` (or is found refunding or refunded
/// already), or the refusal.
pub async fn begin(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    note: &str,
    confirmed_unfilled: bool,
    now_ms: i64,
) -> Result<(), OperatorError> {
    let shard = batch_shard(keys, batch_id);
    let reply: Vec<String> = BEGIN_REFUND
        .key(keys.batch(batch_id))
        .key(keys.failed_batches(shard))
        .key(keys.refund_intents(shard))
        .arg(batch_id.to_string())
        .arg(now_ms)
        .arg(note)
        .arg(super::flag(confirmed_unfilled))
        .arg(now_ms + TAKEOVER_AFTER_MS)
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match verdict(&reply) {
        "refunding" | "refunded" => Ok(()),
        _ => Err(operator_refusal(&reply, batch_id)),
    }
}

/// Steps 2 and 3 for a batch being refunded (or refunded already: then its
/// figures, with nothing written). A batch in any other state is refused
/// before anything is written: only a begun refund pays anyone back.
pub async fn complete(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
) -> Result<(usize, i64), OperatorError> {
    let status: Option<String> = conn
        .hget(keys.batch(batch_id), "status")
        .await
        .map_err(StoreError::from)?;
    match status.as_deref() {
        // Its refund began, and no step after this reading changes that but
        // the last, which leaves every order marked.
        Some("refunding") => {}
        Some("refunded") => return finish(conn, keys, batch_id).await,
        other => {
            return Err(OperatorError::NotFailed(
                *batch_id,
                other.unwrap_or("missing").to_owned(),
            ));
        }
    }
    let orders = batch_orders(conn, keys, batch_id).await?;
    let mut shards: Vec<Shard> = orders
        .iter()
        .map(|(_, account)| keys.account_shard(account))
        .collect();
    shards.sort_unstable();
    shards.dedup();
    for shard in shards {
        refund_customers_on(conn, keys, batch_id, shard, &orders).await?;
    }
    finish(conn, keys, batch_id).await
}

/// Step 3: the batch refunded (once), and its figures.
async fn finish(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
) -> Result<(usize, i64), OperatorError> {
    let shard = batch_shard(keys, batch_id);
    let reply: Vec<String> = FINISH_REFUND
        .key(keys.batch(batch_id))
        .key(keys.events(shard))
        .key(keys.refund_intents(shard))
        .arg(batch_id.to_string())
        .arg(super::now_ms())
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match verdict(&reply) {
        "refunded" => {
            let count = reply.get(1).and_then(|count| count.parse().ok());
            let value = reply.get(2).and_then(|value| value.parse().ok());
            count
                .zip(value)
                .ok_or_else(|| StoreError::UnexpectedReply(reply.clone()).into())
        }
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// Step 2 on one customer shard: that shard's orders of the batch (among
/// `orders`), in calls of at most [`REFUND_GROUP_MAX`].
pub async fn refund_customers_on(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    shard: Shard,
    orders: &[(OrderId, AccountId)],
) -> Result<(), OperatorError> {
    let here: Vec<&(OrderId, AccountId)> = orders
        .iter()
        .filter(|(_, account)| keys.account_shard(account) == shard)
        .collect();
    for group in here.chunks(REFUND_GROUP_MAX) {
        let mut invocation = REFUND_ORDERS.prepare_invoke();
        invocation
            .key(keys.system_account(SystemAccount::Exchange, shard))
            .key(keys.journal(shard))
            .key(keys.journal_index(shard))
            .arg(batch_id.to_string())
            .arg(super::now_ms())
            .arg(SystemAccount::Exchange.id().as_str());
        for (order, account) in group {
            invocation
                .key(keys.order(order))
                .key(keys.account(account))
                .key(keys.account_entries(account))
                .arg(order.to_string())
                .arg(account.as_str());
        }
        let reply: Vec<String> = invocation
            .invoke_async(conn)
            .await
            .map_err(StoreError::from)?;
        if verdict(&reply) != "refunded" {
            return Err(operator_refusal(&reply, batch_id));
        }
    }
    Ok(())
}

/// A batch's orders with their customers.
pub async fn batch_orders(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
) -> StoreResult<Vec<(OrderId, AccountId)>> {
    let ids: Vec<String> = conn.lrange(keys.batch_orders(batch_id), 0, -1).await?;
    let mut orders = Vec::with_capacity(ids.len());
    for id in ids {
        let corrupt = |problem: String| StoreError::Corrupt {
            key: keys.batch_orders(batch_id),
            problem,
        };
        let order = OrderId::parse(&id).map_err(|err| corrupt(err.to_string()))?;
        let account: Option<String> = conn.hget(keys.order(&order), "account_id").await?;
        let account = account.ok_or_else(|| corrupt(format!("order {order} is missing")))?;
        let account = AccountId::parse(&account).map_err(|err| corrupt(err.to_string()))?;
        orders.push((order, account));
    }
    Ok(orders)
}

/// A sweeper's round on one shard at `now_ms`: takes the refunds past their
/// takeover time and finishes them. Returns how many it finished; a refund
/// that cannot finish (an account at the balance limit) is logged and left
/// for the next round.
pub async fn sweep(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    now_ms: i64,
) -> StoreResult<usize> {
    let taken = claim_intents(conn, &keys.refund_intents(shard), now_ms).await?;
    let mut finished = 0;
    for id in taken {
        let batch_id = BatchId::parse(&id).map_err(|err| StoreError::Corrupt {
            key: keys.refund_intents(shard),
            problem: err.to_string(),
        })?;
        match complete(conn, keys, &batch_id).await {
            Ok(_) => finished += 1,
            Err(OperatorError::Store(err)) => return Err(err),
            Err(refused) => {
                tracing::error!(%batch_id, error = %refused, "a refund cannot finish: an operator must look")
            }
        }
    }
    Ok(finished)
}

/// What `@exchange` still owes the customers of a batch being refunded: the
/// cost of its orders not yet refunded (the audit).
pub async fn still_owed(conn: &mut impl Conn, keys: &Keys, batch_id: &BatchId) -> StoreResult<i64> {
    let mut owed = 0;
    for (order, _) in batch_orders(conn, keys, batch_id).await? {
        let (cost, refunded_in): (Option<i64>, Option<String>) = redis::cmd("HMGET")
            .arg(keys.order(&order))
            .arg("cost")
            .arg("refunded_in")
            .query_async(conn)
            .await?;
        if refunded_in.as_deref() != Some(batch_id.to_string().as_str()) {
            owed += cost.unwrap_or(0);
        }
    }
    Ok(owed)
}
