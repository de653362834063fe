//! The order saga: an order's money moves on its customer's shard, and the
//! order joins its symbol's bucket on the symbol's home shard (CLUSTER.md,
//! "Operations that cross shards"). Three steps, each one script on one
//! shard, so each is legal on Redis Cluster:
//!
//! 1. **Debit** (`debit_orders.lua`, customer's shard): check funds, debit,
//!    credit `@exchange` there, write the order, its journal entry and event,
//!    and an intent. The only step that can refuse.
//! 2. **Admit** (`admit_orders.lua`, home shard): add the order to the bucket
//!    unless its admission marker exists; close the batch and queue its settle
//!    job when the bucket reaches the minimum.
//! 3. **Finish** (`finish_orders.lua`, customer's shard): record the epoch on
//!    the order and drop the intent.
//!
//! The API runs the three for a group of orders and answers (the answer
//! carries the batch id, as before the shards); a failure of step 3 leaves
//! the order placed. A crash between steps leaves the intent:
//! a sweeper ([`sweep`]) takes intents past their takeover time and runs 2
//! (which finds the marker if 2 had run) and 3. Each step is safe to run
//! twice, so a resent call or two sweepers change nothing more.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::orders::{PlaceOrder, PlaceOrderError, PlaceOrderOutcome};
use super::slots::Shard;
use super::{Conn, Record, StoreError, StoreResult, now_ms};
use crate::domain::{AccountId, BatchId, OrderId, Symbol, SystemAccount};

pub static DEBIT_ORDERS: LazyLock<Script> = lua_script!("debit_orders.lua");
pub static ADMIT_ORDERS: LazyLock<Script> = lua_script!("admit_orders.lua");
static FINISH_ORDERS: LazyLock<Script> = lua_script!("finish_orders.lua");
static CLAIM_INTENTS: LazyLock<Script> = lua_script!("claim_intents.lua");

pub fn scripts() -> [&'static Script; 4] {
    [&DEBIT_ORDERS, &ADMIT_ORDERS, &FINISH_ORDERS, &CLAIM_INTENTS]
}

/// How long after its debit an unfinished order's saga is left to the API
/// that started it, before a sweeper takes it over: longer than any request
/// may take (the request timeout is at most 60 s).
pub const TAKEOVER_AFTER_MS: i64 = 60_000;
/// How long a sweeper holds the intents it took before another may take
/// them again.
pub const SWEEP_LEASE_MS: i64 = 30_000;
/// Most intents a sweeper takes from one shard at once.
pub const SWEEP_BATCH_MAX: usize = 100;
/// How long an admission marker is kept on the home shard: one small key
/// per order for this long, so short. Admission is deduplicated by it, so no
/// admission of an order may be sent later than this after the order was
/// debited: the API admits within its request (at most 60 s), a cluster
/// client resends within seconds, and a sweeper admits no order older than
/// [`ADMIT_AGE_MAX_MS`], half of it. An older unfinished saga (a shard out of
/// reach for minutes) waits for an operator; the audit counts its money in
/// flight.
pub const ADMISSION_MARKER_TTL_SECS: u64 = 10 * 60;
/// The oldest order a sweeper still admits (see [`ADMISSION_MARKER_TTL_SECS`]).
pub const ADMIT_AGE_MAX_MS: i64 = 5 * 60 * 1000;

/// What the debit step did with one order.
#[derive(Debug, PartialEq, Eq)]
pub enum Debit {
    Debited,
    Replayed(OrderId),
}

/// One order for the admit step.
#[derive(Debug, Clone)]
pub struct Admission {
    pub order_id: OrderId,
    pub symbol: Symbol,
    pub quantity_units: i64,
    pub cost_cents: i64,
    pub exchange_minimum_cents: i64,
    /// Used only if this order closes a batch: drawn on the home shard.
    pub batch_id: BatchId,
    pub at_ms: i64,
}

