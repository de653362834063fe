//! What retention reads and removes in Redis (src/retention.rs does the
//! archiving around it): finished batches, wallet transactions and advances
//! past the window, and the scripts that retire them once the archive has
//! them.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;

use super::keys::Keys;
use super::slots::Shard;
use super::{Conn, StoreError, StoreResult};
use crate::domain::{AccountId, BatchId, OrderId, Symbol};

static RETIRE_ORDERS: LazyLock<Script> = lua_script!("retire_orders.lua");
static RETIRE_BATCHES: LazyLock<Script> = lua_script!("retire_batches.lua");
static RETIRE_RECORDS: LazyLock<Script> = lua_script!("retire_records.lua");
static TRIM_ARCHIVED_STREAM: LazyLock<Script> = lua_script!("trim_archived_stream.lua");

pub fn scripts() -> [&'static Script; 4] {
    [
        &RETIRE_ORDERS,
        &RETIRE_BATCHES,
        &RETIRE_RECORDS,
        &TRIM_ARCHIVED_STREAM,
    ]
}

/// What a retiring script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    Records(usize),
    /// The archive lock ran out: nothing was written.
    LostLock,
    /// The records are not the ones the caller archived: nothing was written.
    Stale,
}

fn retired(reply: i64) -> Retired {
    match reply {
        -2 => Retired::LostLock,
        -3 => Retired::Stale,
        count => Retired::Records(usize::try_from(count).unwrap_or(0)),
    }
}

/// The archive files' committed lengths of a shard, for `days`.
pub async fn committed(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    days: &[&String],
) -> StoreResult<Vec<Option<u64>>> {
    if days.is_empty() {
        return Ok(Vec::new());
    }
    Ok(redis::cmd("HMGET")
        .arg(keys.archive_committed(shard))
        .arg(days)
        .query_async(conn)
        .await?)
}

/// What left Redis and is still counted by the audit: `batches_value`, the
/// value of the batches retired, in cents.
pub async fn carried(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
) -> StoreResult<HashMap<String, i64>> {
    Ok(redis::cmd("HGETALL")
        .arg(keys.archive_carried(shard))
        .query_async(conn)
        .await?)
}

/// A batch the window has passed, as Redis holds it, with its orders.
#[derive(Debug, Clone)]
pub struct FinishedBatch {
    pub id: BatchId,
    pub fields: HashMap<String, String>,
    pub order_ids: Vec<String>,
    /// The orders still in Redis: (id, its fields).
    pub orders: Vec<(OrderId, HashMap<String, String>)>,
}

/// Up to `limit` of a home shard's batches created before `cutoff_ms`,
/// oldest first, that were settled or refunded before it, with their
/// orders. Batches still in flight are passed over (at most `scan_max` are
/// looked at).
pub async fn finished_batches(
    conn: &mut impl Conn,
    keys: &Keys,
    home: Shard,
    cutoff_ms: i64,
    limit: usize,
    scan_max: usize,
) -> StoreResult<Vec<FinishedBatch>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.batches(home))
        .arg("-inf")
        .arg(format!("({cutoff_ms}"))
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(scan_max)
        .query_async(conn)
        .await?;
    let corrupt = |problem: String| StoreError::Corrupt {
        key: keys.batches(home),
        problem,
    };
    let ids = ids
        .iter()
        .map(|id| BatchId::parse(id).map_err(|err| corrupt(err.to_string())))
        .collect::<StoreResult<Vec<_>>>()?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HGETALL").arg(keys.batch(id));
    }
    let all: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
    let mut finished = Vec::new();
    for (id, fields) in ids.into_iter().zip(all) {
        let at = match fields.get("status").map(String::as_str) {
            Some("settled") => fields.get("settled_at"),
            Some("refunded") => fields.get("refunded_at"),
            _ => None,
        };
        if at
            .and_then(|at| at.parse::<i64>().ok())
            .is_none_or(|at| at >= cutoff_ms)
        {
            continue;
        }
        let order_ids: Vec<String> = redis::cmd("LRANGE")
            .arg(keys.batch_orders(&id))
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        let parsed = order_ids
            .iter()
            .map(|order| OrderId::parse(order).map_err(|err| corrupt(err.to_string())))
            .collect::<StoreResult<Vec<_>>>()?;
        let mut pipe = redis::pipe();
        for order in &parsed {
            pipe.cmd("HGETALL").arg(keys.order(order));
        }
        // Orders an interrupted round retired already are left out.
        let orders: Vec<HashMap<String, String>> = if parsed.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(conn).await?
        };
        finished.push(FinishedBatch {
            id,
            fields,
            order_ids,
            orders: parsed
                .into_iter()
                .zip(orders)
                .filter(|(_, fields)| !fields.is_empty())
                .collect(),
        });
        if finished.len() == limit {
            break;
        }
    }
    Ok(finished)
}

