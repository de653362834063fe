//! Batches: the failed ones and all of them, by cursor, a batch's page, and retry and refund,
//! each confirmed with the money effect the server computed.

use std::sync::Arc;

use askama::Template;
use poem::http::StatusCode;
use poem::web::{Data, Path, Query};
use poem::{Response, handler};
use serde::Deserialize;

use super::Console;
use super::auth::{FormFields, Viewer, message};
use super::pages::{Chrome, bad_cursor, render, rfc3339, store_failed};
use crate::domain::BatchId;
use crate::operator::{self, Via};
use crate::store::StoreError;
use crate::store::orders::{Batch, SettlementStatus};
use crate::store::settlement::{OperatorError, batches_before, failed_batches_after};

pub struct BatchLine {
    pub id: String,
    pub symbol: String,
    pub quantity: String,
    pub value: String,
    pub status: &'static str,
    pub orders: usize,
    pub attempts: i64,
    pub last_error: String,
    pub fill_unknown: bool,
    pub created: String,
    pub failed: String,
}

impl BatchLine {
    fn new(batch: &Batch, failed_at_ms: Option<i64>) -> Self {
        BatchLine {
            id: batch.id.to_string(),
            symbol: batch.symbol.to_string(),
            quantity: batch.quantity.to_string(),
            value: batch.value.to_string(),
            status: batch.status.as_str(),
            orders: batch.order_ids.len(),
            attempts: batch.attempts,
            last_error: batch.last_error.clone().unwrap_or_default(),
            fill_unknown: batch.fill_unknown,
            created: rfc3339(batch.created_at_ms),
            failed: failed_at_ms.map(rfc3339).unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "batches.html")]
struct BatchesPage {
    chrome: Chrome,
    /// Every batch, newest first, rather than the failed ones.
    all: bool,
    batches: Vec<BatchLine>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct PageQuery {
    /// Where the last page ended.
    pub(super) after: Option<String>,
    pub(super) before: Option<String>,
    /// `failed` (the default: oldest failure first) or `all` (newest first).
    pub(super) status: Option<String>,
}

fn no_batch() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no batch with that id.",
    )
}

/// A batches cursor: `failure (or creation) ms:batch id`.
fn parse_batch_cursor(text: &str) -> Option<(i64, BatchId)> {
    let (score, id) = text.split_once(':')?;
    Some((score.parse().ok()?, BatchId::parse(id).ok()?))
}

#[handler]
pub async fn failed_batches_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<PageQuery>,
) -> Response {
    let state = &console.state;
    let limit = state.api.console.page_size;
    let all = match query.status.as_deref() {
        None | Some("failed") => false,
        Some("all") => true,
        Some(_) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Unknown status",
                "Batches are listed failed (oldest failure first) or all (newest first).",
            );
        }
    };
    let cursor = if all { &query.before } else { &query.after };
    let after = match cursor.as_deref().map(parse_batch_cursor) {
        Some(None) => {
            return bad_cursor();
        }
        Some(Some(after)) => Some(after),
        None => None,
    };
    let read = async {
        let mut conn = state.store.conn().await?;
        let keys = state.store.keys();
        let cursor = after.as_ref().map(|(score, id)| (*score, id));
        let page = if all {
            batches_before(&mut conn, keys, cursor, limit).await?
        } else {
            failed_batches_after(&mut conn, keys, cursor, limit).await?
        };
        let ids: Vec<BatchId> = page.iter().map(|(id, _)| *id).collect();
        let batches = crate::store::orders::get_batches(&mut conn, keys, &ids).await?;
        let lines: Vec<BatchLine> = batches
            .iter()
            .zip(&page)
            .filter_map(|(batch, (_, failed_at))| {
                batch
                    .as_ref()
                    .map(|batch| BatchLine::new(batch, (!all).then_some(*failed_at)))
            })
            .collect();
        let next = (page.len() == limit)
            .then(|| page.last().map(|(id, score)| format!("{score}:{id}")))
            .flatten();
        Ok::<_, StoreError>((lines, next))
    };
    let (batches, next) = match read.await {
        Ok(read) => read,
        Err(err) => return store_failed(err),
    };
    let page = BatchesPage {
        chrome: Chrome::new(if all { "Batches" } else { "Failed batches" }, &viewer),
        all,
        batches,
        next,
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "batch.html")]
struct BatchPage {
    chrome: Chrome,
    batch: BatchLine,
    order_ids: Vec<String>,
    orders_more: usize,
}

/// The most order ids a batch's page lists (it counts them all).
const BATCH_ORDERS_SHOWN_MAX: usize = 100;

async fn read_batch(console: &Console, id: &str) -> Result<Batch, Response> {
    let id = BatchId::parse(id).map_err(|_| no_batch())?;
    match operator::batch(&console.state.store, &id).await {
        Ok(Some(batch)) => Ok(batch),
        Ok(None) => Err(no_batch()),
        Err(err) => Err(store_failed(err)),
    }
}