impl Admission {
    pub fn of(order: &PlaceOrder) -> Self {
        Admission {
            order_id: order.order_id,
            symbol: order.symbol.clone(),
            quantity_units: order.quantity.units(),
            cost_cents: order.cost.cents(),
            exchange_minimum_cents: order.exchange_minimum.cents(),
            batch_id: order.batch_id,
            at_ms: order.created_at_ms,
        }
    }
}

/// Where the admit step put one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The bucket epoch it joined.
    pub epoch: String,
    /// The batch that epoch became, once closed.
    pub batch_id: Option<BatchId>,
}

/// Step 1 for orders of one customer shard, in one call, which also runs
/// step 3 for `finishing` (orders of this shard admitted since, each with
/// the epoch it joined). One outcome per order, in order.
pub async fn debit(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    orders: &[&PlaceOrder],
    finishing: &[(OrderId, String)],
) -> StoreResult<Vec<Result<Debit, PlaceOrderError>>> {
    let mut invocation = DEBIT_ORDERS.prepare_invoke();
    invocation
        .key(keys.system_account(SystemAccount::Exchange, shard))
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.events(shard))
        .key(keys.order_intents(shard))
        .arg(orders.len())
        .arg(SystemAccount::Exchange.id().as_str())
        .arg(now_ms() + TAKEOVER_AFTER_MS)
        .arg(finishing.len());
    for order in orders {
        let (idempotency_key, idempotency) = match &order.idempotency {
            Some(idem) => (
                keys.idempotency(shard, "orders", idem.key.as_str()),
                format!("{} {}", idem.fingerprint, order.idempotency_ttl_secs),
            ),
            None => (keys.idempotency(shard, "orders", "-"), String::new()),
        };
        invocation
            .key(keys.account(&order.account_id))
            .key(keys.order(&order.order_id))
            .key(idempotency_key)
            .key(keys.account_entries(&order.account_id))
            .key(keys.account_orders(&order.account_id))
            .arg(order.account_id.as_str())
            .arg(order.order_id.to_string())
            .arg(order.symbol.as_str())
            .arg(order.quantity.units())
            .arg(order.price.cents())
            .arg(order.cost.cents())
            .arg(idempotency)
            .arg(order.created_at_ms)
            .arg(order.exchange_minimum.cents());
    }
    for (order_id, epoch) in finishing {
        invocation
            .key(keys.order(order_id))
            .arg(order_id.to_string())
            .arg(epoch);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    if reply.len() != 3 * orders.len() {
        return Err(StoreError::UnexpectedReply(reply));
    }
    Ok(reply.chunks(3).map(parse_debit).collect())
}

fn parse_debit(words: &[String]) -> Result<Debit, PlaceOrderError> {
    let unexpected = || PlaceOrderError::Store(StoreError::UnexpectedReply(words.to_vec()));
    match (words[0].as_str(), words[1].as_str(), words[2].as_str()) {
        ("debited", _, _) => Ok(Debit::Debited),
        ("replayed", order_id, _) => OrderId::parse(order_id)
            .map(Debit::Replayed)
            .map_err(|_| unexpected()),
        ("refused", _, _) => Err(super::orders::parse_refusal(words)),
        _ => Err(unexpected()),
    }
}

