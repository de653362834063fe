//! `/transactions`: the journal of the last days (retention configurable),
//! newest first, paged inside a snapshot.
//!
//! The first page pins a snapshot: the newest entry at that moment (`as_of`).
//! Every later page of the listing, by `cursor` or by `page`, reads inside the
//! same window, so entries written after the first page never appear and none
//! shift between pages. Cursors carry the window and are signed (HMAC-SHA256),
//! so a forged or edited one is refused.

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sha2::Sha256;

use super::problem::ApiError;
use super::schema::Timestamp;
use super::{ApiTags, AppState, page_size, rfc3339};
use crate::domain::format_units;
use crate::store::journal::{self, JournalEntry, index_member};
use crate::store::now_ms;

/// Highest page number accepted with `page=`.
pub const REPORT_PAGE_MAX: u64 = 1_000_000;

pub struct ReportApi(pub Arc<AppState>);

#[derive(Debug, Object)]
struct ReportEntry {
    /// The journal entry's id (a Redis stream id: time-ordered).
    id: String,
    timestamp: String,
    /// `opening_balance`, `order`, `settlement`, `refund`, `transfer`, `bank_transaction`.
    kind: String,
    /// The account money left.
    debit_account_id: String,
    /// The account money reached.
    credit_account_id: String,
    /// USD moved: 0.00 when the operation failed.
    amount: String,
    /// USD asked for, when it differs from what moved (failed transfers).
    #[oai(skip_serializing_if_is_none)]
    requested_amount: Option<String>,
    /// `completed` or `failed`.
    status: String,
    /// Why it failed, or what it was for.
    #[oai(skip_serializing_if_is_none)]
    reason: Option<String>,
    /// The order, batch, account or transaction the entry belongs to.
    reference: String,
}

impl From<JournalEntry> for ReportEntry {
    fn from(entry: JournalEntry) -> Self {
        let field = |name: &str| entry.fields.get(name).cloned().unwrap_or_default();
        let usd = |name: &str| {
            entry
                .fields
                .get(name)
                .and_then(|cents| cents.parse().ok())
                .map(|cents| format_units(cents, 2))
        };
        let amount = usd("amount").unwrap_or_else(|| "0.00".to_owned());
        let requested_amount = usd("requested").filter(|requested| *requested != amount);
        let reason = [field("reason"), field("memo")]
            .into_iter()
            .find(|text| !text.is_empty());
        ReportEntry {
            timestamp: rfc3339(field("at").parse().unwrap_or(0)),
            kind: field("kind"),
            debit_account_id: field("debit"),
            credit_account_id: field("credit"),
            amount,
            requested_amount,
            status: field("status"),
            reason,
            reference: field("ref"),
            id: entry.id,
        }
    }
}

#[derive(Debug, Object)]
struct ReportPage {
    items: Vec<ReportEntry>,
    /// The snapshot: the listing holds nothing written after this.
    as_of: String,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
    /// Entries in the whole listing (the snapshot's window).
    total_count: u64,
    total_pages: u64,
    /// This page's number, from 1.
    page: u64,
    limit: u64,
}

#[derive(ApiResponse)]
enum ReportResponse {
    #[oai(status = 200)]
    Ok(Json<ReportPage>),
}

/// A listing's window and place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// Newest entry at the first page (an index member), or empty for an empty journal.
    as_of: String,
    low: String,
    high: String,
    limit: usize,
    offset: usize,
}

impl Cursor {
    fn payload(&self) -> String {
        format!(
            "{}.{}.{}.{}.{}",
            self.as_of, self.low, self.high, self.limit, self.offset
        )
    }

    fn encode(&self, secret: &str) -> String {
        let payload = self.payload();
        format!("{payload}.{}", signature(secret, &payload))
    }

    fn decode(text: &str, secret: &str) -> Option<Self> {
        let (payload, signed) = text.rsplit_once('.')?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&hex::decode(signed).ok()?).ok()?;
        let mut parts = payload.split('.');
        let cursor = Cursor {
            as_of: parts.next()?.to_owned(),
            low: parts.next()?.to_owned(),
            high: parts.next()?.to_owned(),
            limit: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(cursor)
    }
}

