//! Settlement workers: buy each batch from the exchange, then settle it,
//! retry it later, or dead-letter it.
//!
//! The batch id is the exchange's client order id, and the exchange fills a
//! client order id once, so calling it again after a crash or a timeout is
//! safe: each batch is bought exactly once.

use std::collections::HashMap;
use std::time::Duration;

use tracing::Instrument;

use crate::domain::{BatchId, Quantity, Symbol};
use crate::exchange::{Exchange, ExchangeOrder};
use crate::store::settlement::{self as scripts, JobEnd, JobRef};
use crate::store::{Store, keys, now_ms};
use crate::workers::{Delivery, JobHandler, backoff};

#[derive(Debug, Clone)]
pub struct SettlementSettings {
    /// Exchange calls per batch before it is dead-lettered.
    pub attempts_max: u32,
    /// First retry delay; each further one doubles, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Most due retries moved back onto the stream per read.
    pub promote_limit: usize,
}

/// One settle job, as it travels on the stream.
#[derive(Debug, Clone)]
pub struct SettleJob {
    pub batch_id: BatchId,
    pub symbol: Symbol,
    pub quantity: Quantity,
    /// 1 for the first call to the exchange.
    pub attempt: u32,
}

impl SettleJob {
    pub fn parse(fields: &HashMap<String, String>) -> Result<Self, String> {
        let field = |name: &str| {
            fields
                .get(name)
                .map(String::as_str)
                .ok_or(format!("no `{name}`"))
        };
        let units: i64 = field("quantity_units")?
            .parse()
            .map_err(|_| "bad quantity_units")?;
        Ok(SettleJob {
            batch_id: BatchId::parse(field("batch_id")?).map_err(|err| err.to_string())?,
            symbol: Symbol::parse(field("symbol")?).map_err(|err| err.to_string())?,
            quantity: Quantity::from_units(units).map_err(|err| err.to_string())?,
            attempt: fields
                .get("attempt")
                .map_or(Ok(1), |attempt| attempt.parse())
                .map_err(|_| "bad attempt")?,
        })
    }

    /// The job for the next attempt, as the JSON the retry schedule holds.
    fn next_attempt_json(&self) -> String {
        serde_json::json!({
            "batch_id": self.batch_id.to_string(),
            "symbol": self.symbol.as_str(),
            "quantity": self.quantity.to_string(),
            "quantity_units": self.quantity.units().to_string(),
            "attempt": (self.attempt + 1).to_string(),
        })
        .to_string()
    }
}

pub struct Settler<E> {
    store: Store,
    exchange: E,
    settings: SettlementSettings,
}

impl<E: Exchange> Settler<E> {
    pub fn new(store: Store, exchange: E, settings: SettlementSettings) -> Self {
        Settler {
            store,
            exchange,
            settings,
        }
    }

    async fn settle(&self, worker: &str, stream_id: &str, job: &SettleJob) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let job_ref = JobRef {
            stream_id,
            batch_id: &job.batch_id,
            worker,
        };
        if let JobEnd::Skipped(status) = scripts::begin_attempt(&mut conn, &job_ref).await? {
            // Another delivery already ended this batch: nothing left to do.
            tracing::info!(status, "batch no longer settling; job acknowledged");
            return Ok(());
        }
        drop(conn); // not held across the exchange call

        let order = ExchangeOrder {
            client_order_id: job.batch_id,
            symbol: job.symbol.clone(),
            quantity: job.quantity,
        };
        tracing::info!(symbol = %job.symbol, quantity = %job.quantity, "calling the exchange");
        let outcome = self.exchange.buy_from_exchange(&order).await;

        let mut conn = self.store.conn().await?;
        match outcome {
            Ok(fill) => {
                let end = scripts::finish_batch(&mut conn, &job_ref, &fill.fill_id).await?;
                tracing::info!(fill_id = %fill.fill_id, duplicate = fill.duplicate, ?end, "batch settled");
            }
            Err(err) if err.is_retryable() && job.attempt < self.settings.attempts_max => {
                let delay = backoff(
                    job.attempt,
                    self.settings.retry_base,
                    self.settings.retry_max,
                );
                let due_ms = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                let end = scripts::retry_batch(
                    &mut conn,
                    &job_ref,
                    due_ms,
                    &job.next_attempt_json(),
                    &err.to_string(),
                )
                .await?;
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, ?end, "exchange call failed; retry scheduled");
            }
            Err(err) => {
                let end =
                    scripts::dead_letter_batch(&mut conn, &job_ref, &err.to_string(), job.attempt)
                        .await?;
                tracing::error!(error = %err, ?end, "batch failed; moved to the dead-letter stream");
            }
        }
        Ok(())
    }

    /// A job that cannot be parsed goes to the dead-letter stream as it is.
    async fn quarantine(
        &self,
        worker: &str,
        delivery: &Delivery,
        problem: &str,
    ) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let mut fields: Vec<(&str, &str)> = delivery
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.push(("error", problem));
        fields.push(("worker", worker));
        redis::pipe()
            .atomic()
            .xadd(keys::SETTLE_DEAD_STREAM, "*", &fields)
            .xack(
                keys::SETTLE_STREAM,
                scripts::SETTLE_GROUP,
                &[&delivery.stream_id],
            )
            .query_async::<()>(&mut conn)
            .await?;
        tracing::error!(worker, stream_id = %delivery.stream_id, problem, "malformed settle job dead-lettered");
        Ok(())
    }
}

impl<E: Exchange + 'static> JobHandler for Settler<E> {
    async fn handle(&self, worker: &str, delivery: Delivery) -> anyhow::Result<()> {
        let job = match SettleJob::parse(&delivery.fields) {
            Ok(job) => job,
            Err(problem) => return self.quarantine(worker, &delivery, &problem).await,
        };
        let span =
            tracing::info_span!("settle", worker, batch_id = %job.batch_id, attempt = job.attempt);
        self.settle(worker, &delivery.stream_id, &job)
            .instrument(span)
            .await
    }

    async fn tick(&self) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let moved = scripts::promote_due_jobs(
            &mut conn,
            keys::SETTLE_RETRIES,
            keys::SETTLE_STREAM,
            now_ms(),
            self.settings.promote_limit,
        )
        .await?;
        if moved > 0 {
            tracing::debug!(moved, "due retries back on the settle stream");
        }
        Ok(())
    }
}

/// How often a worker process trims the journal past its retention window.
pub const JOURNAL_TRIM_INTERVAL: Duration = Duration::from_secs(60);
/// Most trim batches per round, so one round stays short.
const JOURNAL_TRIM_BATCHES_MAX: usize = 100;

/// Trims journal entries older than `retention`, once a minute, until shutdown.
/// Any number of workers may do this at once: each batch is one atomic script.
pub async fn trim_journal_periodically(
    store: Store,
    retention: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let cutoff_ms = u64::try_from(now_ms())
            .unwrap_or(0)
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let trimmed = match store.conn().await {
            Ok(mut conn) => {
                crate::store::journal::trim(&mut conn, cutoff_ms, JOURNAL_TRIM_BATCHES_MAX).await
            }
            Err(err) => Err(err),
        };
        match trimmed {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "journal entries past retention trimmed"),
            Err(err) => tracing::warn!(error = %err, "trimming the journal failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(JOURNAL_TRIM_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