#[handler]
pub async fn batch_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
) -> Response {
    let batch = match read_batch(&console, &id).await {
        Ok(batch) => batch,
        Err(refusal) => return refusal,
    };
    let order_ids = batch
        .order_ids
        .iter()
        .take(BATCH_ORDERS_SHOWN_MAX)
        .map(ToString::to_string)
        .collect();
    let page = BatchPage {
        chrome: Chrome::new(format!("Batch {}", batch.id), &viewer),
        orders_more: batch.order_ids.len().saturating_sub(BATCH_ORDERS_SHOWN_MAX),
        order_ids,
        batch: BatchLine::new(&batch, None),
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    chrome: Chrome,
    batch: BatchLine,
    /// `retry` or `refund`.
    action: &'static str,
    effect: String,
    /// A refund of a batch an exchange call may have filled.
    may_be_filled: bool,
}

#[derive(Template)]
#[template(path = "done.html")]
struct DonePage {
    chrome: Chrome,
    title: String,
    effect: String,
    batch_id: String,
}

async fn confirm(console: &Console, viewer: &Viewer, id: &str, action: &'static str) -> Response {
    if !viewer.may_act() {
        return message(
            StatusCode::FORBIDDEN,
            "Refused",
            "This key may look but not act: acting needs an ops or admin key.",
        );
    }
    let batch = match read_batch(console, id).await {
        Ok(batch) => batch,
        Err(refusal) => return refusal,
    };
    if batch.status != SettlementStatus::Failed {
        return message(
            StatusCode::CONFLICT,
            "Not failed",
            &format!(
                "Batch {} is {}: only a failed batch is retried or refunded.",
                batch.id,
                batch.status.as_str()
            ),
        );
    }
    let effect = match action {
        "retry" => operator::retry_effect(&batch),
        _ => match operator::refund_effect(&console.state.store, &batch).await {
            Ok(effect) => effect.describe(),
            Err(err) => return store_failed(err),
        },
    };
    let page = ConfirmPage {
        chrome: Chrome::new(format!("Confirm {action}"), viewer),
        may_be_filled: action == "refund" && batch.fill_unknown,
        batch: BatchLine::new(&batch, None),
        action,
        effect,
    };
    render(&page, StatusCode::OK)
}

#[handler]
pub async fn confirm_retry(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
) -> Response {
    confirm(&console, &viewer, &id, "retry").await
}

#[handler]
pub async fn confirm_refund(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
) -> Response {
    confirm(&console, &viewer, &id, "refund").await
}

fn refused(err: OperatorError) -> Response {
    match err {
        OperatorError::NotFailed(id, status) if status == "missing" => message(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no batch {id}."),
        ),
        OperatorError::Store(err) => store_failed(err),
        err => message(
            StatusCode::CONFLICT,
            "Refused",
            &format!("{err}. Nothing was done."),
        ),
    }
}

/// The longest note an operator may give a refund (it lands in the journal).
pub(super) const NOTE_CHARS_MAX: usize = 200;

#[handler]
pub async fn retry_batch(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
) -> Response {
    let Ok(batch_id) = BatchId::parse(&id) else {
        return no_batch();
    };
    match operator::retry_batch(
        &console.state.store,
        &viewer.caller,
        &batch_id,
        Via::Console,
    )
    .await
    {
        Ok(effect) => render(
            &DonePage {
                chrome: Chrome::new("Retried", &viewer),
                title: format!("Batch {batch_id} is back on the settle stream"),
                effect,
                batch_id: batch_id.to_string(),
            },
            StatusCode::OK,
        ),
        Err(err) => refused(err),
    }
}

#[handler]
pub async fn refund_batch(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
    fields: Data<&FormFields>,
) -> Response {
    let Ok(batch_id) = BatchId::parse(&id) else {
        return no_batch();
    };
    let note = fields.get("note").unwrap_or_default().trim();
    if note.is_empty()
        || note.chars().count() > NOTE_CHARS_MAX
        || note.chars().any(char::is_control)
    {
        return message(
            StatusCode::BAD_REQUEST,
            "Refused",
            &format!(
                "Give a reason of 1 to {NOTE_CHARS_MAX} characters, on one line. Nothing was done."
            ),
        );
    }
    let confirmed_unfilled = fields.get("exchange_confirmed_unfilled") == Some("yes");
    let refunded = operator::refund_batch(
        &console.state.store,
        &viewer.caller,
        &batch_id,
        note,
        confirmed_unfilled,
        Via::Console,
    )
    .await;
    match refunded {
        Ok(effect) => render(
            &DonePage {
                chrome: Chrome::new("Refunded", &viewer),
                title: format!("Batch {batch_id} is refunded"),
                effect: effect.describe(),
                batch_id: batch_id.to_string(),
            },
            StatusCode::OK,
        ),
        Err(err) => refused(err),
    }
}

#[derive(Template)]
#[template(path = "bulk_done.html")]
struct BulkDonePage {
    chrome: Chrome,
    retried: Vec<String>,
    refused: Vec<(String, String)>,
}

/// Retries exactly the batches the form names (the ones the operator saw
/// and ticked), at most a page of them.
#[handler]
pub async fn retry_batches(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    fields: Data<&FormFields>,
) -> Response {
    let limit = console.state.api.console.page_size;
    let ids: Vec<&str> = fields.all("id").collect();
    if ids.is_empty() || ids.len() > limit {
        return message(
            StatusCode::BAD_REQUEST,
            "Refused",
            &format!("Tick 1 to {limit} batches of the page to retry. Nothing was done."),
        );
    }
    let mut retried = Vec::new();
    let mut refused = Vec::new();
    for id in ids {
        let Ok(batch_id) = BatchId::parse(id) else {
            refused.push((id.chars().take(64).collect(), "not a batch id".to_owned()));
            continue;
        };
        match operator::retry_batch(
            &console.state.store,
            &viewer.caller,
            &batch_id,
            Via::Console,
        )
        .await
        {
            Ok(_) => retried.push(batch_id.to_string()),
            Err(OperatorError::Store(err)) => return store_failed(err),
            Err(err) => refused.push((batch_id.to_string(), err.to_string())),
        }
    }
    let page = BulkDonePage {
        chrome: Chrome::new("Retried", &viewer),
        retried,
        refused,
    };
    render(&page, StatusCode::OK)
}