/// Step 2 for orders of one home shard (any customers'), in one call. One
/// outcome per order, in order.
pub async fn admit(
    conn: &mut impl Conn,
    keys: &Keys,
    admissions: &[Admission],
) -> StoreResult<Vec<Admitted>> {
    let Some(first) = admissions.first() else {
        return Ok(Vec::new());
    };
    let home = keys.shard_of_symbol(&first.symbol);
    let mut invocation = ADMIT_ORDERS.prepare_invoke();
    invocation
        .key(keys.settle(home))
        .key(keys.batches(home))
        .key(keys.symbols(home))
        .arg(admissions.len())
        .arg(ADMISSION_MARKER_TTL_SECS);
    for admission in admissions {
        invocation
            .key(keys.bucket(&admission.symbol))
            .key(keys.bucket_orders(&admission.symbol))
            .key(keys.bucket_batches(&admission.symbol))
            .key(keys.order_admission(&admission.symbol, &admission.order_id))
            .key(keys.batch(&admission.batch_id))
            .key(keys.batch_orders(&admission.batch_id))
            .arg(admission.order_id.to_string())
            .arg(admission.symbol.as_str())
            .arg(admission.quantity_units)
            .arg(admission.cost_cents)
            .arg(admission.exchange_minimum_cents)
            .arg(admission.batch_id.to_string())
            .arg(admission.at_ms);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    if reply.len() != 3 * admissions.len() {
        return Err(StoreError::UnexpectedReply(reply));
    }
    reply
        .chunks(3)
        .map(|words| match (words[0].as_str(), words[2].as_str()) {
            ("pending", _) => Ok(Admitted {
                epoch: words[1].clone(),
                batch_id: None,
            }),
            ("settling", batch_id) => BatchId::parse(batch_id)
                .map(|batch_id| Admitted {
                    epoch: words[1].clone(),
                    batch_id: Some(batch_id),
                })
                .map_err(|_| StoreError::UnexpectedReply(words.to_vec())),
            _ => Err(StoreError::UnexpectedReply(words.to_vec())),
        })
        .collect()
}

/// Step 3 for orders of one customer shard: each with the epoch it joined.
pub async fn finish(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    orders: &[(OrderId, String)],
) -> StoreResult<usize> {
    if orders.is_empty() {
        return Ok(0);
    }
    let mut invocation = FINISH_ORDERS.key(keys.order_intents(shard));
    for (order_id, epoch) in orders {
        invocation
            .key(keys.order(order_id))
            .arg(order_id.to_string())
            .arg(epoch);
    }
    Ok(invocation.invoke_async(conn).await?)
}

/// The finishing step still to run after [`place_admitted`] answered: one
/// call per customer shard.
#[derive(Debug, Default)]
pub struct Finishing {
    by_shard: Vec<(Shard, Vec<(OrderId, String)>)>,
}

impl Finishing {
    fn add(&mut self, shard: Shard, order_id: OrderId, epoch: String) {
        match self.by_shard.iter_mut().find(|(of, _)| *of == shard) {
            Some((_, orders)) => orders.push((order_id, epoch)),
            None => self.by_shard.push((shard, vec![(order_id, epoch)])),
        }
    }

    /// Runs step 3. A failure leaves the intents to a sweeper.
    pub async fn run(self, conn: &mut impl Conn, keys: &Keys) -> StoreResult<()> {
        for (shard, orders) in self.by_shard {
            finish(conn, keys, shard, &orders).await?;
        }
        Ok(())
    }
}

/// Places a group of orders through the whole saga, finishing included:
/// [`place_admitted`], then its finishing step. Each order is checked and
/// written (or refused) on its own; the outcomes come back in order.
pub async fn place_orders(
    conn: &mut impl Conn,
    keys: &Keys,
    orders: &[PlaceOrder],
) -> StoreResult<Vec<Result<PlaceOrderOutcome, PlaceOrderError>>> {
    let (outcomes, finishing) = place_admitted(conn, keys, orders).await?;
    finishing.run(conn, keys).await?;
    Ok(outcomes)
}

/// Places `orders`: debits them (one call per customer shard), admits the
/// debited ones (one call per home shard), and returns each order's outcome,
/// in order, with the finishing step still to run. A replayed request whose
/// order's saga is unfinished (its first request's process died) is
/// finished first, so it answers as a completed one would.
pub async fn place_admitted(
    conn: &mut impl Conn,
    keys: &Keys,
    orders: &[PlaceOrder],
) -> StoreResult<(Vec<Result<PlaceOrderOutcome, PlaceOrderError>>, Finishing)> {
    let mut outcomes: Vec<Option<Result<PlaceOrderOutcome, PlaceOrderError>>> =
        (0..orders.len()).map(|_| None).collect();
    let mut finishing = Finishing::default();
    // Step 1, per customer shard.
    let mut debited = Vec::new();
    for (shard, group) in group_by(orders, |order| keys.account_shard(&order.account_id)) {
        let refs: Vec<&PlaceOrder> = group.iter().map(|&i| &orders[i]).collect();
        for (i, debit) in group
            .into_iter()
            .zip(debit(conn, keys, shard, &refs, &[]).await?)
        {
            match debit {
                Ok(Debit::Debited) => debited.push(i),
                Ok(Debit::Replayed(order_id)) => {
                    complete(conn, keys, &order_id).await?;
                    outcomes[i] = Some(Ok(PlaceOrderOutcome::Replayed(order_id)));
                }
                Err(refused) => outcomes[i] = Some(Err(refused)),
            }
        }
    }
    // Step 2, per home shard.
    let admissions: Vec<&PlaceOrder> = debited.iter().map(|&i| &orders[i]).collect();
    for (_, group) in group_by(&admissions, |order| keys.shard_of_symbol(&order.symbol)) {
        let batch: Vec<Admission> = group
            .iter()
            .map(|&j| Admission::of(admissions[j]))
            .collect();
        for (j, admitted) in group.into_iter().zip(admit(conn, keys, &batch).await?) {
            let order = admissions[j];
            finishing.add(
                keys.account_shard(&order.account_id),
                order.order_id,
                admitted.epoch,
            );
            outcomes[debited[j]] = Some(Ok(match admitted.batch_id {
                Some(batch_id) => PlaceOrderOutcome::Settling(batch_id),
                None => PlaceOrderOutcome::Pending,
            }));
        }
    }
    let outcomes = outcomes
        .into_iter()
        .map(|outcome| {
            outcome.unwrap_or_else(|| Err(StoreError::UnexpectedReply(Vec::new()).into()))
        })
        .collect();
    Ok((outcomes, finishing))
}

/// Indices of `items` grouped by `shard`, groups in order of first appearance.
fn group_by<T>(items: &[T], shard: impl Fn(&T) -> Shard) -> Vec<(Shard, Vec<usize>)> {
    let mut groups: Vec<(Shard, Vec<usize>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let of = shard(item);
        match groups.iter_mut().find(|(group, _)| *group == of) {
            Some((_, indices)) => indices.push(i),
            None => groups.push((of, vec![i])),
        }
    }
    groups
}

/// An order as the saga's later steps need it, read from its hash.
struct Debited {
    admission: Admission,
    account_id: AccountId,
    /// Set once the saga finished.
    epoch: Option<String>,
}

async fn read_debited(
    conn: &mut impl Conn,
    keys: &Keys,
    order_id: &OrderId,
) -> StoreResult<Option<Debited>> {
    let key = keys.order(order_id);
    let fields: HashMap<String, String> = conn.hgetall(&key).await?;
    let Some(record) = Record::new(key, fields) else {
        return Ok(None);
    };
    let symbol = record.parsed("symbol", Symbol::parse)?;
    let epoch = record.optional_text("epoch").map(str::to_owned);
    // Orders placed before the saga have no minimum, and are all finished.
    let exchange_minimum_cents = match (&epoch, record.optional_text("minimum")) {
        (Some(_), None) => 0,
        _ => record.integer("minimum")?,
    };
    Ok(Some(Debited {
        admission: Admission {
            order_id: *order_id,
            batch_id: keys.new_batch_id(&symbol),
            symbol,
            quantity_units: record.integer("quantity")?,
            cost_cents: record.integer("cost")?,
            exchange_minimum_cents,
            at_ms: record.integer("created_at")?,
        },
        account_id: record.parsed("account_id", AccountId::parse)?,
        epoch,
    }))
}

/// Runs steps 2 and 3 for one debited order whose saga may be unfinished
/// (a replay of its request, or a sweeper); nothing for a finished one.
/// Returns where it was admitted, if this call admitted or found it so.
pub async fn complete(
    conn: &mut impl Conn,
    keys: &Keys,
    order_id: &OrderId,
) -> StoreResult<Option<Admitted>> {
    let Some(order) = read_debited(conn, keys, order_id).await? else {
        return Ok(None);
    };
    if order.epoch.is_some() {
        return Ok(None);
    }
    let admitted = admit(conn, keys, std::slice::from_ref(&order.admission))
        .await?
        .pop()
        .ok_or_else(|| StoreError::UnexpectedReply(Vec::new()))?;
    finish(
        conn,
        keys,
        keys.account_shard(&order.account_id),
        &[(*order_id, admitted.epoch.clone())],
    )
    .await?;
    Ok(Some(admitted))
}

/// A sweeper's claim on the sagas of `intents` (a sorted set of ids by
/// takeover time) past their takeover time at `now_ms`: at most
/// [`SWEEP_BATCH_MAX`], each leased for [`SWEEP_LEASE_MS`].
pub async fn claim_intents(
    conn: &mut impl Conn,
    intents: &str,
    now_ms: i64,
) -> StoreResult<Vec<String>> {
    Ok(CLAIM_INTENTS
        .key(intents)
        .arg(now_ms)
        .arg(SWEEP_BATCH_MAX)
        .arg(SWEEP_LEASE_MS)
        .invoke_async(conn)
        .await?)
}

/// What one sweep of a shard did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Sagas finished (admitted now, or found admitted, and finished).
    pub finished: usize,
    /// Intents older than [`ADMIT_AGE_MAX_MS`]: not admitted again, left for
    /// an operator.
    pub too_old: usize,
}