/// Records that leave Redis one by one once finished, each kind read from
/// its shard's index of finished ones (written by the script that finishes
/// the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishedKind {
    /// A wallet transaction applied (completed or rejected).
    WalletTransaction,
    /// An advance repaid, with its installments.
    Advance,
}

impl FinishedKind {
    pub const ALL: [FinishedKind; 2] = [FinishedKind::WalletTransaction, FinishedKind::Advance];

    /// Its `kind` in the archive.
    pub fn name(self) -> &'static str {
        match self {
            FinishedKind::WalletTransaction => "wallet_transaction",
            FinishedKind::Advance => "advance",
        }
    }

    fn finished(self, keys: &Keys, shard: Shard) -> String {
        match self {
            FinishedKind::WalletTransaction => keys.wallet_applied(shard),
            FinishedKind::Advance => keys.advances_repaid(shard),
        }
    }

    /// The shard's other indexes that name the records.
    fn indexes(self, keys: &Keys, shard: Shard) -> Vec<String> {
        match self {
            FinishedKind::WalletTransaction => Vec::new(),
            FinishedKind::Advance => vec![keys.advances(shard)],
        }
    }

    fn record(self, keys: &Keys, id: &str) -> String {
        match self {
            FinishedKind::WalletTransaction => keys.wallet_transaction(id),
            FinishedKind::Advance => keys.advance(id),
        }
    }

    fn account_list(self, keys: &Keys, account: &AccountId) -> String {
        match self {
            FinishedKind::WalletTransaction => keys.wallet_history(account),
            FinishedKind::Advance => keys.account_advances(account),
        }
    }
}

/// Up to `limit` of a shard's records of `kind` finished before
/// `cutoff_ms`, oldest first, as Redis holds them: (id, fields).
pub async fn finished_records(
    conn: &mut impl Conn,
    keys: &Keys,
    kind: FinishedKind,
    shard: Shard,
    cutoff_ms: i64,
    limit: usize,
) -> StoreResult<Vec<(String, HashMap<String, String>)>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(kind.finished(keys, shard))
        .arg("-inf")
        .arg(format!("({cutoff_ms}"))
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(limit)
        .query_async(conn)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HGETALL").arg(kind.record(keys, id));
    }
    let all: Vec<HashMap<String, String>> = pipe.query_async(conn).await?;
    Ok(ids.into_iter().zip(all).collect())
}

/// Removes finished records of one shard (archived, the files' new
/// lengths in `committed`), under the shard's archive lock: (id, account).
#[expect(
    clippy::too_many_arguments,
    reason = "the script's arguments, each named where it is called"
)]
pub async fn retire_records(
    conn: &mut impl Conn,
    keys: &Keys,
    kind: FinishedKind,
    shard: Shard,
    cutoff_ms: i64,
    lock_token: &str,
    committed: &[(String, u64)],
    records: &[(String, AccountId)],
) -> StoreResult<Retired> {
    let indexes = kind.indexes(keys, shard);
    let mut invocation = RETIRE_RECORDS.prepare_invoke();
    invocation
        .key(keys.archive_lock(shard))
        .key(keys.archive_committed(shard))
        .key(kind.finished(keys, shard));
    for index in &indexes {
        invocation.key(index);
    }
    invocation
        .arg(lock_token)
        .arg(cutoff_ms)
        .arg(indexes.len())
        .arg(committed.len());
    for (day, length) in committed {
        invocation.arg(day).arg(length);
    }
    for (id, account) in records {
        invocation
            .key(kind.record(keys, id))
            .key(kind.account_list(keys, account))
            .arg(id)
            .arg(account.as_str());
    }
    Ok(retired(invocation.invoke_async(conn).await?))
}

