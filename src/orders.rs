//! Purchase orders: pricing and the checks that come before the scripts,
//! and the grouping of concurrent orders.
//!
//! The API parses the request into domain types; this module prices it and
//! places it, in grouped script calls: on a standalone Redis one
//! `place_orders.lua` call per group does everything; where the saga is the
//! way (a cluster, or `TALLY_SAGAS=always`), the order saga
//! (`store::order_saga`): the debit on the customer's shard, then the
//! admission to its symbol's bucket on the symbol's home shard, then the
//! finishing step.

use crate::config::LedgerSettings;
use crate::domain::{AccountId, Idempotency, IdempotencyKey, Quantity, Symbol, order_cost};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::domain::OrderId;
use crate::store::keys::Keys;
use crate::store::order_saga::{self, Admission, Debit};
use crate::store::orders::{PlaceOrder, PlaceOrderError, PlaceOrderOutcome, place_orders};
use crate::store::slots::Shard;
use crate::store::{Store, StoreError};

/// A purchase order as the customer asked for it, already well formed.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub account_id: AccountId,
    pub symbol: Symbol,
    pub quantity: Quantity,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderRejection {
    #[error("symbol `{0}` is not traded here")]
    UnknownSymbol(Symbol),
    #[error("`{0}` is a system account; orders are placed by customer accounts")]
    SystemAccount(AccountId),
    #[error("the order's value is above the largest amount accepted")]
    ValueTooLarge,
}

/// Prices `request` and prepares its script call. The batch id is drawn now
/// and used only if this order closes a batch.
pub fn prepare(
    request: &OrderRequest,
    keys: &Keys,
    ledger: &LedgerSettings,
    idempotency_key: Option<IdempotencyKey>,
    idempotency_ttl_secs: u64,
) -> Result<PlaceOrder, OrderRejection> {
    if request.account_id.is_system() {
        return Err(OrderRejection::SystemAccount(request.account_id.clone()));
    }
    let price = ledger
        .prices
        .price(&request.symbol)
        .ok_or_else(|| OrderRejection::UnknownSymbol(request.symbol.clone()))?;
    let cost = order_cost(price, request.quantity).ok_or(OrderRejection::ValueTooLarge)?;
    let idempotency = idempotency_key.map(|key| {
        let quantity_units = request.quantity.units().to_string();
        let parts = [
            request.account_id.as_str(),
            request.symbol.as_str(),
            &quantity_units,
        ];
        Idempotency::new(key, &parts)
    });
    Ok(PlaceOrder {
        order_id: keys.new_order_id(&request.account_id),
        account_id: request.account_id.clone(),
        symbol: request.symbol.clone(),
        quantity: request.quantity,
        price,
        cost,
        exchange_minimum: ledger.exchange_minimum,
        batch_id: keys.new_batch_id(&request.symbol),
        idempotency,
        idempotency_ttl_secs,
        created_at_ms: crate::store::now_ms(),
    })
}

/// Most orders carried by one script call.
pub const ORDER_GROUP_MAX: usize = 64;
/// Orders waiting to be grouped; past this, requests wait for room.
pub const ORDER_QUEUE_MAX: usize = 4_096;
/// Debit calls in flight at once on the shared connection.
pub const ORDER_GROUPS_IN_FLIGHT_MAX: usize = 4;
/// Admission calls in flight at once: one home shard takes every customer
/// shard's orders, so its calls are fewer and larger.
pub const ADMISSIONS_IN_FLIGHT_MAX: usize = 2;
/// Longest an admitted order's finishing step waits for the next debit call
/// of its customer's shard to carry it, before it gets a call of its own.
pub const FINISH_WAIT_MAX: Duration = Duration::from_millis(20);

type Placed = Result<PlaceOrderOutcome, PlaceOrderError>;
/// An order on its way through the saga, with where its answer goes.
type Pending = (PlaceOrder, oneshot::Sender<Placed>);
/// An admitted order whose finishing step is still to run: its customer's
/// shard, its id and the epoch it joined.
type Admitted = (Shard, OrderId, String);

