//! The console's pages, and the forms that act. Each page reads O(its page
//! size) from Redis; the overview reads nothing of its own (it renders the
//! shared snapshot).

use std::sync::Arc;

use askama::Template;
use poem::http::StatusCode;
use poem::web::{Data, Path, Query};
use poem::{Response, handler};
use serde::Deserialize;

use super::Console;
use super::auth::{FormFields, Viewer, html, message, rendering_failed};
use super::charts;
use super::snapshot::{CHART_WINDOW, Overview, SAMPLE_INTERVAL};
use crate::domain::{BatchId, format_units};
use crate::operator::{self, Via};
use crate::store::StoreError;
use crate::store::console::{LoggedAction, operator_log_page, parse_log_cursor};
use crate::store::dead_letters::{self, DeadLetter, Resolution, ResolveError};
use crate::store::keys::StreamKind;
use crate::store::orders::{Batch, SettlementStatus};
use crate::store::settlement::{OperatorError, failed_batches_after};

/// Refresh intervals the overview offers, in seconds; 0 pauses.
const REFRESH_CHOICES_S: [u64; 6] = [0, 2, 5, 10, 30, 60];
/// The overview's refresh unless the operator picks another.
const REFRESH_DEFAULT_S: u64 = 5;

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
fn age(ms: i64) -> String {
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

// --- the overview ---

pub struct MoneyLine {
    pub account: String,
    pub balance: String,
}

pub struct AuditLine {
    pub clean: bool,
    pub age: String,
    pub at: String,
    pub customers: String,
    pub accounts: u64,
    pub entries: u64,
    pub report: String,
}

pub struct ChartLine {
    pub title: &'static str,
    pub latest: String,
    /// Drawn by [`charts::line`]: numbers only, nothing from input.
    pub svg: String,
}

pub struct BucketLine {
    pub symbol: String,
    pub value: String,
    pub orders: i64,
    pub oldest: String,
}

pub struct StreamLine {
    pub label: &'static str,
    pub length: u64,
    pub pending: u64,
    pub lag: u64,
    pub consumers: u64,
    pub dead_letters: u64,
    pub oldest: String,
}

/// The overview's figures, formatted.
pub struct OverviewView {
    /// How far back the charts reach.
    pub flow_span: String,
    pub read_at: String,
    pub money: Vec<MoneyLine>,
    pub customers: String,
    pub audit: Option<AuditLine>,
    pub charts: Vec<ChartLine>,
    pub buckets: Vec<BucketLine>,
    pub settlement_lag: String,
    pub failed_batches: u64,
    pub settle_retries: u64,
    pub webhook_backlog: u64,
    pub oldest_event: String,
    pub streams: Vec<StreamLine>,
}

impl OverviewView {
    fn new(overview: &Overview, rates: &[(i64, f64, f64, f64)]) -> Self {
        let now = overview.read_at_ms;
        let money = overview
            .system_balances
            .iter()
            .map(|(account, cents)| MoneyLine {
                account: account.id().to_string(),
                balance: usd(*cents),
            })
            .collect();
        let audit = overview.audit.as_ref().map(|audit| AuditLine {
            clean: audit.clean,
            age: age(now - audit.at_ms),
            at: rfc3339(audit.at_ms),
            customers: usd(audit.customer_balances_cents),
            accounts: audit.accounts_checked,
            entries: audit.journal_entries,
            report: audit.report.clone(),
        });
        // The charts span the window, or less while the process has not
        // sampled for that long yet (so that what there is is legible).
        let sampled_ms = rates.first().map_or(0, |first| {
            now - first.0 + SAMPLE_INTERVAL.as_millis() as i64
        });
        let window_ms = (CHART_WINDOW.as_millis() as i64).min(sampled_ms.max(1));
        let series = |pick: fn(&(i64, f64, f64, f64)) -> f64| -> Vec<(i64, f64)> {
            rates.iter().map(|rate| (rate.0, pick(rate))).collect()
        };
        let chart = |title: &'static str, points: Vec<(i64, f64)>| ChartLine {
            title,
            latest: points.last().map_or_else(
                || "no samples yet".to_owned(),
                |(_, rate)| charts::format_rate(*rate),
            ),
            svg: charts::line(&points, now, window_ms, title),
        };
        let charts = vec![
            chart("Orders paid", series(|rate| rate.1)),
            chart("Batches settled", series(|rate| rate.2)),
            chart("Events delivered", series(|rate| rate.3)),
        ];
        let buckets = overview
            .buckets
            .iter()
            .map(|bucket| BucketLine {
                symbol: bucket.symbol.clone(),
                value: usd(bucket.value_cents),
                orders: bucket.orders,
                oldest: bucket.oldest_age_ms.map_or_else(|| "-".to_owned(), age),
            })
            .collect();
        let oldest = |kind: StreamKind| {
            overview
                .stream(kind)
                .and_then(|row| row.oldest_unfinished_age_ms)
                .map_or_else(|| "none".to_owned(), age)
        };
        let events = overview.stream(StreamKind::Events);
        OverviewView {
            flow_span: age(window_ms),
            read_at: rfc3339(now),
            money,
            customers: usd(overview.customer_balances_cents),
            audit,
            charts,
            buckets,
            settlement_lag: oldest(StreamKind::Settle),
            failed_batches: overview.failed_batches,
            settle_retries: overview.settle_retries,
            webhook_backlog: events.map_or(0, |row| row.pending + row.lag),
            oldest_event: oldest(StreamKind::Events),
            streams: overview
                .streams
                .iter()
                .map(|row| StreamLine {
                    label: row.label,
                    length: row.length,
                    pending: row.pending,
                    lag: row.lag,
                    consumers: row.consumers,
                    dead_letters: row.dead_letters,
                    oldest: row
                        .oldest_unfinished_age_ms
                        .map_or_else(|| "none".to_owned(), age),
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    chrome: Chrome,
    refresh_s: u64,
    refresh_choices: &'static [u64],
    o: OverviewView,
}

#[derive(Template)]
#[template(path = "overview_live.html")]
struct OverviewLive {
    o: OverviewView,
}

#[derive(Deserialize)]
pub struct OverviewQuery {
    refresh: Option<u64>,
    /// Only the live figures, for the script that refreshes them in place.
    live: Option<u8>,
}

#[handler]
pub async fn overview_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<OverviewQuery>,
) -> Response {
    let snapshot = match console.overview.current().await {
        Ok(snapshot) => snapshot,
        Err(err) => return store_failed(err),
    };
    let o = OverviewView::new(&snapshot, &console.overview.rates());
    if query.live == Some(1) {
        return render(&OverviewLive { o }, StatusCode::OK);
    }
    let refresh_s = query
        .refresh
        .filter(|seconds| REFRESH_CHOICES_S.contains(seconds))
        .unwrap_or(REFRESH_DEFAULT_S);
    let page = OverviewPage {
        chrome: Chrome::new("Overview", &viewer),
        refresh_s,
        refresh_choices: &REFRESH_CHOICES_S,
        o,
    };
    render(&page, StatusCode::OK)
}

// --- batches ---

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
    batches: Vec<BatchLine>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct PageQuery {
    /// Where the last page ended.
    after: Option<String>,
    before: Option<String>,
}

/// A failed-batches cursor: `failure ms:batch id`.
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
    let after = match query.after.as_deref().map(parse_batch_cursor) {
        Some(None) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Bad cursor",
                "That page cursor is not one this console made.",
            );
        }
        Some(Some(after)) => Some(after),
        None => None,
    };
    let read = async {
        let mut conn = state.store.conn().await?;
        let keys = state.store.keys();
        let page = failed_batches_after(
            &mut conn,
            keys,
            after.as_ref().map(|(s, id)| (*s, id)),
            limit,
        )
        .await?;
        let ids: Vec<BatchId> = page.iter().map(|(id, _)| *id).collect();
        let batches = crate::store::orders::get_batches(&mut conn, keys, &ids).await?;
        let lines: Vec<BatchLine> = batches
            .iter()
            .zip(&page)
            .filter_map(|(batch, (_, failed_at))| {
                batch
                    .as_ref()
                    .map(|batch| BatchLine::new(batch, Some(*failed_at)))
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
        chrome: Chrome::new("Failed batches", &viewer),
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
    let not_found = || {
        message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no batch with that id.",
        )
    };
    let id = BatchId::parse(id).map_err(|_| not_found())?;
    match operator::batch(&console.state.store, &id).await {
        Ok(Some(batch)) => Ok(batch),
        Ok(None) => Err(not_found()),
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
const NOTE_CHARS_MAX: usize = 200;

#[handler]
pub async fn retry_batch(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
) -> Response {
    let Ok(batch_id) = BatchId::parse(&id) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no batch with that id.",
        );
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
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no batch with that id.",
        );
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

// --- the operator log ---

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
            return message(
                StatusCode::BAD_REQUEST,
                "Bad cursor",
                "That page cursor is not one this console made.",
            );
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

// --- dead letters ---

/// The job streams whose dead letters the console lists, in its tabs.
const DEAD_LETTER_STREAMS: [StreamKind; 4] = [
    StreamKind::Events,
    StreamKind::Wallet,
    StreamKind::Installments,
    StreamKind::Settle,
];

fn stream_named(name: &str) -> Option<StreamKind> {
    DEAD_LETTER_STREAMS
        .into_iter()
        .find(|kind| kind.label() == name)
}

pub struct DeadLetterLine {
    pub name: String,
    pub at: String,
    pub error: String,
    /// The job's own fields, `name=value`.
    pub job: String,
    /// A dead settle job's batch, resolved on the batch's page.
    pub batch: Option<String>,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    chrome: Chrome,
    stream: &'static str,
    streams: Vec<&'static str>,
    /// Replayed and discarded here (a settle job is resolved by its batch).
    resolvable: bool,
    letters: Vec<DeadLetterLine>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct DeadLettersQuery {
    stream: Option<String>,
    after: Option<String>,
}

#[handler]
pub async fn dead_letters_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<DeadLettersQuery>,
) -> Response {
    let state = &console.state;
    let keys = state.store.keys();
    let Some(stream) = stream_named(query.stream.as_deref().unwrap_or("events")) else {
        return message(
            StatusCode::BAD_REQUEST,
            "Unknown stream",
            "Pick events, wallet, installments or settle.",
        );
    };
    let after = match query
        .after
        .as_deref()
        .map(|text| dead_letters::parse_cursor(text, keys))
    {
        Some(None) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Bad cursor",
                "That page cursor is not one this console made.",
            );
        }
        Some(Some(after)) => Some(after),
        None => None,
    };
    let limit = state.api.console.page_size;
    let read = async {
        let mut conn = state.store.conn().await?;
        dead_letters::page(&mut conn, keys, stream, after, limit).await
    };
    let letters = match read.await {
        Ok(letters) => letters,
        Err(err) => return store_failed(err),
    };
    let next = (letters.len() == limit)
        .then(|| letters.last().map(DeadLetter::cursor))
        .flatten();
    let lines = letters
        .iter()
        .map(|letter| DeadLetterLine {
            name: letter.cursor(),
            at: rfc3339(letter.id.ms as i64),
            error: letter.field("error").unwrap_or_default().to_owned(),
            job: letter
                .fields
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "error" | "worker" | "stream_id"))
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join("  "),
            batch: (stream == StreamKind::Settle)
                .then(|| letter.field("batch_id").map(str::to_owned))
                .flatten(),
        })
        .collect();
    let page = DeadLettersPage {
        chrome: Chrome::new("Dead letters", &viewer),
        stream: stream.label(),
        streams: DEAD_LETTER_STREAMS
            .iter()
            .map(|kind| kind.label())
            .collect(),
        resolvable: stream != StreamKind::Settle,
        letters: lines,
        next,
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "resolved.html")]
struct ResolvedPage {
    chrome: Chrome,
    title: String,
    effect: String,
    stream: &'static str,
}

