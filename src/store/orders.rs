//! Purchase orders, pending buckets and batches.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::slots::Shard;
use super::{Conn, Record, StoreError, StoreResult};
use crate::domain::{
    AccountId, Amount, BatchId, Idempotency, OrderId, Quantity, Symbol, SystemAccount,
};

pub static PLACE_ORDERS: LazyLock<Script> = lua_script!("place_orders.lua");

/// Where an order (or its batch) stands. An order's status is its batch's,
/// or `pending` while it waits in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementStatus {
    Pending,
    Settling,
    Settled,
    Failed,
    /// A failed batch whose customers are being paid back, shard by shard
    /// (the refund saga).
    Refunding,
    /// A failed batch whose customers got their money back.
    Refunded,
}

impl SettlementStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Settling => "settling",
            Self::Settled => "settled",
            Self::Failed => "failed",
            Self::Refunding => "refunding",
            Self::Refunded => "refunded",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "pending" => Ok(Self::Pending),
            "settling" => Ok(Self::Settling),
            "settled" => Ok(Self::Settled),
            "failed" => Ok(Self::Failed),
            "refunding" => Ok(Self::Refunding),
            "refunded" => Ok(Self::Refunded),
            other => Err(format!("unknown status `{other}`")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Order {
    pub id: OrderId,
    pub account_id: AccountId,
    pub symbol: Symbol,
    pub quantity: Quantity,
    pub price: Amount,
    pub cost: Amount,
    pub created_at_ms: i64,
    pub status: SettlementStatus,
    pub batch_id: Option<BatchId>,
    /// The batch's exchange calls so far.
    pub attempts: i64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub id: BatchId,
    pub symbol: Symbol,
    pub quantity: Quantity,
    pub value: Amount,
    pub order_ids: Vec<OrderId>,
    pub status: SettlementStatus,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// An exchange call got no answer, so the exchange may have filled it.
    pub fill_unknown: bool,
    pub created_at_ms: i64,
}

/// What waits in a symbol's bucket for the exchange minimum.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub symbol: Symbol,
    pub value_cents: i64,
    pub quantity_units: i64,
    pub order_count: i64,
}

