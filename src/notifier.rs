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

    async fn acknowledge(&self, stream_id: &str, dead: Option<(&str, &str)>) -> anyhow::Result<()> {
        let mut conn = self.store.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some((body, error)) = dead {
            pipe.xadd(
                keys::EVENTS_DEAD_STREAM,
                "*",
                &[("event", body), ("error", error)],
            );
        }
        pipe.xack(keys::EVENTS_STREAM, NOTIFY_GROUP, &[stream_id]);
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

/// `hex(HMAC-SHA256(secret, body))`.
pub fn sign(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl JobHandler for Notifier {
    async fn handle(&self, worker: &str, delivery: Delivery) -> anyhow::Result<()> {
        let mut event: BTreeMap<&str, &str> = delivery
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        event.insert("event_id", &delivery.stream_id);
        let body = serde_json::to_string(&event)?;
        let Some(url) = &self.settings.webhook_url else {
            tracing::info!(target: "tally::events", worker, event = %body, "accounting event");
            return self.acknowledge(&delivery.stream_id, None).await;
        };
        for attempt in 1..=self.settings.attempts_max {
            match self.deliver(url, &delivery.stream_id, &body).await {
                Ok(()) => {
                    tracing::debug!(worker, event_id = %delivery.stream_id, attempt, "event delivered");
                    return self.acknowledge(&delivery.stream_id, None).await;
                }
                Err(error) if attempt < self.settings.attempts_max => {
                    let delay = backoff(attempt, self.settings.retry_base, self.settings.retry_max);
                    tracing::warn!(worker, event_id = %delivery.stream_id, attempt, error, "delivery failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::error!(worker, event_id = %delivery.stream_id, attempt, error, "delivery failed for good; dead-lettered");
                    return self
                        .acknowledge(&delivery.stream_id, Some((&body, &error)))
                        .await;
                }
            }
        }
        Ok(())
    }
}