/// Places concurrent orders in grouped script calls.
///
/// Where one script may write two shards (a standalone Redis, see
/// [`Store::sagas`]), orders of every shard and symbol queue together, and
/// one `place_orders.lua` call per group places them whole.
///
/// Elsewhere they run through the order saga (`store::order_saga`), as a
/// pipeline of two stages:
///
/// - **debit**: orders queue per customer shard while the debit calls in
///   flight run, and the next call takes the queue whose first order waited
///   longest (up to [`ORDER_GROUP_MAX`]). It also carries the finishing step
///   of that shard's orders admitted since.
/// - **admit**: debited orders queue per symbol's home shard, so one call
///   admits the orders of every customer shard; then each order is answered
///   (with its batch, if it closed one) and handed back for finishing.
///
/// Under light load every group holds one order, so nothing waits for a
/// group to fill, and a finishing step with no debit to ride on runs at once.
/// Each order is still checked and written on its own inside the scripts,
/// and gets its own answer. A crash between stages leaves an intent for a
/// sweeper ([`crate::sagas::sweep_periodically`]).
pub struct OrderGrouper {
    sender: mpsc::Sender<Pending>,
    receiver: Mutex<Option<mpsc::Receiver<Pending>>>,
    started: Once,
    store: Store,
}

impl OrderGrouper {
    pub fn new(store: Store) -> Self {
        let (sender, receiver) = mpsc::channel(ORDER_QUEUE_MAX);
        OrderGrouper {
            sender,
            receiver: Mutex::new(Some(receiver)),
            started: Once::new(),
            store,
        }
    }

