//! The international exchange: `buy_from_exchange` behind a small trait, its
//! HTTP client, and `exchange-sim`, a stand-in server for tests and demos.
//!
//! The contract: a purchase carries a client order id (tally's batch id);
//! the exchange fills each client order id once and answers a repeat with
//! the first fill. So tally may call at least once and still buy exactly once.

pub mod sim;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{BatchId, Quantity, Symbol};

/// One purchase from the exchange.
#[derive(Debug, Clone)]
pub struct ExchangeOrder {
    pub client_order_id: BatchId,
    pub symbol: Symbol,
    pub quantity: Quantity,
}

/// The exchange's answer to a purchase it filled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fill {
    pub fill_id: String,
    pub client_order_id: String,
    pub symbol: String,
    pub quantity: String,
    /// True when this answer repeats an earlier fill of the same client order id.
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// Worth trying again later: a refused connection, a 5xx. The exchange
    /// did not take the order.
    #[error("exchange unavailable: {0}")]
    Unavailable(String),
    /// Sent, but no answer came back (a timeout, a connection lost, a fill
    /// that could not be read): worth trying again, and the exchange may
    /// have filled it. A retry finds out, since it fills each id once.
    #[error("exchange did not answer: {0}")]
    NoAnswer(String),
    /// The exchange refused the order (4xx): trying again will not help.
    #[error("exchange rejected the order: {0}")]
    Rejected(String),
}

impl ExchangeError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ExchangeError::Unavailable(_) | ExchangeError::NoAnswer(_)
        )
    }

    /// The order may have been filled although no fill came back.
    pub fn may_have_filled(&self) -> bool {
        matches!(self, ExchangeError::NoAnswer(_))
    }
}

/// Buying from the exchange. One implementation speaks HTTP; tests use the
/// real `exchange-sim` server behind it.
pub trait Exchange: Send + Sync {
    fn buy_from_exchange(
        &self,
        order: &ExchangeOrder,
    ) -> impl Future<Output = Result<Fill, ExchangeError>> + Send;
}

#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    pub url: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// The exchange over HTTP: `POST {url}/v1/orders`.
#[derive(Clone)]
pub struct HttpExchange {
    client: reqwest::Client,
    /// Parsed once: parsing it on every call showed in the profile.
    orders_url: reqwest::Url,
}

/// Longest error text kept from an exchange answer.
const EXCHANGE_ERROR_LENGTH_MAX: usize = 200;

impl HttpExchange {
    pub fn new(settings: &ExchangeSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .build()?;
        let orders_url = format!("{}/v1/orders", settings.url.trim_end_matches('/'))
            .parse()
            .map_err(|err| anyhow::anyhow!("exchange URL `{}`: {err}", settings.url))?;
        Ok(HttpExchange { client, orders_url })
    }
}

#[derive(Serialize)]
struct OrderBody<'a> {
    symbol: &'a str,
    quantity: String,
    client_order_id: String,
}

impl Exchange for HttpExchange {
    async fn buy_from_exchange(&self, order: &ExchangeOrder) -> Result<Fill, ExchangeError> {
        let body = OrderBody {
            symbol: order.symbol.as_str(),
            quantity: order.quantity.to_string(),
            client_order_id: order.client_order_id.to_string(),
        };
        let response = self
            .client
            .post(self.orders_url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|err| {
                // Only a failed connection proves the order never arrived.
                if err.is_connect() {
                    ExchangeError::Unavailable(err.to_string())
                } else {
                    ExchangeError::NoAnswer(err.to_string())
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return response
                .json::<Fill>()
                .await
                .map_err(|err| ExchangeError::NoAnswer(format!("unreadable fill: {err}")));
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(EXCHANGE_ERROR_LENGTH_MAX).collect();
        let detail = format!("{status}: {text}");
        if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(ExchangeError::Rejected(detail))
        } else {
            Err(ExchangeError::Unavailable(detail))
        }
    }
}