fn signature(secret: &str, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[OpenApi(tag = "ApiTags::Report")]
impl ReportApi {
    /// Journal entries of every kind, newest first, from the retention window
    /// (5 days by default). The first page pins a snapshot (`as_of`); follow
    /// `next_cursor`, or ask for `page=N` with the same `cursor`, and every page
    /// comes from that snapshot.
    ///
    /// Role: `read`, `ops`, `bank` or `admin`.
    #[oai(path = "/transactions", method = "get", operation_id = "listJournal")]
    async fn transactions(
        &self,
        auth: super::access::ApiKey,
        /// Earliest entry time, RFC 3339 (default: the start of the retention
        /// window). Not with `cursor`, which fixes the window (422).
        start: Query<Option<Timestamp>>,
        /// Latest entry time, RFC 3339, inclusive (default: now); not before
        /// `start` (422). Not with `cursor` (422).
        end: Query<Option<Timestamp>>,
        /// Page size (default 20, at most the configured maximum).
        limit: Query<Option<u32>>,
        /// `next_cursor` from the previous page: continues the same snapshot.
        /// Opaque and signed: one this server did not issue answers 422.
        #[oai(validator(min_length = 1, max_length = 512))]
        cursor: Query<Option<String>>,
        /// A page number, from 1, in the snapshot of `cursor` (or a new one).
        page: Query<Option<u64>>,
    ) -> Result<ReportResponse, ApiError> {
        auth.require_reader()?;
        if page
            .0
            .is_some_and(|page| page == 0 || page > REPORT_PAGE_MAX)
        {
            let detail = format!("page must be between 1 and {REPORT_PAGE_MAX}");
            return Err(ApiError::bad_request("invalid-page", detail));
        }
        let mut listing = match &cursor.0 {
            Some(text) => {
                // Rules between parameters, which the schema cannot state: 422.
                if start.0.is_some() || end.0.is_some() {
                    return Err(ApiError::unprocessable(
                        "invalid-cursor",
                        "a cursor already fixes start and end",
                    ));
                }
                let listing = Cursor::decode(text, &self.0.api.cursor_secret).ok_or_else(|| {
                    ApiError::unprocessable(
                        "invalid-cursor",
                        "the cursor is malformed or was altered",
                    )
                })?;
                // The signature proves the cursor came from a tally API, yet
                // its numbers are still checked: a leaked secret must not turn
                // into a panic (limit 0) or an unbounded page.
                let in_bounds = (1..=self.0.api.page_size_max).contains(&listing.limit)
                    && listing.offset <= REPORT_PAGE_MAX as usize * listing.limit;
                if !in_bounds {
                    return Err(ApiError::unprocessable(
                        "invalid-cursor",
                        "the cursor's limit or offset is out of bounds",
                    ));
                }
                if limit.0.is_some_and(|limit| limit as usize != listing.limit) {
                    return Err(ApiError::unprocessable(
                        "invalid-limit",
                        "limit must match the cursor's",
                    ));
                }
                listing
            }
            None => {
                self.new_listing(
                    start.0.map(|at| at.0),
                    end.0.map(|at| at.0),
                    page_size(limit.0, &self.0.api)?,
                )
                .await?
            }
        };
        if let Some(page) = page.0 {
            listing.offset = (page as usize - 1) * listing.limit;
        }
        let (total, entries) = if listing.as_of.is_empty() {
            (0, Vec::new())
        } else {
            let mut conn = self.0.store.conn().await?;
            journal::page(
                &mut conn,
                &listing.low,
                &listing.high,
                listing.offset,
                listing.limit,
            )
            .await?
        };
        let next_offset = listing.offset + listing.limit;
        let next_cursor = (next_offset < total).then(|| {
            Cursor {
                offset: next_offset,
                ..listing.clone()
            }
            .encode(&self.0.api.cursor_secret)
        });
        let as_of_ms = listing
            .as_of
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(now_ms);
        Ok(ReportResponse::Ok(Json(ReportPage {
            items: entries.into_iter().map(ReportEntry::from).collect(),
            as_of: rfc3339(as_of_ms),
            next_cursor,
            total_count: total as u64,
            total_pages: total.div_ceil(listing.limit) as u64,
            page: (listing.offset / listing.limit) as u64 + 1,
            limit: listing.limit as u64,
        })))
    }
}

impl ReportApi {
    /// A new snapshot: the window `[start, end]` clipped to retention, up to
    /// the newest entry now.
    async fn new_listing(
        &self,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: usize,
    ) -> Result<Cursor, ApiError> {
        let now = u64::try_from(now_ms()).unwrap_or(0);
        let retention =
            u64::try_from(self.0.ledger.journal_retention.as_millis()).unwrap_or(u64::MAX);
        let floor = now.saturating_sub(retention);
        if let (Some(start_ms), Some(end_ms)) = (start_ms, end_ms)
            && start_ms > end_ms
        {
            return Err(ApiError::unprocessable(
                "invalid-time",
                "start must not be after end",
            ));
        }
        // Index members pad ms to 13 digits, so a time in the future (a 14th
        // digit from 2286) would compare wrongly as text: clamp both ends. A
        // start after now leaves low above high, and a window wholly outside
        // retention or in the future is simply empty.
        let start_ms = start_ms.unwrap_or(floor).min(now + 1);
        let end_ms = end_ms.unwrap_or(now).min(now);
        let mut conn = self.0.store.conn().await?;
        let as_of = journal::newest_member(&mut conn).await?.unwrap_or_default();
        let high = index_member(end_ms, 9_999_999_999).min(as_of.clone());
        Ok(Cursor {
            as_of,
            low: index_member(start_ms.max(floor), 0),
            high,
            limit,
            offset: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_tampering() {
        let cursor = Cursor {
            as_of: index_member(20, 3),
            low: index_member(1, 0),
            high: index_member(20, 3),
            limit: 50,
            offset: 100,
        };
        let text = cursor.encode("secret");
        assert_eq!(Cursor::decode(&text, "secret"), Some(cursor));
        assert_eq!(Cursor::decode(&text, "other secret"), None);
        assert_eq!(
            Cursor::decode(&text.replace(".100.", ".150."), "secret"),
            None
        );
        assert_eq!(Cursor::decode("nonsense", "secret"), None);
    }
}
