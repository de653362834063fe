//! The sweepers of the sagas that cross shards (orders, transfers, refunds): every
//! worker process runs one over every shard, finishing what a crash left
//! half done.

use crate::store::{Store, StoreResult, order_saga, refund_saga, transfer_saga};

/// How often a worker process sweeps every shard for sagas left unfinished
/// (a process died between two steps).
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Finishes the order, transfer and refund sagas left unfinished past their
/// takeover time, on every shard, every [`SWEEP_INTERVAL`] until shutdown.
/// Any number of workers may do this at once: each takes its intents under a
/// lease, and every step is safe to run twice.
pub async fn sweep_periodically(store: Store, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        for shard in store.keys().shards() {
            match sweep_shard(&store, shard).await {
                Ok((
                    order_saga::Swept {
                        finished: 0,
                        too_old: 0,
                    },
                    0,
                    0,
                )) => {}
                Ok((orders, transfers, refunds)) => tracing::info!(
                    shard = shard.index(),
                    orders_finished = orders.finished,
                    orders_too_old = orders.too_old,
                    transfers_finished = transfers,
                    refunds_finished = refunds,
                    "unfinished sagas swept"
                ),
                Err(err) => {
                    tracing::warn!(shard = shard.index(), error = %err, "sweeping sagas failed")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn sweep_shard(
    store: &Store,
    shard: crate::store::slots::Shard,
) -> StoreResult<(order_saga::Swept, usize, usize)> {
    let mut conn = store.conn().await?;
    let now = crate::store::now_ms();
    let orders = order_saga::sweep(&mut conn, store.keys(), shard, now).await?;
    let transfers = transfer_saga::sweep(&mut conn, store.keys(), shard, now).await?;
    let refunds = refund_saga::sweep(&mut conn, store.keys(), shard, now).await?;
    Ok((orders, transfers, refunds))
}
