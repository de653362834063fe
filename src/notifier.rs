//! Accounting notifications: the consumer group `notifiers` delivers every
//! event on the events stream to the accounting webhook.
//!
//! Contract: at least once. Each POST carries the event's unique id (its
//! stream id) as `event_id` in the body and in `X-Tally-Event-Id`; receivers
//! deduplicate on it. The body is signed: `X-Tally-Signature:
//! sha256=<hex HMAC-SHA256 of the body with TALLY_WEBHOOK_SECRET>`. A delivery
//! that fails is retried with exponential backoff and jitter, from a schedule
//! (`tally:events:retries`) moved back onto the stream when due, with the
//! event's first id kept; after `attempts_max` it goes to `tally:events:dead`. With no webhook
//! configured, each event is logged as one structured line instead.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::RETRY_PROMOTE_LIMIT_DEFAULT;
use crate::store::slots::Shard;
use crate::store::{Store, now_ms};
use futures::future::join_all;

use crate::workers::{Delivery, JobHandler, backoff};

/// The consumer group of the notifiers.
pub const NOTIFY_GROUP: &str = "notifiers";

#[derive(Debug, Clone)]
pub struct NotifierSettings {
    pub webhook_url: Option<String>,
    pub secret: String,
    pub attempts_max: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub timeout: Duration,
}

pub struct Notifier {
    store: Store,
    client: reqwest::Client,
    settings: NotifierSettings,
}

impl Notifier {
    pub fn new(store: Store, settings: NotifierSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()?;
        Ok(Notifier {
            store,
            client,
            settings,
        })
    }

    async fn deliver(&self, url: &str, event_id: &str, body: &str) -> Result<(), String> {
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("X-Tally-Event-Id", event_id)
            .header(
                "X-Tally-Signature",
                format!("sha256={}", sign(&self.settings.secret, body)),
            )
            .body(body.to_owned())
            .send()
            .await
            .map_err(|err| err.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", response.status()))
        }
    }
}

/// `hex(HMAC-SHA256(secret, body))`.
pub fn sign(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// How one delivery attempt ended.
enum Attempt {
    Delivered,
    /// Failed; try again at `due_ms` with this job (JSON for the retry schedule).
    Retry {
        due_ms: i64,
        job: String,
    },
    /// Failed for good: the body and the last error, for the dead-letter stream.
    Dead {
        body: String,
        error: String,
    },
}

impl Notifier {
    /// One delivery attempt of one event. Retries are not slept through here:
    /// they go on a schedule, so a consumer never holds an event longer than
    /// one webhook call (well inside `claim_idle_ms`).
    async fn attempt(&self, worker: &str, shard: Shard, delivery: &Delivery) -> Attempt {
        // A retried event keeps the id it was first written with: receivers
        // dedupe on it. Each shard has its own events stream, so the id names
        // the shard before the stream id.
        let event_id = delivery
            .fields
            .get("event_id")
            .cloned()
            .unwrap_or_else(|| format!("s{}-{}", shard.index(), delivery.stream_id));
        let attempt: u32 = delivery
            .fields
            .get("attempt")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let event = || {
            let mut event: BTreeMap<String, String> = delivery
                .fields
                .iter()
                .filter(|(name, _)| name.as_str() != "attempt")
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            event.insert("event_id".to_owned(), event_id.clone());
            event
        };
        let Some(url) = &self.settings.webhook_url else {
            // Built only when the line is logged: at `warn` (as `tally bench` runs) it is not.
            if tracing::enabled!(target: "tally::events", tracing::Level::INFO) {
                let body = serde_json::to_string(&event()).unwrap_or_default();
                tracing::info!(target: "tally::events", worker, event = %body, "accounting event");
            }
            return Attempt::Delivered;
        };
        let mut event = event();
        let body = serde_json::to_string(&event).unwrap_or_default();
        let error = match self.deliver(url, &event_id, &body).await {
            Ok(()) => return Attempt::Delivered,
            Err(error) => error,
        };
        if attempt >= self.settings.attempts_max {
            tracing::error!(
                worker,
                event_id,
                attempt,
                error,
                "delivery failed for good; dead-lettered"
            );
            return Attempt::Dead { body, error };
        }
        let delay = backoff(attempt, self.settings.retry_base, self.settings.retry_max);
        tracing::warn!(
            worker,
            event_id,
            attempt,
            error,
            retry_in_ms = delay.as_millis() as u64,
            "delivery failed; retry scheduled"
        );
        event.insert("attempt".to_owned(), (attempt + 1).to_string());
        let job = serde_json::to_string(&event).unwrap_or_default();
        Attempt::Retry {
            due_ms: now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            job,
        }
    }
}

impl JobHandler for Notifier {
    async fn handle(&self, worker: &str, shard: Shard, delivery: Delivery) -> anyhow::Result<()> {
        self.handle_all(worker, shard, vec![delivery]).await;
        Ok(())
    }

    /// Attempts a read's events concurrently, then in one atomic step
    /// schedules the retries, dead-letters what failed for good and
    /// acknowledges them all: one round trip per read, not per event.
    async fn handle_all(&self, worker: &str, shard: Shard, deliveries: Vec<Delivery>) {
        let keys = self.store.keys();
        let attempts = join_all(
            deliveries
                .iter()
                .map(|delivery| self.attempt(worker, shard, delivery)),
        )
        .await;
        let acknowledged = async {
            let mut conn = self.store.conn().await?;
            let mut pipe = redis::pipe();
            // MULTI/EXEC only when something besides the XACK is written.
            if attempts
                .iter()
                .any(|attempt| !matches!(attempt, Attempt::Delivered))
            {
                pipe.atomic();
            }
            for attempt in &attempts {
                match attempt {
                    Attempt::Delivered => {}
                    Attempt::Retry { due_ms, job } => {
                        pipe.zadd(keys.events_retries(shard), job, *due_ms);
                    }
                    Attempt::Dead { body, error } => {
                        pipe.xadd(
                            keys.events_dead(shard),
                            "*",
                            &[("event", body.as_str()), ("error", error.as_str())],
                        );
                    }
                }
            }
            let ids: Vec<&str> = deliveries
                .iter()
                .map(|delivery| delivery.stream_id.as_str())
                .collect();
            pipe.xack(keys.events(shard), NOTIFY_GROUP, &ids);
            pipe.query_async::<()>(&mut conn).await?;
            anyhow::Ok(())
        };
        if let Err(err) = acknowledged.await {
            // Left pending: delivered again later (at least once).
            tracing::warn!(worker, error = %err, "acknowledging events failed");
        }
    }

    /// Moves due retries back onto the events stream.
    async fn tick(&self, shard: Shard) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let keys = self.store.keys();
        crate::store::settlement::promote_due_jobs(
            &mut conn,
            &keys.events_retries(shard),
            &keys.events(shard),
            now_ms(),
            RETRY_PROMOTE_LIMIT_DEFAULT,
        )
        .await?;
        Ok(())
    }
}
