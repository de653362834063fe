//! The operator log: who did what, when, and the money it moved.

use std::sync::Arc;

use askama::Template;
use poem::http::StatusCode;
use poem::web::{Data, Query};
use poem::{Response, handler};

use super::Console;
use super::auth::Viewer;
use super::batches::PageQuery;
use super::pages::{Chrome, bad_cursor, render, rfc3339, store_failed};
use crate::store::console::{LoggedAction, operator_log_page, parse_log_cursor};

pub struct LogLine {
    /// The batch page of a batch action.
    pub link: Option<String>,
    pub at: String,
    pub key_id: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub effect: String,
    pub note: String,
    pub via: String,
}

impl From<&LoggedAction> for LogLine {
    fn from(logged: &LoggedAction) -> Self {
        let action = &logged.action;
        LogLine {
            link: matches!(action.action.as_str(), "retry" | "refund")
                .then(|| format!("/ops/batches/{}", action.target)),
            at: rfc3339(logged.id.ms as i64),
            key_id: action.key_id.clone(),
            role: action.role.clone(),
            action: action.action.clone(),
            target: action.target.clone(),
            effect: action.effect.clone(),
            note: action.note.clone(),
            via: action.via.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "log.html")]
struct LogPage {
    chrome: Chrome,
    entries: Vec<LogLine>,
    next: Option<String>,
}

#[handler]
pub async fn log_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<PageQuery>,
) -> Response {
    let state = &console.state;
    let keys = state.store.keys();
    let limit = state.api.console.page_size;
    let before = match query
        .before
        .as_deref()
        .map(|text| parse_log_cursor(text, keys))
    {
        Some(None) => {
            return bad_cursor();
        }
        Some(Some(before)) => Some(before),
        None => None,
    };
    let read = async {
        let mut conn = state.store.conn().await?;
        operator_log_page(&mut conn, keys, before, limit).await
    };
    let page = match read.await {
        Ok(page) => page,
        Err(err) => return store_failed(err),
    };
    let next = (page.len() == limit)
        .then(|| page.last().map(LoggedAction::cursor))
        .flatten();
    let page = LogPage {
        chrome: Chrome::new("Operator log", &viewer),
        entries: page.iter().map(LogLine::from).collect(),
        next,
    };
    render(&page, StatusCode::OK)
}