async fn resolve(
    console: &Console,
    viewer: &Viewer,
    stream: &str,
    letter: &str,
    resolution: Resolution,
    fields: &FormFields,
) -> Response {
    let Some(stream) = stream_named(stream) else {
        return message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such stream.",
        );
    };
    let reason = fields.get("reason").unwrap_or_default().trim();
    if (resolution == Resolution::Discard && reason.is_empty())
        || reason.chars().count() > NOTE_CHARS_MAX
        || reason.chars().any(char::is_control)
    {
        return message(
            StatusCode::BAD_REQUEST,
            "Refused",
            &format!(
                "Give a reason of 1 to {NOTE_CHARS_MAX} characters, on one line (a discard needs one). Nothing was done."
            ),
        );
    }
    let resolved = operator::resolve_dead_letter(
        &console.state.store,
        &viewer.caller,
        stream,
        letter,
        resolution,
        reason,
        Via::Console,
    )
    .await;
    match resolved {
        Ok(effect) => render(
            &ResolvedPage {
                chrome: Chrome::new("Resolved", viewer),
                title: format!(
                    "Dead letter {letter} {}",
                    match resolution {
                        Resolution::Replay => "replayed",
                        Resolution::Discard => "discarded",
                    }
                ),
                effect,
                stream: stream.label(),
            },
            StatusCode::OK,
        ),
        Err(ResolveError::Store(err)) => store_failed(err),
        Err(err @ ResolveError::Missing) => message(
            StatusCode::CONFLICT,
            "Refused",
            &format!("{err}. Nothing was done."),
        ),
        Err(err) => message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Refused",
            &format!("{err}. Nothing was done."),
        ),
    }
}

#[handler]
pub async fn replay_dead_letter(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    path: Path<(String, String)>,
    fields: Data<&FormFields>,
) -> Response {
    let Path((stream, letter)) = path;
    resolve(
        &console,
        &viewer,
        &stream,
        &letter,
        Resolution::Replay,
        &fields,
    )
    .await
}

#[handler]
pub async fn discard_dead_letter(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    path: Path<(String, String)>,
    fields: Data<&FormFields>,
) -> Response {
    let Path((stream, letter)) = path;
    resolve(
        &console,
        &viewer,
        &stream,
        &letter,
        Resolution::Discard,
        &fields,
    )
    .await
}