/// One order for `place_orders.lua`; built by [`crate::orders`].
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub order_id: OrderId,
    pub account_id: AccountId,
    pub symbol: Symbol,
    pub quantity: Quantity,
    pub price: Amount,
    pub cost: Amount,
    pub exchange_minimum: Amount,
    /// Used only when this order closes a batch.
    pub batch_id: BatchId,
    pub idempotency: Option<Idempotency>,
    pub idempotency_ttl_secs: u64,
    pub created_at_ms: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PlaceOrderOutcome {
    /// The order waits in its bucket.
    Pending,
    /// The order closed a batch; its settle job is on the stream.
    Settling(BatchId),
    /// The Idempotency-Key was seen before with the same request.
    Replayed(OrderId),
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceOrderError {
    #[error("account not found")]
    AccountNotFound,
    #[error("insufficient funds: the balance is {balance}")]
    InsufficientFunds { balance: Amount },
    /// The order would take this account (the customer, or @exchange) past
    /// the balance limit; nothing was written for it.
    #[error("the order would take the balance of account {0} past the largest amount held")]
    BalanceLimit(AccountId),
    #[error("the Idempotency-Key was used for another request (order {0})")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Places one order: `place_orders.lua` with a group of one.
pub async fn place_order(
    conn: &mut impl Conn,
    keys: &Keys,
    order: &PlaceOrder,
) -> Result<PlaceOrderOutcome, PlaceOrderError> {
    let mut outcomes = place_orders(conn, keys, std::slice::from_ref(order)).await?;
    outcomes
        .pop()
        .ok_or_else(|| StoreError::UnexpectedReply(Vec::new()))?
}

/// Places a group of orders in one script call, over the customers' shard
/// and the symbol's home shard: only where both are on one node (a
/// standalone Redis; the order saga, `super::order_saga`, is the way on a
/// cluster). Each order is checked and
/// written (or refused) on its own; the outcomes come back in order.
pub async fn place_orders(
    conn: &mut impl Conn,
    keys: &Keys,
    orders: &[PlaceOrder],
) -> StoreResult<Vec<Result<PlaceOrderOutcome, PlaceOrderError>>> {
    let (script_keys, script_args) = place_orders_input(keys, orders);
    let mut invocation = PLACE_ORDERS.prepare_invoke();
    for key in script_keys {
        invocation.key(key);
    }
    for arg in script_args {
        invocation.arg(arg);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    parse_place_orders_reply(reply, orders.len())
}

/// The `KEYS` and `ARGV` of `place_orders.lua` for `orders`, in script order.
/// The orders may be of any customer shards and symbols (a standalone Redis
/// holds every shard; a cluster runs the order saga instead): the debit, its
/// journal entry and event are written on the customer's shard, the bucket,
/// batch and settle job on the symbol's home shard, each shard's keys named
/// once, in a block the orders point to.
pub fn place_orders_input(keys: &Keys, orders: &[PlaceOrder]) -> (Vec<String>, Vec<String>) {
    let exchange = SystemAccount::Exchange.id();
    let mut customer_shards: Vec<Shard> = Vec::new();
    let mut home_shards: Vec<Shard> = Vec::new();
    // Each order's (customer block, home block), numbered from 1 as Lua does.
    let block =
        |shards: &mut Vec<Shard>, shard: Shard| match shards.iter().position(|s| *s == shard) {
            Some(index) => index + 1,
            None => {
                shards.push(shard);
                shards.len()
            }
        };
    let blocks: Vec<(usize, usize)> = orders
        .iter()
        .map(|order| {
            (
                block(&mut customer_shards, keys.account_shard(&order.account_id)),
                block(&mut home_shards, keys.shard_of_symbol(&order.symbol)),
            )
        })
        .collect();
    let mut script_keys =
        Vec::with_capacity(4 * customer_shards.len() + 3 * home_shards.len() + 10 * orders.len());
    for &shard in &customer_shards {
        script_keys.extend([
            keys.system_account(SystemAccount::Exchange, shard),
            keys.journal(shard),
            keys.journal_index(shard),
            keys.events(shard),
        ]);
    }
    for &home in &home_shards {
        script_keys.extend([keys.settle(home), keys.batches(home), keys.symbols(home)]);
    }
    let mut script_args = Vec::with_capacity(4 + 12 * orders.len());
    script_args.extend([
        customer_shards.len().to_string(),
        home_shards.len().to_string(),
        orders.len().to_string(),
        exchange.to_string(),
    ]);
    for (order, (customer_block, home_block)) in orders.iter().zip(blocks) {
        let shard = customer_shards[customer_block - 1];
        let (idempotency_key, idempotency) = match &order.idempotency {
            Some(idem) => (
                keys.idempotency(shard, "orders", idem.key.as_str()),
                format!("{} {}", idem.fingerprint, order.idempotency_ttl_secs),
            ),
            None => (keys.idempotency(shard, "orders", "-"), String::new()),
        };
        script_keys.extend([
            keys.account(&order.account_id),
            keys.order(&order.order_id),
            keys.bucket(&order.symbol),
            keys.bucket_orders(&order.symbol),
            keys.bucket_batches(&order.symbol),
            keys.batch(&order.batch_id),
            keys.batch_orders(&order.batch_id),
            idempotency_key,
            keys.account_entries(&order.account_id),
            keys.account_orders(&order.account_id),
        ]);
        script_args.extend([
            order.account_id.to_string(),
            order.order_id.to_string(),
            order.symbol.to_string(),
            order.quantity.units().to_string(),
            order.price.cents().to_string(),
            order.cost.cents().to_string(),
            order.exchange_minimum.cents().to_string(),
            order.batch_id.to_string(),
            idempotency,
            order.created_at_ms.to_string(),
            customer_block.to_string(),
            home_block.to_string(),
        ]);
    }
    (script_keys, script_args)
}

/// Reads `place_orders.lua`'s three words per order.
pub fn parse_place_orders_reply(
    reply: Vec<String>,
    count: usize,
) -> StoreResult<Vec<Result<PlaceOrderOutcome, PlaceOrderError>>> {
    if reply.len() != 3 * count {
        return Err(StoreError::UnexpectedReply(reply));
    }
    let outcomes = reply.chunks(3).map(parse_outcome).collect();
    Ok(outcomes)
}

fn parse_outcome(words: &[String]) -> Result<PlaceOrderOutcome, PlaceOrderError> {
    let unexpected = || PlaceOrderError::Store(StoreError::UnexpectedReply(words.to_vec()));
    match (words[0].as_str(), words[1].as_str(), words[2].as_str()) {
        ("placed", "pending", _) => Ok(PlaceOrderOutcome::Pending),
        ("placed", "settling", batch_id) => BatchId::parse(batch_id)
            .map(PlaceOrderOutcome::Settling)
            .map_err(|_| unexpected()),
        ("replayed", order_id, _) => OrderId::parse(order_id)
            .map(PlaceOrderOutcome::Replayed)
            .map_err(|_| unexpected()),
        ("refused", _, _) => Err(parse_refusal(words)),
        _ => Err(unexpected()),
    }
}

/// An order's refusal, as `place_orders.lua` and `debit_orders.lua` word it:
/// "refused", the reason, and what it names.
pub(crate) fn parse_refusal(words: &[String]) -> PlaceOrderError {
    let unexpected = || PlaceOrderError::Store(StoreError::UnexpectedReply(words.to_vec()));
    match (words[1].as_str(), words[2].as_str()) {
        ("account_not_found", _) => PlaceOrderError::AccountNotFound,
        ("insufficient_funds", balance) => balance
            .parse()
            .ok()
            .and_then(|cents| Amount::from_cents(cents).ok())
            .map_or_else(unexpected, |balance| PlaceOrderError::InsufficientFunds {
                balance,
            }),
        ("balance_limit", account) => {
            AccountId::parse(account).map_or_else(|_| unexpected(), PlaceOrderError::BalanceLimit)
        }
        ("idempotency_conflict", order_id) => {
            PlaceOrderError::IdempotencyConflict(order_id.to_owned())
        }
        _ => unexpected(),
    }
}

/// Up to `limit` of a customer's orders, newest first, from below the list
/// entry id `before` if given: (list entry id, order id).
pub async fn account_orders(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<(String, OrderId)>> {
    let high = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
    let listed: redis::streams::StreamRangeReply = conn
        .xrevrange_count(keys.account_orders(account), high, "-", limit)
        .await?;
    listed
        .ids
        .iter()
        .map(|item| {
            let order = super::stream_fields(item)
                .remove("order")
                .unwrap_or_default();
            let order = OrderId::parse(&order).map_err(|err| StoreError::Corrupt {
                key: keys.account_orders(account),
                problem: format!("list entry {}: {err}", item.id),
            })?;
            Ok((item.id.clone(), order))
        })
        .collect()
}

/// An order with its status, which it takes from its batch once it has one.
pub async fn get_order(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &OrderId,
) -> StoreResult<Option<Order>> {
    let key = keys.order(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let symbol = record.parsed("symbol", Symbol::parse)?;
    // The epoch is on the order once it is wholly placed; while an order
    // saga is under way, on its admission marker (none: debited, not yet in
    // the bucket: pending).
    let epoch = match record.optional_text("epoch") {
        Some(epoch) => Some(epoch.to_owned()),
        None => conn.get(keys.order_admission(&symbol, id)).await?,
    };
    let batch_id: Option<String> = match &epoch {
        Some(epoch) => conn.hget(keys.bucket_batches(&symbol), epoch).await?,
        None => None,
    };
    let batch_id = batch_id
        .map(|id| BatchId::parse(&id).map_err(|err| record.corrupt(err.to_string())))
        .transpose()?;
    let (status, attempts, last_error) = match &batch_id {
        None => (SettlementStatus::Pending, 0, None),
        Some(batch_id) => {
            let (status, attempts, last_error): (Option<String>, Option<i64>, Option<String>) =
                conn.hmget(keys.batch(batch_id), &["status", "attempts", "last_error"])
                    .await?;
            let status =
                status.ok_or_else(|| record.corrupt(format!("batch {batch_id} is missing")))?;
            let status = SettlementStatus::parse(&status).map_err(|err| record.corrupt(err))?;
            (
                status,
                attempts.unwrap_or(0),
                last_error.filter(|error| !error.is_empty()),
            )
        }
    };
    Ok(Some(Order {
        id: *id,
        account_id: record.parsed("account_id", AccountId::parse)?,
        symbol,
        quantity: record.parsed("quantity", parse_quantity_units)?,
        price: record.parsed("price", parse_cents)?,
        cost: record.parsed("cost", parse_cents)?,
        created_at_ms: record.integer("created_at")?,
        status,
        batch_id,
        attempts,
        last_error,
    }))
}

/// A batch with its order ids (at most the exchange minimum in cents of them,
/// since every order costs at least a cent).
pub async fn get_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &BatchId,
) -> StoreResult<Option<Batch>> {
    let key = keys.batch(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let order_ids: Vec<String> = conn.lrange(keys.batch_orders(id), 0, -1).await?;
    batch_from(id, key, fields, order_ids)
}

/// Several batches in one pipeline (one round trip on a standalone Redis),
/// each `None` where there is no such batch.
pub async fn get_batches(
    conn: &mut impl Conn,
    keys: &Keys,
    ids: &[BatchId],
) -> StoreResult<Vec<Option<Batch>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.hgetall(keys.batch(id))
            .lrange(keys.batch_orders(id), 0, -1);
    }
    // A flat reply of (fields, order ids) pairs.
    let replies: Vec<(HashMap<String, String>, Vec<String>)> = pipe.query_async(conn).await?;
    ids.iter()
        .zip(replies)
        .map(|(id, (fields, order_ids))| batch_from(id, keys.batch(id), fields, order_ids))
        .collect()
}

fn batch_from(
    id: &BatchId,
    key: String,
    fields: HashMap<String, String>,
    order_ids: Vec<String>,
) -> StoreResult<Option<Batch>> {
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let order_ids = order_ids
        .iter()
        .map(|id| OrderId::parse(id).map_err(|err| record.corrupt(err.to_string())))
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(Some(Batch {
        id: *id,
        symbol: record.parsed("symbol", Symbol::parse)?,
        quantity: record.parsed("quantity", parse_total_units)?,
        value: record.parsed("value", parse_cents)?,
        order_ids,
        status: record.parsed("status", SettlementStatus::parse)?,
        attempts: record.integer("attempts")?,
        last_error: record.optional_text("last_error").map(str::to_owned),
        fill_unknown: record.optional_text("fill_unknown") == Some("1"),
        created_at_ms: record.integer("created_at")?,
    }))
}

/// The pending bucket of each symbol given, empty ones included.
pub async fn buckets(
    conn: &mut impl Conn,
    keys: &Keys,
    symbols: &[Symbol],
) -> StoreResult<Vec<Bucket>> {
    let mut rows = Vec::with_capacity(symbols.len());
    for symbol in symbols {
        let row: (Option<i64>, Option<i64>, Option<i64>) = conn
            .hmget(keys.bucket(symbol), &["value", "quantity", "count"])
            .await?;
        rows.push(row);
    }
    Ok(symbols
        .iter()
        .zip(rows)
        .map(|(symbol, (value, quantity, count))| Bucket {
            symbol: symbol.clone(),
            value_cents: value.unwrap_or(0),
            quantity_units: quantity.unwrap_or(0),
            order_count: count.unwrap_or(0),
        })
        .collect())
}

/// Every symbol ever ordered, sorted.
pub async fn ordered_symbols(conn: &mut impl Conn, keys: &Keys) -> StoreResult<Vec<Symbol>> {
    let mut all = Vec::new();
    for shard in keys.shards() {
        let symbols: Vec<String> = conn.smembers(keys.symbols(shard)).await?;
        for symbol in symbols {
            all.push(Symbol::parse(&symbol).map_err(|err| StoreError::Corrupt {
                key: keys.symbols(shard),
                problem: err.to_string(),
            })?);
        }
    }
    all.sort_unstable();
    Ok(all)
}

/// The value and status of every batch, a bounded page at a time, for the audit.
pub async fn batch_values(
    conn: &mut impl Conn,
    keys: &Keys,
    page_size: usize,
) -> StoreResult<Vec<(BatchId, i64, SettlementStatus)>> {
    let mut values = Vec::new();
    for shard in keys.shards() {
        batch_values_of(conn, keys, shard, page_size, &mut values).await?;
    }
    Ok(values)
}

async fn batch_values_of(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    page_size: usize,
    values: &mut Vec<(BatchId, i64, SettlementStatus)>,
) -> StoreResult<()> {
    let mut offset = 0;
    loop {
        let ids: Vec<String> = conn
            .zrange(keys.batches(shard), offset, offset + page_size as isize - 1)
            .await?;
        if ids.is_empty() {
            break;
        }
        offset += ids.len() as isize;
        let ids = ids
            .iter()
            .map(|id| {
                BatchId::parse(id).map_err(|err| StoreError::Corrupt {
                    key: keys.batches(shard),
                    problem: err.to_string(),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hmget(keys.batch(id), &["value", "status"]);
        }
        let page: Vec<(Option<i64>, Option<String>)> = pipe.query_async(conn).await?;
        for (id, (value, status)) in ids.into_iter().zip(page) {
            let corrupt = |problem: String| StoreError::Corrupt {
                key: keys.batch(&id),
                problem,
            };
            let value = value.ok_or_else(|| corrupt("no value".to_owned()))?;
            let status =
                SettlementStatus::parse(status.as_deref().unwrap_or("")).map_err(corrupt)?;
            values.push((id, value, status));
        }
    }
    Ok(())
}

fn parse_cents(text: &str) -> Result<Amount, String> {
    let cents = text.parse::<i64>().map_err(|err| err.to_string())?;
    Amount::from_cents(cents).map_err(|err| err.to_string())
}

fn parse_quantity_units(text: &str) -> Result<Quantity, String> {
    let units = text.parse::<i64>().map_err(|err| err.to_string())?;
    Quantity::from_units(units).map_err(|err| err.to_string())
}

/// A batch's quantity: a large order takes the bucket along, so it may pass
/// one order's bound.
fn parse_total_units(text: &str) -> Result<Quantity, String> {
    let units = text.parse::<i64>().map_err(|err| err.to_string())?;
    Quantity::from_total_units(units).map_err(|err| err.to_string())
}
