//! `tally exchange-sim`: a stand-in international exchange over HTTP.
//!
//! - `POST /v1/orders {symbol, quantity, client_order_id}` fills once per
//!   client order id; a repeat returns the first fill marked `duplicate`.
//! - `GET /v1/orders` lists every client order id with its fill (if any) and
//!   the times of every call it got, so tests can count and time them.
//! - `PUT /v1/faults {latency_ms, fail_rate, reject_rate}` changes the faults
//!   at run time: `fail_rate` answers 503, `reject_rate` answers 422.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::web::{Data, Json};
use poem::{EndpointExt, IntoResponse, Response, Route, Server, get, handler, post, put};
use serde::{Deserialize, Serialize};

use super::Fill;
use crate::domain::{Quantity, Symbol};
use crate::store::now_ms;

/// Client order ids remembered; beyond this the simulator refuses new ones (507).
pub const SIM_ORDERS_MAX: usize = 1_000_000;
/// Calls remembered per client order id (the count goes on past it).
pub const SIM_CALL_TIMES_MAX: usize = 100;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Faults {
    #[serde(default)]
    pub latency_ms: u64,
    /// Fraction of calls answered 503, from 0 to 1.
    #[serde(default)]
    pub fail_rate: f64,
    /// Fraction of calls answered 422, from 0 to 1.
    #[serde(default)]
    pub reject_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimOrder {
    pub client_order_id: String,
    pub symbol: String,
    pub quantity: String,
    pub fill: Option<Fill>,
    /// Every call this client order id got, failed ones included.
    pub calls: u64,
    /// When the first calls arrived, ms since the Unix epoch.
    pub call_times_ms: Vec<i64>,
}

#[derive(Default)]
struct SimState {
    faults: Mutex<Faults>,
    orders: Mutex<BTreeMap<String, SimOrder>>,
}

#[derive(Deserialize)]
struct OrderBody {
    symbol: String,
    quantity: String,
    client_order_id: String,
}

pub struct ExchangeSim {
    acceptor: TcpAcceptor,
    address: String,
    state: Arc<SimState>,
}

impl ExchangeSim {
    pub async fn bind(listen: std::net::SocketAddr, faults: Faults) -> anyhow::Result<Self> {
        let acceptor = TcpListener::bind(listen).into_acceptor().await?;
        let address = format!("http://{}", acceptor.local_addr()[0]).replace("socket://", "");
        let state = Arc::new(SimState::default());
        *state.faults.lock().expect("fault lock") = faults;
        Ok(ExchangeSim {
            acceptor,
            address,
            state,
        })
    }

    /// `http://host:port`, ready for `TALLY_EXCHANGE_URL`.
    pub fn url(&self) -> &str {
        &self.address
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tracing::info!(url = %self.address, "exchange-sim listening");
        let app = Route::new()
            .at("/v1/orders", post(place).get(list))
            .at("/v1/faults", put(set_faults).get(get_faults))
            .at("/health", get(health))
            .data(self.state);
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_secs(5)))
            .await
    }
}

#[handler]
async fn health() -> &'static str {
    "ok"
}

#[handler]
async fn place(state: Data<&Arc<SimState>>, body: Json<OrderBody>) -> Response {
    let (symbol, quantity) = match (
        Symbol::parse(&body.symbol),
        Quantity::parse_total(&body.quantity),
    ) {
        (Ok(symbol), Ok(quantity)) => (symbol, quantity),
        _ => return (StatusCode::BAD_REQUEST, "bad symbol or quantity").into_response(),
    };
    // Calls are counted on arrival, before the simulated latency, so a caller
    // killed mid-call still shows up.
    {
        let mut orders = state.orders.lock().expect("orders lock");
        if !orders.contains_key(&body.client_order_id) && orders.len() >= SIM_ORDERS_MAX {
            return (StatusCode::INSUFFICIENT_STORAGE, "simulator full").into_response();
        }
        let order = orders
            .entry(body.client_order_id.clone())
            .or_insert_with(|| SimOrder {
                client_order_id: body.client_order_id.clone(),
                symbol: symbol.to_string(),
                quantity: quantity.to_string(),
                fill: None,
                calls: 0,
                call_times_ms: Vec::new(),
            });
        order.calls += 1;
        if order.call_times_ms.len() < SIM_CALL_TIMES_MAX {
            order.call_times_ms.push(now_ms());
        }
    }
    let faults = *state.faults.lock().expect("fault lock");
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let mut orders = state.orders.lock().expect("orders lock");
    let order = orders
        .get_mut(&body.client_order_id)
        .expect("recorded on arrival");
    if let Some(fill) = &order.fill {
        return Json(Fill {
            duplicate: true,
            ..fill.clone()
        })
        .into_response();
    }
    let draw = fastrand::f64();
    if draw < faults.fail_rate {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "exchange unavailable (simulated)",
        )
            .into_response();
    }
    if draw < faults.fail_rate + faults.reject_rate {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "order rejected (simulated)",
        )
            .into_response();
    }
    let fill = Fill {
        fill_id: format!("fill-{}", uuid::Uuid::now_v7()),
        client_order_id: body.client_order_id.clone(),
        symbol: symbol.to_string(),
        quantity: quantity.to_string(),
        duplicate: false,
    };
    order.fill = Some(fill.clone());
    Json(fill).into_response()
}

#[handler]
async fn list(state: Data<&Arc<SimState>>) -> Json<Vec<SimOrder>> {
    Json(
        state
            .orders
            .lock()
            .expect("orders lock")
            .values()
            .cloned()
            .collect(),
    )
}

#[handler]
async fn set_faults(state: Data<&Arc<SimState>>, faults: Json<Faults>) -> Response {
    let valid = (0.0..=1.0).contains(&faults.fail_rate)
        && (0.0..=1.0).contains(&faults.reject_rate)
        && faults.latency_ms <= 600_000;
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            "rates are 0 to 1; latency at most 600000 ms",
        )
            .into_response();
    }
    *state.faults.lock().expect("fault lock") = faults.0;
    Json(faults.0).into_response()
}

#[handler]
async fn get_faults(state: Data<&Arc<SimState>>) -> Json<Faults> {
    Json(*state.faults.lock().expect("fault lock"))
}