/// A sweeper's round on one shard at `now_ms`: takes the intents past their
/// takeover time (at most [`SWEEP_BATCH_MAX`]) and finishes their sagas.
pub async fn sweep(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    now_ms: i64,
) -> StoreResult<Swept> {
    let taken = claim_intents(conn, &keys.order_intents(shard), now_ms).await?;
    let mut swept = Swept::default();
    for id in taken {
        let order_id = OrderId::parse(&id).map_err(|err| StoreError::Corrupt {
            key: keys.order_intents(shard),
            problem: err.to_string(),
        })?;
        let Some(order) = read_debited(conn, keys, &order_id).await? else {
            // An intent without its order: no script writes one.
            return Err(StoreError::Corrupt {
                key: keys.order_intents(shard),
                problem: format!("order {order_id} has an intent and no record"),
            });
        };
        if order.epoch.is_none() && now_ms - order.admission.at_ms > ADMIT_AGE_MAX_MS {
            // Too old to admit again; finished if its marker says it was admitted.
            let marker = keys.order_admission(&order.admission.symbol, &order_id);
            if let Some(epoch) = conn.get::<_, Option<String>>(marker).await? {
                finish(conn, keys, shard, &[(order_id, epoch)]).await?;
                swept.finished += 1;
                continue;
            }
            tracing::error!(%order_id, "an order's saga has been unfinished for longer than a sweeper admits it: an operator must look");
            swept.too_old += 1;
            continue;
        }
        complete(conn, keys, &order_id).await?;
        if order.epoch.is_some() {
            // Finished but its intent stayed (a lost reply): drop it.
            finish(
                conn,
                keys,
                shard,
                &[(order_id, order.epoch.clone().unwrap_or_default())],
            )
            .await?;
        }
        swept.finished += 1;
    }
    Ok(swept)
}

/// The orders of a shard debited and not yet admitted, and their value in
/// cents: money on `@exchange` that is in no bucket or batch yet (the audit).
pub async fn unadmitted(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    page_size: usize,
) -> StoreResult<(usize, i64)> {
    let mut count = 0;
    let mut value = 0;
    let mut offset = 0;
    loop {
        let ids: Vec<String> = conn
            .zrange(
                keys.order_intents(shard),
                offset,
                offset + page_size as isize - 1,
            )
            .await?;
        if ids.is_empty() {
            break;
        }
        offset += ids.len() as isize;
        for id in ids {
            let order_id = OrderId::parse(&id).map_err(|err| StoreError::Corrupt {
                key: keys.order_intents(shard),
                problem: err.to_string(),
            })?;
            let Some(order) = read_debited(conn, keys, &order_id).await? else {
                continue;
            };
            if order.epoch.is_some() {
                continue;
            }
            let marker = keys.order_admission(&order.admission.symbol, &order_id);
            let admitted: bool = conn.exists(marker).await?;
            if !admitted {
                count += 1;
                value += order.admission.cost_cents;
            }
        }
    }
    Ok((count, value))
}
