//! Wallet workers: deposits, withdrawals and card payments, applied per
//! account in the order they were accepted.
//!
//! The wallet stream holds at most one job per account (a flag set on
//! enqueue, cleared on release), so one worker at a time works an account's
//! queue, head first. A crash leaves the job pending; another worker takes it
//! over and continues from the queue's head, where each apply is a no-op if
//! the head it names was already applied.

use tracing::Instrument;

use crate::domain::AccountId;
use crate::store::Store;
use crate::store::slots::Shard;
use crate::store::wallet::{self, Applied};
use crate::workers::{Delivery, JobHandler};

/// Most transactions one delivery applies before the account goes to the
/// back of the stream, so one busy account cannot starve the others.
pub const WALLET_BATCH_MAX: usize = 100;

pub struct WalletWorker {
    store: Store,
}

impl WalletWorker {
    pub fn new(store: Store) -> Self {
        WalletWorker { store }
    }

    async fn work_account(
        &self,
        worker: &str,
        account: &AccountId,
        stream_id: &str,
    ) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let keys = self.store.keys();
        for _ in 0..WALLET_BATCH_MAX {
            let Some(txn_id) = wallet::queue_head(&mut conn, keys, account).await? else {
                break;
            };
            let txn = wallet::get(&mut conn, keys, &txn_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("queued transaction {txn_id} has no record"))?;
            let applied =
                wallet::apply(&mut conn, keys, account, &txn_id, txn.kind, worker).await?;
            match &applied {
                Applied::Completed => {
                    tracing::info!(worker, transaction_id = %txn_id, kind = txn.kind.as_str(), amount = %txn.amount, "completed")
                }
                Applied::Rejected(reason) => {
                    tracing::warn!(worker, transaction_id = %txn_id, kind = txn.kind.as_str(), amount = %txn.amount, reason, "rejected")
                }
                Applied::Skipped => {
                    tracing::info!(worker, transaction_id = %txn_id, "already applied by another delivery")
                }
            }
        }
        wallet::release(&mut conn, keys, account, stream_id).await?;
        Ok(())
    }
}

impl JobHandler for WalletWorker {
    async fn handle(&self, worker: &str, shard: Shard, delivery: Delivery) -> anyhow::Result<()> {
        // Only an account of this shard: its job could have come from no other stream.
        let account = delivery
            .fields
            .get("account_id")
            .and_then(|id| AccountId::parse(id).ok())
            .filter(|id| self.store.keys().shard_of_account(id) == Some(shard));
        let Some(account) = account else {
            // No delivery will ever read it: keep it for an operator instead.
            let mut conn = self.store.conn().await?;
            crate::store::streams::dead_letter_unreadable(
                &mut conn,
                self.store.keys(),
                shard,
                &wallet::WALLET_JOBS,
                &delivery.stream_id,
                &delivery.fields,
                "the job names no account of this shard",
                worker,
            )
            .await?;
            tracing::error!(worker, stream_id = %delivery.stream_id, "wallet job names no account: dead-lettered");
            return Ok(());
        };
        let span = tracing::info_span!("wallet", worker, account_id = %account);
        self.work_account(worker, &account, &delivery.stream_id)
            .instrument(span)
            .await
    }
}
