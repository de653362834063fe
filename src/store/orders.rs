//! Purchase orders, pending buckets and batches.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::{Conn, Record, StoreError, StoreResult, keys, verdict};
use crate::domain::{
    AccountId, Amount, BatchId, Idempotency, OrderId, Quantity, Symbol, SystemAccount,
};

pub static PLACE_ORDER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/place_order.lua")));

/// Where an order (or its batch) stands. An order's status is its batch's,
/// or `pending` while it waits in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementStatus {
    Pending,
    Settling,
    Settled,
    Failed,
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
            Self::Refunded => "refunded",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "pending" => Ok(Self::Pending),
            "settling" => Ok(Self::Settling),
            "settled" => Ok(Self::Settled),
            "failed" => Ok(Self::Failed),
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

/// Everything `place_order.lua` needs; built by [`crate::orders`].
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
    #[error("the Idempotency-Key was used for another request (order {0})")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub async fn place_order(
    conn: &mut impl Conn,
    order: &PlaceOrder,
) -> Result<PlaceOrderOutcome, PlaceOrderError> {
    let (script_keys, script_args) = place_order_input(order);
    let mut invocation = PLACE_ORDER.prepare_invoke();
    for key in script_keys {
        invocation.key(key);
    }
    for arg in script_args {
        invocation.arg(arg);
    }
    let reply: Vec<String> = invocation
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    parse_place_order_reply(reply)
}

/// The `KEYS` and `ARGV` of `place_order.lua` for `order`, in script order.
pub fn place_order_input(order: &PlaceOrder) -> (Vec<String>, Vec<String>) {
    let (idempotency_key, fingerprint) = match &order.idempotency {
        Some(idem) => (
            keys::idempotency("orders", idem.key.as_str()),
            idem.fingerprint.clone(),
        ),
        None => (keys::idempotency("orders", "-"), String::new()),
    };
    let script_keys = vec![
        keys::account(&order.account_id),
        keys::account(&SystemAccount::Exchange.id()),
        keys::JOURNAL.to_owned(),
        keys::order(&order.order_id),
        keys::bucket(&order.symbol),
        keys::bucket_orders(&order.symbol),
        keys::bucket_batches(&order.symbol),
        keys::batch(&order.batch_id),
        keys::batch_orders(&order.batch_id),
        keys::SETTLE_STREAM.to_owned(),
        keys::BATCHES.to_owned(),
        keys::SYMBOLS.to_owned(),
        idempotency_key,
    ];
    let script_args = vec![
        order.account_id.to_string(),
        order.order_id.to_string(),
        order.symbol.to_string(),
        order.quantity.units().to_string(),
        order.price.cents().to_string(),
        order.cost.cents().to_string(),
        order.exchange_minimum.cents().to_string(),
        order.batch_id.to_string(),
        fingerprint,
        order.idempotency_ttl_secs.to_string(),
        order.created_at_ms.to_string(),
        SystemAccount::Exchange.id().to_string(),
    ];
    (script_keys, script_args)
}

/// Reads `place_order.lua`'s verdict.
pub fn parse_place_order_reply(reply: Vec<String>) -> Result<PlaceOrderOutcome, PlaceOrderError> {
    let unexpected = || PlaceOrderError::Store(StoreError::UnexpectedReply(reply.clone()));
    let word = |i: usize| reply.get(i).map(String::as_str);
    match (verdict(&reply), word(1)) {
        ("placed", Some("pending")) => Ok(PlaceOrderOutcome::Pending),
        ("placed", Some("settling")) => word(2)
            .and_then(|id| BatchId::parse(id).ok())
            .map(PlaceOrderOutcome::Settling)
            .ok_or_else(unexpected),
        ("replayed", Some(id)) => OrderId::parse(id)
            .map(PlaceOrderOutcome::Replayed)
            .map_err(|_| unexpected()),
        ("refused", Some("account_not_found")) => Err(PlaceOrderError::AccountNotFound),
        ("refused", Some("insufficient_funds")) => word(2)
            .and_then(|cents| cents.parse().ok())
            .and_then(|cents| Amount::from_cents(cents).ok())
            .map(|balance| PlaceOrderError::InsufficientFunds { balance })
            .ok_or_else(unexpected)
            .and_then(Err),
        ("refused", Some("idempotency_conflict")) => Err(PlaceOrderError::IdempotencyConflict(
            word(2).unwrap_or_default().to_owned(),
        )),
        _ => Err(unexpected()),
    }
}

