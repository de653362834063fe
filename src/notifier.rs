//! Accounting notifications: the consumer group `notifiers` delivers every
//! event on the events stream to the accounting webhook.
//!
//! Contract: at least once. Each POST carries the event's unique id (its
//! stream id) as `event_id` in the body and in `X-Tally-Event-Id`; receivers
//! deduplicate on it. The body is signed: `X-Tally-Signature:
//! sha256=<hex HMAC-SHA256 of the body with TALLY_WEBHOOK_SECRET>`. A delivery
//! that fails is retried with exponential backoff and jitter; after
//! `attempts_max` it goes to the `tally:events:dead` stream. With no webhook
//! configured, each event is logged as one structured line instead.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::store::{Store, keys};
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

impl Notifier {
    /// Delivers one event with retries; `None` once delivered, or the last
    /// error once `attempts_max` deliveries failed.
    async fn deliver_with_retries(
        &self,
        worker: &str,
        url: &str,
        event_id: &str,
        body: &str,
    ) -> Option<String> {
        for attempt in 1..=self.settings.attempts_max {
            match self.deliver(url, event_id, body).await {
                Ok(()) => return None,
                Err(error) if attempt < self.settings.attempts_max => {
                    let delay = backoff(attempt, self.settings.retry_base, self.settings.retry_max);
                    tracing::warn!(
                        worker,
                        event_id,
                        attempt,
                        error,
                        "delivery failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::error!(
                        worker,
                        event_id,
                        attempt,
                        error,
                        "delivery failed for good; dead-lettered"
                    );
                    return Some(error);
                }
            }
        }
        Some("no delivery attempted".to_owned())
    }
}

fn event_body(delivery: &Delivery) -> anyhow::Result<String> {
    let mut event: BTreeMap<&str, &str> = delivery
        .fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    event.insert("event_id", &delivery.stream_id);
    Ok(serde_json::to_string(&event)?)
}

impl JobHandler for Notifier {
    async fn handle(&self, worker: &str, delivery: Delivery) -> anyhow::Result<()> {
        self.handle_all(worker, vec![delivery]).await;
        Ok(())
    }

    /// Delivers a read's events concurrently, then acknowledges them all in
    /// one step (dead letters included): one round trip per read, not per event.
    async fn handle_all(&self, worker: &str, deliveries: Vec<Delivery>) {
        let outcomes = deliveries.iter().map(|delivery| async move {
            let body = match event_body(delivery) {
                Ok(body) => body,
                Err(err) => return (delivery.stream_id.clone(), String::new(), Some(err.to_string())),
            };
            let dead = match &self.settings.webhook_url {
                None => {
                    tracing::info!(target: "tally::events", worker, event = %body, "accounting event");
                    None
                }
                Some(url) => self.deliver_with_retries(worker, url, &delivery.stream_id, &body).await,
            };
            (delivery.stream_id.clone(), body, dead)
        });
        let outcomes = join_all(outcomes).await;
        let acknowledged = async {
            let mut conn = self.store.conn().await?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (_, body, dead) in &outcomes {
                if let Some(error) = dead {
                    pipe.xadd(
                        keys::EVENTS_DEAD_STREAM,
                        "*",
                        &[("event", body.as_str()), ("error", error.as_str())],
                    );
                }
            }
            let ids: Vec<&str> = outcomes.iter().map(|(id, _, _)| id.as_str()).collect();
            pipe.xack(keys::EVENTS_STREAM, NOTIFY_GROUP, &ids);
            pipe.query_async::<()>(&mut conn).await?;
            anyhow::Ok(())
        };
        if let Err(err) = acknowledged.await {
            // Left pending: delivered again later (at least once).
            tracing::warn!(worker, error = %err, "acknowledging events failed");
        }
    }
}