    pub async fn place(&self, order: PlaceOrder) -> Placed {
        // Started on first use, from inside the runtime.
        self.started.call_once(|| {
            let receiver = self
                .receiver
                .lock()
                .expect("grouper lock")
                .take()
                .expect("started once");
            let (admit, admissions) = mpsc::unbounded_channel();
            let (finish, finishing) = mpsc::unbounded_channel();
            tokio::spawn(admit_stage(self.store.clone(), admissions, finish));
            tokio::spawn(debit_stage(self.store.clone(), receiver, finishing, admit));
        });
        let (reply, answer) = oneshot::channel();
        let gone = || {
            PlaceOrderError::Store(StoreError::UnexpectedReply(vec![
                "order grouper stopped".to_owned(),
            ]))
        };
        self.sender.send((order, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Items waiting for their group, one queue per shard (a script call may
/// only carry one shard's keys; `K` names the shard, or the pair of shards
/// a one-script placement writes), each with its arrival number.
struct ShardQueues<K, T> {
    queues: Vec<(K, VecDeque<(u64, T)>)>,
    /// Items queued so far, numbering each: the oldest waiting item's queue
    /// goes first.
    arrived: u64,
    waiting: usize,
}

impl<K, T> Default for ShardQueues<K, T> {
    fn default() -> Self {
        ShardQueues {
            queues: Vec::new(),
            arrived: 0,
            waiting: 0,
        }
    }
}

impl<K: Copy + PartialEq, T> ShardQueues<K, T> {
    fn push(&mut self, shard: K, item: T) {
        self.arrived += 1;
        self.waiting += 1;
        let entry = (self.arrived, item);
        match self.queues.iter_mut().find(|(of, _)| *of == shard) {
            Some((_, queue)) => queue.push_back(entry),
            None => self.queues.push((shard, [entry].into())),
        }
    }

    /// Up to [`ORDER_GROUP_MAX`] items of the queue whose first item has
    /// waited longest: every shard's turn comes in arrival order, and
    /// carries all its items that came meanwhile.
    fn next_group(&mut self) -> Option<(K, Vec<T>)> {
        let (shard, queue) = self
            .queues
            .iter_mut()
            .filter(|(_, queue)| !queue.is_empty())
            .min_by_key(|(_, queue)| queue.front().map(|(arrived, _)| *arrived))?;
        let take = queue.len().min(ORDER_GROUP_MAX);
        self.waiting -= take;
        Some((*shard, queue.drain(..take).map(|(_, item)| item).collect()))
    }
}

/// Admitted orders waiting for their finishing step, per customer shard,
/// with when the oldest of each arrived.
/// A customer shard, when its oldest admitted order arrived, and its orders
/// with their epochs.
type ShardUnfinished = (Shard, Instant, Vec<(OrderId, String)>);

#[derive(Default)]
struct Unfinished {
    by_shard: Vec<ShardUnfinished>,
}

impl Unfinished {
    fn add(&mut self, (shard, order_id, epoch): Admitted) {
        match self.by_shard.iter_mut().find(|(of, _, _)| *of == shard) {
            Some((_, _, orders)) => orders.push((order_id, epoch)),
            None => self
                .by_shard
                .push((shard, Instant::now(), vec![(order_id, epoch)])),
        }
    }

    fn is_empty(&self) -> bool {
        self.by_shard.is_empty()
    }

    /// Takes a shard's orders (none if it has none), at most [`ORDER_GROUP_MAX`].
    fn take(&mut self, shard: Shard) -> Vec<(OrderId, String)> {
        let Some(at) = self.by_shard.iter().position(|(of, _, _)| *of == shard) else {
            return Vec::new();
        };
        let orders = &mut self.by_shard[at].2;
        if orders.len() > ORDER_GROUP_MAX {
            return orders.drain(..ORDER_GROUP_MAX).collect();
        }
        self.by_shard.swap_remove(at).2
    }

    /// The shard whose orders have waited longest, if they waited at least `after`.
    fn oldest(&self, after: Duration) -> Option<Shard> {
        self.by_shard
            .iter()
            .min_by_key(|(_, since, _)| *since)
            .filter(|(_, since, _)| since.elapsed() >= after)
            .map(|(shard, _, _)| *shard)
    }
}

/// The debit stage: groups new orders per customer shard into
/// `debit_orders.lua` calls, each carrying its shard's finishing steps; a
/// finishing step that waited [`FINISH_WAIT_MAX`], or that has nothing to
/// wait for, gets a `finish_orders.lua` call of its own.
async fn debit_stage(
    store: Store,
    mut orders: mpsc::Receiver<Pending>,
    mut finishing: mpsc::UnboundedReceiver<Admitted>,
    admit: mpsc::UnboundedSender<Pending>,
) {
    let in_flight = Arc::new(Semaphore::new(ORDER_GROUPS_IN_FLIGHT_MAX));
    let mut queues = ShardQueues::default();
    let mut unfinished = Unfinished::default();
    loop {
        if queues.waiting == 0 && unfinished.is_empty() {
            tokio::select! {
                pending = orders.recv() => match pending {
                    Some(pending) => queue_order(&store, &mut queues, pending),
                    None => return,
                },
                Some(admitted) = finishing.recv() => unfinished.add(admitted),
            }
        }
        // Wait for a free slot before taking a group, so a busy Redis means
        // bigger groups: meanwhile every shard's queue fills. The number of
        // calls in flight is bounded for all shards together, so the shard
        // count does not shrink the groups (each shard's turn comes less often
        // and carries more).
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        while let Ok(pending) = orders.try_recv() {
            queue_order(&store, &mut queues, pending);
        }
        while let Ok(admitted) = finishing.try_recv() {
            unfinished.add(admitted);
        }
        let overdue = match queues.waiting {
            0 => unfinished.oldest(Duration::ZERO),
            _ => unfinished.oldest(FINISH_WAIT_MAX),
        };
        let store = store.clone();
        if let Some(shard) = overdue {
            let finishing = unfinished.take(shard);
            tokio::spawn(async move {
                let _permit = permit;
                finish_group(&store, shard, finishing).await;
            });
        } else if let Some((queue, group)) = queues.next_group() {
            let shard = match queue {
                DebitQueue::OneScript => {
                    tokio::spawn(async move {
                        let _permit = permit;
                        place_group(&store, group).await;
                    });
                    continue;
                }
                DebitQueue::Saga(shard) => shard,
            };
            let finishing = unfinished.take(shard);
            let admit = admit.clone();
            tokio::spawn(async move {
                let _permit = permit;
                debit_group(&store, shard, group, finishing, &admit).await;
            });
        }
    }
}

/// The call an order waits for: with the sagas, its customer shard's debit;
/// without, the one script, which takes orders of every shard together (one
/// Redis holds them all), so the shard count does not split its groups.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DebitQueue {
    Saga(Shard),
    OneScript,
}

fn queue_order(store: &Store, queues: &mut ShardQueues<DebitQueue, Pending>, pending: Pending) {
    let queue = if store.sagas() {
        DebitQueue::Saga(store.keys().account_shard(&pending.0.account_id))
    } else {
        DebitQueue::OneScript
    };
    queues.push(queue, pending);
}

/// One `place_orders.lua` call for a group of orders of any shards, where
/// one script may write them all (see [`Store::sagas`]); every order gets
/// its answer.
async fn place_group(store: &Store, group: Vec<Pending>) {
    let (orders, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let outcomes = match store.conn().await {
        Ok(mut conn) => place_orders(&mut conn, store.keys(), &orders).await,
        Err(err) => Err(err),
    };
    match outcomes {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(group_failed(&err)));
            }
        }
    }
}

/// One `debit_orders.lua` call for a group of one customer shard's orders
/// (and the finishing steps it carries). A debited order goes on to its
/// admission; a refused one is answered; a replay's saga is finished first.
async fn debit_group(
    store: &Store,
    shard: Shard,
    group: Vec<Pending>,
    finishing: Vec<(OrderId, String)>,
    admit: &mpsc::UnboundedSender<Pending>,
) {
    let mut conn = match store.conn().await {
        Ok(conn) => conn,
        Err(err) => return fail_all(group, &err),
    };
    let orders: Vec<&PlaceOrder> = group.iter().map(|(order, _)| order).collect();
    let debits = order_saga::debit(&mut conn, store.keys(), shard, &orders, &finishing).await;
    let debits = match debits {
        Ok(debits) => debits,
        // The finishing steps carried are left to a sweeper.
        Err(err) => return fail_all(group, &err),
    };
    for ((order, reply), debit) in group.into_iter().zip(debits) {
        match debit {
            Ok(Debit::Debited) => {
                // The admit stage outlives every debit call: the send only
                // fails at shutdown, and then the order's intent is swept.
                let _ = admit.send((order, reply));
            }
            Ok(Debit::Replayed(order_id)) => {
                let answer = match order_saga::complete(&mut conn, store.keys(), &order_id).await {
                    Ok(_) => Ok(PlaceOrderOutcome::Replayed(order_id)),
                    Err(err) => Err(group_failed(&err)),
                };
                let _ = reply.send(answer);
            }
            Err(refused) => {
                let _ = reply.send(Err(refused));
            }
        }
    }
}

/// A `finish_orders.lua` call for admitted orders of one customer shard. A
/// failure leaves them to a sweeper: the orders stand either way.
async fn finish_group(store: &Store, shard: Shard, orders: Vec<(OrderId, String)>) {
    let finished = match store.conn().await {
        Ok(mut conn) => order_saga::finish(&mut conn, store.keys(), shard, &orders).await,
        Err(err) => Err(err),
    };
    if let Err(err) = finished {
        tracing::warn!(error = %err, "finishing orders failed; a sweeper will");
    }
}

/// The admit stage: groups debited orders per symbol's home shard into
/// `admit_orders.lua` calls, answers each order, and hands it back to the
/// debit stage for finishing.
async fn admit_stage(
    store: Store,
    mut debited: mpsc::UnboundedReceiver<Pending>,
    finish: mpsc::UnboundedSender<Admitted>,
) {
    let in_flight = Arc::new(Semaphore::new(ADMISSIONS_IN_FLIGHT_MAX));
    let mut queues = ShardQueues::default();
    let queue = |queues: &mut ShardQueues<Shard, Pending>, pending: Pending| {
        let shard = store.keys().shard_of_symbol(&pending.0.symbol);
        queues.push(shard, pending);
    };
    loop {
        if queues.waiting == 0 {
            match debited.recv().await {
                Some(pending) => queue(&mut queues, pending),
                None => return,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        while let Ok(pending) = debited.try_recv() {
            queue(&mut queues, pending);
        }
        let Some((_, group)) = queues.next_group() else {
            continue;
        };
        let store = store.clone();
        let finish = finish.clone();
        tokio::spawn(async move {
            let _permit = permit;
            admit_group(&store, group, &finish).await;
        });
    }
}

/// One `admit_orders.lua` call for debited orders of one home shard; every
/// order gets its answer. A failure leaves them debited and not admitted:
/// their answer says the outcome is unknown, and a sweeper (or a retry with
/// the same Idempotency-Key) admits them.
async fn admit_group(store: &Store, group: Vec<Pending>, finish: &mpsc::UnboundedSender<Admitted>) {
    let admissions: Vec<Admission> = group
        .iter()
        .map(|(order, _)| Admission::of(order))
        .collect();
    let admitted = match store.conn().await {
        Ok(mut conn) => order_saga::admit(&mut conn, store.keys(), &admissions).await,
        Err(err) => Err(err),
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        // The orders are debited either way.
        Err(err) => return answer_all(group, &err.to_string(), true),
    };
    for ((order, reply), admitted) in group.into_iter().zip(admitted) {
        let _ = reply.send(Ok(match admitted.batch_id {
            Some(batch_id) => PlaceOrderOutcome::Settling(batch_id),
            None => PlaceOrderOutcome::Pending,
        }));
        let shard = store.keys().account_shard(&order.account_id);
        let _ = finish.send((shard, order.order_id, admitted.epoch));
    }
}

fn group_failed(err: &StoreError) -> PlaceOrderError {
    PlaceOrderError::Store(StoreError::GroupFailed {
        message: err.to_string(),
        outcome_unknown: err.outcome_unknown(),
    })
}

/// Answers every order of a group whose call failed as a whole.
fn fail_all(group: Vec<Pending>, err: &StoreError) {
    answer_all(group, &err.to_string(), err.outcome_unknown());
}

fn answer_all(group: Vec<Pending>, message: &str, outcome_unknown: bool) {
    for (_, reply) in group {
        let _ = reply.send(Err(PlaceOrderError::Store(StoreError::GroupFailed {
            message: message.to_owned(),
            outcome_unknown,
        })));
    }
}