/// An order with its status, which it takes from its batch once it has one.
pub async fn get_order(conn: &mut impl Conn, id: &OrderId) -> StoreResult<Option<Order>> {
    let key = keys::order(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let symbol = record.parsed("symbol", Symbol::parse)?;
    let epoch = record.text("epoch")?;
    let batch_id: Option<String> = conn.hget(keys::bucket_batches(&symbol), epoch).await?;
    let batch_id = batch_id
        .map(|id| BatchId::parse(&id).map_err(|err| record.corrupt(err.to_string())))
        .transpose()?;
    let (status, attempts, last_error) = match &batch_id {
        None => (SettlementStatus::Pending, 0, None),
        Some(batch_id) => {
            let (status, attempts, last_error): (Option<String>, Option<i64>, Option<String>) =
                conn.hmget(keys::batch(batch_id), &["status", "attempts", "last_error"])
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
pub async fn get_batch(conn: &mut impl Conn, id: &BatchId) -> StoreResult<Option<Batch>> {
    let key = keys::batch(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let order_ids: Vec<String> = conn.lrange(keys::batch_orders(id), 0, -1).await?;
    let order_ids = order_ids
        .iter()
        .map(|id| OrderId::parse(id).map_err(|err| record.corrupt(err.to_string())))
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(Some(Batch {
        id: *id,
        symbol: record.parsed("symbol", Symbol::parse)?,
        quantity: record.parsed("quantity", parse_quantity_units)?,
        value: record.parsed("value", parse_cents)?,
        order_ids,
        status: record.parsed("status", SettlementStatus::parse)?,
        attempts: record.integer("attempts")?,
        last_error: record.optional_text("last_error").map(str::to_owned),
        created_at_ms: record.integer("created_at")?,
    }))
}

/// The pending bucket of each symbol given, empty ones included.
pub async fn buckets(conn: &mut impl Conn, symbols: &[Symbol]) -> StoreResult<Vec<Bucket>> {
    if symbols.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for symbol in symbols {
        pipe.hmget(keys::bucket(symbol), &["value", "quantity", "count"]);
    }
    let rows: Vec<(Option<i64>, Option<i64>, Option<i64>)> = pipe.query_async(conn).await?;
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

/// Every symbol ever ordered.
pub async fn ordered_symbols(conn: &mut impl Conn) -> StoreResult<Vec<Symbol>> {
    let symbols: Vec<String> = conn.smembers(keys::SYMBOLS).await?;
    symbols
        .iter()
        .map(|symbol| {
            Symbol::parse(symbol).map_err(|err| StoreError::Corrupt {
                key: keys::SYMBOLS.to_owned(),
                problem: err.to_string(),
            })
        })
        .collect()
}

/// The value and status of every batch, a bounded page at a time, for the audit.
pub async fn batch_values(
    conn: &mut impl Conn,
    page_size: usize,
) -> StoreResult<Vec<(BatchId, i64, SettlementStatus)>> {
    let mut values = Vec::new();
    let mut offset = 0;
    loop {
        let ids: Vec<String> = conn
            .zrange(keys::BATCHES, offset, offset + page_size as isize - 1)
            .await?;
        if ids.is_empty() {
            break;
        }
        offset += ids.len() as isize;
        let ids = ids
            .iter()
            .map(|id| {
                BatchId::parse(id).map_err(|err| StoreError::Corrupt {
                    key: keys::BATCHES.to_owned(),
                    problem: err.to_string(),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hmget(keys::batch(id), &["value", "status"]);
        }
        let page: Vec<(Option<i64>, Option<String>)> = pipe.query_async(conn).await?;
        for (id, (value, status)) in ids.into_iter().zip(page) {
            let corrupt = |problem: String| StoreError::Corrupt {
                key: keys::batch(&id),
                problem,
            };
            let value = value.ok_or_else(|| corrupt("no value".to_owned()))?;
            let status =
                SettlementStatus::parse(status.as_deref().unwrap_or("")).map_err(corrupt)?;
            values.push((id, value, status));
        }
    }
    Ok(values)
}

fn parse_cents(text: &str) -> Result<Amount, String> {
    let cents = text.parse::<i64>().map_err(|err| err.to_string())?;
    Amount::from_cents(cents).map_err(|err| err.to_string())
}

fn parse_quantity_units(text: &str) -> Result<Quantity, String> {
    let units = text.parse::<i64>().map_err(|err| err.to_string())?;
    Quantity::from_units(units).map_err(|err| err.to_string())
}