/// Removes the orders of one customer shard (archived, the files' new
/// lengths in `committed`), under the shard's archive lock.
pub async fn retire_orders(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    lock_token: &str,
    committed: &[(String, u64)],
    orders: &[(OrderId, AccountId)],
) -> StoreResult<Retired> {
    let mut invocation = RETIRE_ORDERS.prepare_invoke();
    invocation
        .key(keys.archive_lock(shard))
        .key(keys.archive_committed(shard))
        .arg(lock_token)
        .arg(committed.len());
    for (day, length) in committed {
        invocation.arg(day).arg(length);
    }
    for (order, account) in orders {
        invocation
            .key(keys.order(order))
            .key(keys.account_orders(account))
            .arg(order.to_string())
            .arg(account.as_str());
    }
    Ok(retired(invocation.invoke_async(conn).await?))
}

/// Removes batches of one home shard (archived, their orders retired
/// first), under the shard's archive lock: (id, its symbol).
pub async fn retire_batches(
    conn: &mut impl Conn,
    keys: &Keys,
    home: Shard,
    batches: &[(BatchId, Symbol)],
    cutoff_ms: i64,
    lock_token: &str,
    committed: &[(String, u64)],
) -> StoreResult<Retired> {
    let mut invocation = RETIRE_BATCHES.prepare_invoke();
    invocation
        .key(keys.archive_lock(home))
        .key(keys.archive_committed(home))
        .key(keys.batches(home))
        .key(keys.archive_carried(home))
        .arg(lock_token)
        .arg(cutoff_ms)
        .arg(committed.len());
    for (day, length) in committed {
        invocation.arg(day).arg(length);
    }
    for (batch, symbol) in batches {
        invocation
            .key(keys.batch(batch))
            .key(keys.batch_orders(batch))
            .key(keys.bucket_batches(symbol))
            .arg(batch.to_string());
    }
    Ok(retired(invocation.invoke_async(conn).await?))
}

/// Up to `limit` of a stream's oldest entries made before `cutoff_ms`:
/// (stream id, fields).
pub async fn old_stream_entries(
    conn: &mut impl Conn,
    stream: &str,
    cutoff_ms: i64,
    limit: usize,
) -> StoreResult<Vec<(String, HashMap<String, String>)>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg(format!("({}-0", cutoff_ms.max(1)))
        .arg("COUNT")
        .arg(limit)
        .query_async(conn)
        .await?;
    Ok(reply
        .ids
        .iter()
        .map(|entry| (entry.id.clone(), super::stream_fields(entry)))
        .collect())
}

/// Removes a stream's oldest entries up to `last` (`count` of them,
/// archived, the files' new lengths in `committed`), under the shard's
/// archive lock.
#[expect(
    clippy::too_many_arguments,
    reason = "the script's arguments, each named where it is called"
)]
pub async fn trim_archived_stream(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    stream: &str,
    last: &str,
    count: usize,
    lock_token: &str,
    committed: &[(String, u64)],
) -> StoreResult<Retired> {
    let mut invocation = TRIM_ARCHIVED_STREAM.prepare_invoke();
    invocation
        .key(keys.archive_lock(shard))
        .key(keys.archive_committed(shard))
        .key(stream)
        .arg(lock_token)
        .arg(last)
        .arg(count)
        .arg(committed.len());
    for (day, length) in committed {
        invocation.arg(day).arg(length);
    }
    Ok(retired(invocation.invoke_async(conn).await?))
}
