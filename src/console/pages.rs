//! What every console page shares: the chrome around it, and how figures
//! and failures are shown. Each page reads O(its page size) from Redis; the
//! overview reads nothing of its own (it renders the shared snapshot).

use askama::Template;
use poem::Response;
use poem::http::StatusCode;

use super::auth::{Viewer, html, message, rendering_failed};
use crate::domain::format_units;
use crate::store::StoreError;

/// What every page shows around its content.
pub struct Chrome {
    pub title: String,
    pub key_id: String,
    pub role: String,
    pub may_act: bool,
    /// The session's CSRF token; empty for a bearer key.
    pub csrf: String,
}

impl Chrome {
    pub(super) fn new(title: impl Into<String>, viewer: &Viewer) -> Self {
        Chrome {
            title: title.into(),
            key_id: viewer.caller.key_id.to_string(),
            role: viewer.caller.role.as_str().to_owned(),
            may_act: viewer.may_act(),
            csrf: viewer.csrf.clone().unwrap_or_default(),
        }
    }
}

pub(super) fn usd(cents: i64) -> String {
    format_units(cents, 2)
}

/// A duration as people read it: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub(super) fn age(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3_600 => format!("{} min", seconds / 60),
        3_600..86_400 => format!("{} h {} min", seconds / 3_600, seconds % 3_600 / 60),
        _ => format!("{} d {} h", seconds / 86_400, seconds % 86_400 / 3_600),
    }
}

pub(super) fn rfc3339(ms: i64) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(super) fn render(template: &impl Template, status: StatusCode) -> Response {
    match template.render() {
        Ok(body) => html(status, body),
        Err(err) => rendering_failed(err),
    }
}

pub(super) fn store_failed(err: StoreError) -> Response {
    tracing::warn!(error = %err, "console: a Redis read failed");
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "Redis did not answer; try again shortly.",
    )
}

/// The answer to a page cursor this console did not make.
pub(super) fn bad_cursor() -> Response {
    message(
        StatusCode::BAD_REQUEST,
        "Bad cursor",
        "That page cursor is not one this console made.",
    )
}
