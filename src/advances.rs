//! Advances repaid in weekly installments: the scheduler that leases due
//! installments, and the workers that collect them exactly once.
//!
//! An installment is in exactly one place: the due set (scheduled), the
//! lease set (processing: handed to a worker until the lease expires), or
//! recorded as paid or failed in its advance. The lease is the token: the
//! collecting script removes it in the same step that pays, so a second
//! delivery (a re-claimed job, an expired lease re-queued while the first
//! worker was only slow) finds no lease and does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::domain::AccountId;
use crate::store::advances::{self, Collected};
use crate::store::slots::Shard;
use crate::store::{Store, StoreError, now_ms};
use crate::workers::{Delivery, JobHandler};

/// Where "now" comes from: the system clock, or a hand-moved one in tests.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that moves only when told: tests step through weeks in an instant.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn starting_at(ms: i64) -> Self {
        ManualClock(AtomicI64::new(ms))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            i64::try_from(by.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// How long a worker holds an installment before it is handed to another.
    pub lease: Duration,
    /// How often the scheduler looks for due work.
    pub interval: Duration,
    /// Most installments leased per step.
    pub batch_max: usize,
}

/// One scheduler step at the clock's now; returns what `lease_due` does.
pub async fn schedule_once(
    store: &Store,
    clock: &dyn Clock,
    settings: &SchedulerSettings,
) -> anyhow::Result<(u64, u64, u64)> {
    let mut conn = store.conn().await?;
    let lease_ms = u64::try_from(settings.lease.as_millis()).unwrap_or(u64::MAX);
    let now_ms = clock.now_ms();
    let mut total = (0, 0, 0);
    for shard in store.keys().shards() {
        let (leased, requeued, extended) = advances::lease_due(
            &mut conn,
            store.keys(),
            shard,
            now_ms,
            lease_ms,
            settings.batch_max,
        )
        .await?;
        total = (total.0 + leased, total.1 + requeued, total.2 + extended);
    }
    Ok(total)
}

/// Runs the scheduler until shutdown. Any number may run at once.
pub async fn run_scheduler(
    store: Store,
    clock: Arc<dyn Clock>,
    settings: SchedulerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(
        lease_ms = settings.lease.as_millis() as u64,
        "scheduler started"
    );
    loop {
        match schedule_once(&store, clock.as_ref(), &settings).await {
            Ok((0, 0, 0)) => {}
            Ok((leased, requeued, extended)) => {
                tracing::info!(
                    leased,
                    requeued,
                    extended,
                    "installments handed to the collectors"
                )
            }
            Err(err) => tracing::warn!(error = %err, "scheduling failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    tracing::info!("scheduler stopped");
}

/// Collects installments from the installments stream.
pub struct Collector {
    store: Store,
    /// Most installments an advance may grow to; see `TALLY_INSTALLMENTS_MAX`.
    installments_max: u32,
}

impl Collector {
    pub fn new(store: Store, installments_max: u32) -> Self {
        Collector {
            store,
            installments_max,
        }
    }
}

impl Collector {
    /// Keeps a job no delivery will ever carry out for an operator (in
    /// `tally:installments:dead`), acknowledged, instead of handing it out
    /// forever.
    async fn dead_letter(
        &self,
        worker: &str,
        shard: Shard,
        delivery: &Delivery,
        problem: &str,
    ) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        crate::store::streams::dead_letter_unreadable(
            &mut conn,
            self.store.keys(),
            shard,
            &advances::INSTALLMENT_JOBS,
            &delivery.stream_id,
            &delivery.fields,
            problem,
            worker,
        )
        .await?;
        tracing::error!(worker, stream_id = %delivery.stream_id, problem, "installment job dead-lettered");
        Ok(())
    }
}

impl JobHandler for Collector {
    async fn handle(&self, worker: &str, shard: Shard, delivery: Delivery) -> anyhow::Result<()> {
        let keys = self.store.keys();
        let member = delivery
            .fields
            .get("installment")
            .cloned()
            .unwrap_or_default();
        let parsed = member
            .rsplit_once(':')
            .and_then(|(id, n)| Some((id.to_owned(), n.parse::<u32>().ok()?)))
            // Only an advance of this shard: its job could have come from no other stream.
            .filter(|(id, _)| keys.shard_of_text_id(id) == shard);
        let Some((advance_id, n)) = parsed else {
            return self
                .dead_letter(
                    worker,
                    shard,
                    &delivery,
                    "the job names no installment of this shard",
                )
                .await;
        };
        let span =
            tracing::info_span!("collect", worker, advance_id = %advance_id, installment = n);
        async {
            let mut conn = self.store.conn().await?;
            let advance = match advances::get(&mut conn, keys, &advance_id).await {
                Ok(Some(advance)) => advance,
                Ok(None) => {
                    let problem = format!("advance {advance_id} not found");
                    return self.dead_letter(worker, shard, &delivery, &problem).await;
                }
                Err(err @ StoreError::Corrupt { .. }) => {
                    return self
                        .dead_letter(worker, shard, &delivery, &err.to_string())
                        .await;
                }
                Err(err) => return Err(err.into()),
            };
            let account: AccountId = advance.account_id.clone();
            match advances::collect(
                &mut conn,
                keys,
                &advance_id,
                &account,
                n,
                &delivery.stream_id,
                worker,
                self.installments_max,
            )
            .await?
            {
                Collected::Paid(cents) => {
                    let remaining = advance.amount_cents - advance.paid_cents() - cents;
                    tracing::info!(cents, remaining_cents = remaining, "installment paid");
                    if remaining == 0 {
                        tracing::info!(account_id = %account, "advance fully repaid");
                    }
                }
                Collected::Failed { amount, carried_to } => {
                    tracing::warn!(
                        cents = amount,
                        carried_to,
                        "installment failed: insufficient funds; carried forward"
                    )
                }
                Collected::Skipped => tracing::info!("no lease: collected by another delivery"),
                Collected::BalanceLimit(account) => {
                    // Nothing was written and the lease stays, as for a
                    // malformed record: the lease's expiry queues the
                    // installment again, and it is collected once the
                    // balance is back in range. The job goes to the
                    // dead-letter stream so an operator sees why.
                    let problem = format!(
                        "paying it would take the balance of account {account} past the largest \
                         amount held; the installment stays leased and is queued again when the \
                         lease expires"
                    );
                    return self.dead_letter(worker, shard, &delivery, &problem).await;
                }
                Collected::Malformed(problem) => {
                    // Nothing was written and the lease stays: once an
                    // operator repairs the record, the lease's expiry queues
                    // the installment again.
                    return self.dead_letter(worker, shard, &delivery, &problem).await;
                }
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}
