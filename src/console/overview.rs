//! The overview: money first, then flow, from the shared snapshot.

use std::sync::Arc;

use askama::Template;
use poem::http::StatusCode;
use poem::web::{Data, Query};
use poem::{Response, handler};
use serde::Deserialize;

use super::Console;
use super::auth::Viewer;
use super::charts;
use super::pages::{Chrome, age, render, rfc3339, store_failed, usd};
use super::snapshot::{CHART_WINDOW, Overview, SAMPLE_INTERVAL};
use crate::store::keys::StreamKind;

/// Refresh intervals the overview offers, in seconds; 0 pauses.
const REFRESH_CHOICES_S: [u64; 6] = [0, 2, 5, 10, 30, 60];
/// The overview's refresh unless the operator picks another.
const REFRESH_DEFAULT_S: u64 = 5;

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
