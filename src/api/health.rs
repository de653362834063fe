//! Liveness and readiness.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::Data;
use poem::{IntoResponse, Response, handler};

use super::AppState;
use super::problem::{Problem, problem_response};

/// The process is up.
#[handler]
pub async fn health() -> &'static str {
    "ok"
}

/// Redis answers and the scripts are loaded.
#[handler]
pub async fn ready(state: Data<&Arc<AppState>>) -> Response {
    match state.store.ready().await {
        Ok(()) => "ready".into_response(),
        Err(err) => {
            // The error stays in the log: /ready is open to anyone, and
            // Redis's error text can name hosts and configuration.
            tracing::warn!(error = %err, "not ready");
            problem_response(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "the ledger store is not ready",
            ))
        }
    }
}
