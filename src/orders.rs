//! Purchase orders: pricing and the checks that come before the scripts,
//! and the grouping of concurrent orders.
//!
//! The API parses the request into domain types; this module prices it and
//! runs it through the order saga (`store::order_saga`): the debit on the
//! customer's shard, then the admission to its symbol's bucket on the
//! symbol's home shard, then the finishing step.

use crate::config::LedgerSettings;
use crate::domain::{AccountId, Idempotency, IdempotencyKey, Quantity, Symbol, order_cost};
use std::sync::{Arc, Mutex, Once};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::keys::Keys;
use crate::store::order_saga;
use crate::store::orders::{PlaceOrder, PlaceOrderError, PlaceOrderOutcome};
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
/// Script calls in flight at once on the shared connection.
pub const ORDER_GROUPS_IN_FLIGHT_MAX: usize = 4;

type Placed = Result<PlaceOrderOutcome, PlaceOrderError>;
/// An order waiting for its group, with where its answer goes.
type Pending = (PlaceOrder, oneshot::Sender<Placed>);

/// Groups concurrent orders into the saga's script calls: while the calls in
/// flight run, new orders queue, one queue per (customer shard, symbol's
/// home shard) since a call may only write one shard's keys, and the next
/// round takes a whole queue (up to [`ORDER_GROUP_MAX`]): one debit, one
/// admission and one finishing call for all of it. Under light load every
/// group holds one order, so nothing waits for a group to fill. Each order is
/// still checked and written on its own inside the scripts, and gets its own
/// answer.
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
            tokio::spawn(collect(self.store.clone(), receiver));
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

/// Orders waiting for their group, one queue per (customer shard, symbol's
/// home shard): a script call may only carry one queue's orders.
/// Orders of one (customer shard, home shard), each with its arrival number.
type ShardQueue = ((u16, u16), std::collections::VecDeque<(u64, Pending)>);

#[derive(Default)]
struct ShardQueues {
    queues: Vec<ShardQueue>,
    /// Orders queued so far, numbering each: the oldest waiting order's
    /// queue goes first.
    arrived: u64,
    waiting: usize,
}

impl ShardQueues {
    fn push(&mut self, keys: &Keys, pending: Pending) {
        let shard = (
            keys.account_shard(&pending.0.account_id).index(),
            keys.shard_of_symbol(&pending.0.symbol).index(),
        );
        self.arrived += 1;
        self.waiting += 1;
        let entry = (self.arrived, pending);
        match self.queues.iter_mut().find(|(of, _)| *of == shard) {
            Some((_, queue)) => queue.push_back(entry),
            None => self.queues.push((shard, [entry].into())),
        }
    }

    /// Up to [`ORDER_GROUP_MAX`] orders of the queue whose first order has
    /// waited longest: every shard's turn comes in arrival order, and
    /// carries all its orders that came meanwhile.
    fn next_group(&mut self) -> Option<Vec<Pending>> {
        let (_, queue) = self
            .queues
            .iter_mut()
            .filter(|(_, queue)| !queue.is_empty())
            .min_by_key(|(_, queue)| queue.front().map(|(arrived, _)| *arrived))?;
        let take = queue.len().min(ORDER_GROUP_MAX);
        self.waiting -= take;
        Some(queue.drain(..take).map(|(_, pending)| pending).collect())
    }
}

async fn collect(
    store: Store,
    mut receiver: mpsc::Receiver<(PlaceOrder, oneshot::Sender<Placed>)>,
) {
    let in_flight = Arc::new(Semaphore::new(ORDER_GROUPS_IN_FLIGHT_MAX));
    let mut queues = ShardQueues::default();
    loop {
        if queues.waiting == 0 {
            match receiver.recv().await {
                Some(pending) => queues.push(store.keys(), pending),
                None => return,
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
        while let Ok(pending) = receiver.try_recv() {
            queues.push(store.keys(), pending);
        }
        let Some(group) = queues.next_group() else {
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let _permit = permit;
            place_group(&store, group).await;
        });
    }
}

/// One group of one shard's orders through the order saga: debit, admit and
/// finish, then answer every order (a failure of the last step leaves the
/// intents to a sweeper, and the orders stand).
async fn place_group(store: &Store, group: Vec<Pending>) {
    let (orders, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let placed = match store.conn().await {
        Ok(mut conn) => order_saga::place_admitted(&mut conn, store.keys(), &orders)
            .await
            .map(|placed| (placed, conn)),
        Err(err) => Err(err),
    };
    match placed {
        Ok(((outcomes, finishing), mut conn)) => {
            // Finished before the answers, so that a placed order is wholly
            // written when its client hears of it. The orders are placed
            // either way: a failure here leaves them to a sweeper.
            if let Err(err) = finishing.run(&mut conn, store.keys()).await {
                tracing::warn!(error = %err, "finishing orders failed; a sweeper will");
            }
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(err) => {
            let message = err.to_string();
            let outcome_unknown = err.outcome_unknown();
            for reply in replies {
                let _ = reply.send(Err(PlaceOrderError::Store(StoreError::GroupFailed {
                    message: message.clone(),
                    outcome_unknown,
                })));
            }
        }
    }
}

/// How often a worker process sweeps every shard for order sagas left
/// unfinished (a process died between the debit and the finishing step).
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Finishes the order sagas left unfinished past their takeover time, on
/// every shard, every [`SWEEP_INTERVAL`] until shutdown. Any number of
/// workers may do this at once: each takes its intents under a lease, and
/// every step is safe to run twice.
pub async fn sweep_periodically(store: Store, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        for shard in store.keys().shards() {
            let swept = match store.conn().await {
                Ok(mut conn) => {
                    order_saga::sweep(&mut conn, store.keys(), shard, crate::store::now_ms()).await
                }
                Err(err) => Err(err),
            };
            match swept {
                Ok(order_saga::Swept {
                    finished: 0,
                    too_old: 0,
                }) => {}
                Ok(swept) => tracing::info!(
                    shard = shard.index(),
                    finished = swept.finished,
                    too_old = swept.too_old,
                    "unfinished order sagas swept"
                ),
                Err(err) => {
                    tracing::warn!(shard = shard.index(), error = %err, "sweeping order sagas failed")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
