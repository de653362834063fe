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
            tracing::warn!(error = %err, "not ready");
            let detail = format!("redis is not ready: {err}");
            problem_response(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                detail,
            ))
        }
    }
}
