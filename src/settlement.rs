//! Settlement workers: buy each batch from the exchange, then settle it,
//! retry it later, or dead-letter it.
//!
//! The batch id is the exchange's client order id, and the exchange fills a
//! client order id once, so calling it again after a crash or a timeout is
//! safe: each batch is bought exactly once.

use std::collections::HashMap;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::domain::{BatchId, Quantity, Symbol};
use crate::exchange::{Exchange, ExchangeError, ExchangeOrder};
use crate::store::settlement::{self as scripts, Begun, Filled, JobRef};
use crate::store::slots::Shard;
use crate::store::{Store, now_ms};
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
            quantity: Quantity::from_total_units(units).map_err(|err| err.to_string())?,
            attempt: fields
                .get("attempt")
                .map_or(Ok(1), |attempt| attempt.parse())
                .map_err(|_| "bad attempt")?,
        })
    }

    /// The job for attempt `next`, as the JSON the retry schedule holds.
    fn next_attempt_json(&self, next: u32) -> String {
        serde_json::json!({
            "batch_id": self.batch_id.to_string(),
            "symbol": self.symbol.as_str(),
            "quantity": self.quantity.to_string(),
            "quantity_units": self.quantity.units().to_string(),
            "attempt": next.to_string(),
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

    /// Settles one read's jobs: one script counts every attempt, the exchange
    /// calls run concurrently, and the fills are settled as they arrive, each
    /// script call taking every fill that is in by then (group commit). A
    /// failed step leaves its jobs pending for re-delivery; the rest go on.
    async fn settle_read(&self, worker: &str, jobs: &[(String, SettleJob)]) -> anyhow::Result<()> {
        let refs: Vec<JobRef<'_>> = jobs
            .iter()
            .map(|(stream_id, job)| JobRef {
                stream_id,
                batch_id: &job.batch_id,
                worker,
            })
            .collect();
        let begun = {
            let mut conn = self.store.conn().await?;
            scripts::begin_attempts(&mut conn, self.store.keys(), &refs).await?
        }; // the connection is not held across the exchange calls

        let mut calls = FuturesUnordered::new();
        for ((job_ref, (_, job)), begun) in refs.iter().zip(jobs).zip(begun) {
            let attempt = match begun {
                Begun::Call { attempts } => attempts,
                Begun::Skipped(status) => {
                    // Another delivery already ended this batch: nothing left to do.
                    tracing::info!(worker, batch_id = %job.batch_id, attempt = job.attempt, status, "batch no longer settling; job acknowledged");
                    continue;
                }
            };
            tracing::debug!(worker, batch_id = %job.batch_id, attempt, symbol = %job.symbol, quantity = %job.quantity, "calling the exchange");
            calls.push(async move {
                let order = ExchangeOrder {
                    client_order_id: job.batch_id,
                    symbol: job.symbol.clone(),
                    quantity: job.quantity,
                };
                (
                    job_ref,
                    job,
                    attempt,
                    self.exchange.buy_from_exchange(&order).await,
                )
            });
        }

        let mut failed_steps = 0;
        while let Some(first) = calls.next().await {
            let mut answered = vec![first];
            while let Some(Some(next)) = calls.next().now_or_never() {
                answered.push(next);
            }
            let mut fills = Vec::new();
            for (job_ref, job, attempt, outcome) in answered {
                match outcome {
                    Ok(fill) => fills.push((job_ref, job, attempt, fill)),
                    Err(err) => {
                        if let Err(step) = self.end_failed_call(job_ref, job, attempt, err).await {
                            failed_steps += 1;
                            tracing::warn!(worker, batch_id = %job.batch_id, error = %step, "job left pending for re-delivery");
                        }
                    }
                }
            }
            if fills.is_empty() {
                continue;
            }
            let filled: Vec<Filled<'_>> = fills
                .iter()
                .map(|(job_ref, _, _, fill)| Filled {
                    job: **job_ref,
                    fill_id: &fill.fill_id,
                })
                .collect();
            let finished = match self.store.conn().await {
                Ok(mut conn) => {
                    scripts::finish_batches(&mut conn, self.store.keys(), worker, &filled).await
                }
                Err(err) => Err(err),
            };
            match finished {
                Ok(ends) => {
                    for ((job_ref, job, attempt, fill), end) in fills.iter().zip(ends) {
                        if let scripts::JobEnd::BalanceLimit(account) = &end {
                            let refused = self
                                .dead_letter_filled(job_ref, *attempt, &fill.fill_id, account)
                                .await;
                            if let Err(step) = refused {
                                failed_steps += 1;
                                tracing::warn!(worker, batch_id = %job.batch_id, error = %step, "job left pending for re-delivery");
                            }
                            continue;
                        }
                        tracing::info!(worker, batch_id = %job.batch_id, attempt = job.attempt, fill_id = %fill.fill_id, duplicate = fill.duplicate, ?end, "batch settled");
                    }
                }
                Err(err) => {
                    failed_steps += 1;
                    tracing::warn!(worker, batches = filled.len(), error = %err, "settling fills failed; jobs left pending for re-delivery");
                }
            }
        }
        if failed_steps > 0 {
            anyhow::bail!("{failed_steps} settlement steps failed; their jobs are left pending");
        }
        Ok(())
    }

    /// The exchange refused or could not be reached: retry later, or
    /// dead-letter. `attempt` is the batch's own count of calls, which also
    /// counts calls whose job was delivered again after a worker died.
    async fn end_failed_call(
        &self,
        job_ref: &JobRef<'_>,
        job: &SettleJob,
        attempt: u32,
        err: ExchangeError,
    ) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        if err.is_retryable() && attempt < self.settings.attempts_max {
            let delay = backoff(attempt, self.settings.retry_base, self.settings.retry_max);
            let due_ms = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            let end = scripts::retry_batch(
                &mut conn,
                self.store.keys(),
                job_ref,
                due_ms,
                &job.next_attempt_json(attempt + 1),
                &err.to_string(),
                err.may_have_filled(),
            )
            .await?;
            tracing::warn!(worker = job_ref.worker, batch_id = %job.batch_id, attempt, error = %err, retry_in_ms = delay.as_millis() as u64, ?end, "exchange call failed; retry scheduled");
        } else {
            let end = scripts::dead_letter_batch(
                &mut conn,
                self.store.keys(),
                job_ref,
                &err.to_string(),
                attempt,
                err.may_have_filled(),
            )
            .await?;
            tracing::error!(worker = job_ref.worker, batch_id = %job.batch_id, attempt, error = %err, ?end, "batch failed; moved to the dead-letter stream");
        }
        Ok(())
    }

    /// The exchange filled the batch, but settling it would take `account`
    /// (@exchange or @bank) past the balance limit, so `finish_batches`
    /// wrote nothing and left the job pending. Retrying cannot help until an
    /// operator brings that balance back, so the batch is dead-lettered at
    /// once, with the fill in its error: it stays `failed` with its money at
    /// @exchange, flagged as possibly filled so that a refund needs the
    /// operator's confirmation, until an operator retries it (the exchange
    /// fills a batch id once, so the retry settles this same fill).
    async fn dead_letter_filled(
        &self,
        job_ref: &JobRef<'_>,
        attempt: u32,
        fill_id: &str,
        account: &crate::domain::AccountId,
    ) -> anyhow::Result<()> {
        let error = format!(
            "the exchange filled it (fill {fill_id}), but settling it would take the balance of \
             account {account} past the largest amount held; retry the batch once that balance \
             is back in range"
        );
        let mut conn = self.store.conn().await?;
        let end = scripts::dead_letter_batch(
            &mut conn,
            self.store.keys(),
            job_ref,
            &error,
            attempt,
            true,
        )
        .await?;
        tracing::error!(worker = job_ref.worker, batch_id = %job_ref.batch_id, attempt, fill_id, %account, ?end, "filled batch not settled: a balance would pass the limit; dead-lettered for an operator to retry");
        Ok(())
    }

    /// Parses a read's deliveries; a job that cannot be parsed is quarantined.
    async fn parse_read(
        &self,
        worker: &str,
        shard: Shard,
        deliveries: Vec<Delivery>,
    ) -> anyhow::Result<Vec<(String, SettleJob)>> {
        let mut jobs = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match SettleJob::parse(&delivery.fields) {
                Ok(job) => jobs.push((delivery.stream_id, job)),
                Err(problem) => self.quarantine(worker, shard, &delivery, &problem).await?,
            }
        }
        Ok(jobs)
    }

    /// A job that cannot be parsed goes to the dead-letter stream. If it
    /// names a batch still settling, the batch fails with it, so an operator
    /// can retry or refund it: the customers' money must not wait forever on
    /// a job nobody can read.
    async fn quarantine(
        &self,
        worker: &str,
        shard: Shard,
        delivery: &Delivery,
        problem: &str,
    ) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let keys = self.store.keys();
        // Only a batch of this shard: its job could have come from no other stream.
        let batch_id = delivery
            .fields
            .get("batch_id")
            .and_then(|id| BatchId::parse(id).ok())
            .filter(|id| scripts::batch_shard(keys, id) == shard);
        if let Some(batch_id) = batch_id {
            let job = JobRef {
                stream_id: &delivery.stream_id,
                batch_id: &batch_id,
                worker,
            };
            let error = format!("unreadable settle job: {problem}");
            let end = scripts::dead_letter_batch(&mut conn, keys, &job, &error, 0, false).await?;
            if end == scripts::JobEnd::Done {
                tracing::error!(worker, stream_id = %delivery.stream_id, %batch_id, problem, "unreadable settle job: its batch failed and was dead-lettered");
                return Ok(());
            }
        }
        crate::store::streams::dead_letter_unreadable(
            &mut conn,
            keys,
            shard,
            &scripts::SETTLE_JOBS,
            &delivery.stream_id,
            &delivery.fields,
            problem,
            worker,
        )
        .await?;
        tracing::error!(worker, stream_id = %delivery.stream_id, problem, "malformed settle job dead-lettered");
        Ok(())
    }
}

impl<E: Exchange + 'static> JobHandler for Settler<E> {
    async fn handle(&self, worker: &str, shard: Shard, delivery: Delivery) -> anyhow::Result<()> {
        let jobs = self.parse_read(worker, shard, vec![delivery]).await?;
        self.settle_read(worker, &jobs).await
    }

    async fn handle_all(&self, worker: &str, shard: Shard, deliveries: Vec<Delivery>) {
        let read = async {
            let jobs = self.parse_read(worker, shard, deliveries).await?;
            self.settle_read(worker, &jobs).await
        };
        // A panic is a system failure like any other: the jobs stay pending.
        match AssertUnwindSafe(read).catch_unwind().await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(worker, error = %err, "settle read left jobs pending for re-delivery")
            }
            Err(_) => {
                tracing::error!(
                    worker,
                    "settlement panicked; jobs left pending for re-delivery"
                )
            }
        }
    }

    async fn tick(&self, shard: Shard) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let keys = self.store.keys();
        let moved = scripts::promote_due_jobs(
            &mut conn,
            &keys.settle_retries(shard),
            &keys.settle(shard),
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
