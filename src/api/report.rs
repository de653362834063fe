//! `/transactions`: the journal of the last days (retention configurable),
//! newest first, paged inside a snapshot.
//!
//! Every shard keeps its own journal; the report merges them in the order
//! (entry id, shard), newest first. The first page pins a snapshot: each
//! shard's newest entry at that moment (`as_of` is the newest of them). Every
//! later page of the listing, by `cursor` or by `page`, reads inside the same
//! windows, so entries written after the first page never appear and none
//! shift between pages. Cursors carry the windows and where the last page
//! ended, and are signed (HMAC-SHA256), so a forged or edited one is refused.
//!
//! A next page (by cursor) starts after the last entry of the page before:
//! each shard gives at most a page from there, O(shards x page) whatever the
//! depth. A page by number first finds the millisecond its first entry was
//! written in, by bisection on per-shard counts (about 30 rounds of one count
//! per shard, however deep), then reads as a next page does.

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
    /// The journal entry's id: its shard journal's Redis stream id (time
    /// ordered), a dot, and the shard's number.
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
    /// `completed` or `failed`; `pending` for the first leg of a transfer
    /// between two shards run as a saga (payer to `@transit`), whose second
    /// leg (`@transit` to payee, `completed`) or reversal (`@transit` back
    /// to the payer, `failed`) follows.
    status: String,
    /// Why it failed, or what it was for.
    #[oai(skip_serializing_if_is_none)]
    reason: Option<String>,
    /// The order, batch, account or transaction the entry belongs to.
    reference: String,
}

impl ReportEntry {
    /// An entry of `shard`'s journal; its id names the shard, since stream
    /// ids alone repeat across shards.
    fn from_entry(entry: JournalEntry, shard: u16) -> Self {
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
            id: format!("{}.{shard}", entry.id),
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

/// A listing's windows and place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// Newest entry of any shard at the first page (an index member), or
    /// empty for an empty journal.
    as_of: String,
    low: String,
    /// Each shard's last entry in the window (an index member), `None` for
    /// a shard with nothing in it at the snapshot.
    highs: Vec<Option<String>>,
    limit: usize,
    offset: usize,
    /// The previous page's last entry, (index member, shard): a next page
    /// starts after it.
    after: Option<(String, u16)>,
}

/// An index member written short, as its stream id (`ms-seq`), to keep
/// cursors short; `-` for none.
fn short(member: Option<&str>) -> String {
    member
        .and_then(journal::stream_id)
        .unwrap_or_else(|| "-".to_owned())
}

/// A shard's member written relative to the snapshot's time `base_ms`
/// (which no shard's high or the last entry passes), in base 36:
/// `<base - ms>_<seq>`, so that a cursor grows by a few bytes per shard;
/// `-` for none.
fn relative(member: Option<&str>, base_ms: u64) -> String {
    let parsed = member.and_then(|member| {
        let (ms, seq) = member.split_once('-')?;
        Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
    });
    match parsed {
        Some((ms, seq)) if ms <= base_ms => {
            format!("{}_{}", base36(base_ms - ms), base36(seq))
        }
        _ => "-".to_owned(),
    }
}

/// The index member of a relative one; `None` for `-`, `Err` for junk.
fn absolute(text: &str, base_ms: u64) -> Result<Option<String>, ()> {
    if text == "-" {
        return Ok(None);
    }
    let (delta, seq) = text.split_once('_').ok_or(())?;
    let delta = u64::from_str_radix(delta, 36).map_err(|_| ())?;
    let seq = u64::from_str_radix(seq, 36).map_err(|_| ())?;
    let ms = base_ms.checked_sub(delta).ok_or(())?;
    Ok(Some(index_member(ms, seq)))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut digits = Vec::new();
    loop {
        digits.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).expect("ASCII digits")
}

/// The millisecond part of an index member (0 for none).
fn member_ms(member: &str) -> u64 {
    member
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// The index member of a short stream id; `None` for `-`, `Err` for junk.
fn long(text: &str) -> Result<Option<String>, ()> {
    if text == "-" {
        return Ok(None);
    }
    let (ms, seq) = text.split_once('-').ok_or(())?;
    Ok(Some(index_member(
        ms.parse().map_err(|_| ())?,
        seq.parse().map_err(|_| ())?,
    )))
}

impl Cursor {
    fn payload(&self) -> String {
        let base = member_ms(&self.as_of);
        let highs: Vec<String> = self
            .highs
            .iter()
            .map(|high| relative(high.as_deref(), base))
            .collect();
        let after = match &self.after {
            Some((member, shard)) => format!("{}~{shard}", relative(Some(member), base)),
            None => "-".to_owned(),
        };
        format!(
            "{}.{}.{}.{}.{}.{}",
            short(
                Some(&self.as_of)
                    .filter(|as_of| !as_of.is_empty())
                    .map(String::as_str)
            ),
            short(Some(&self.low)),
            highs.join(","),
            self.limit,
            self.offset,
            after
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
        let as_of = long(parts.next()?).ok()?.unwrap_or_default();
        let base = member_ms(&as_of);
        let low = long(parts.next()?).ok()??;
        let highs = parts
            .next()?
            .split(',')
            .map(|high| absolute(high, base))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let limit = parts.next()?.parse().ok()?;
        let offset = parts.next()?.parse().ok()?;
        let after = match parts.next()? {
            "-" => None,
            text => {
                let (member, shard) = text.split_once('~')?;
                Some((absolute(member, base).ok()??, shard.parse().ok()?))
            }
        };
        let cursor = Cursor {
            as_of,
            low,
            highs,
            limit,
            offset,
            after,
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
        #[oai(validator(min_length = 1, max_length = 1024))]
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
                    && listing.offset <= REPORT_PAGE_MAX as usize * listing.limit
                    && listing.highs.len() == usize::from(self.0.store.keys().layout().count())
                    && listing
                        .after
                        .as_ref()
                        .is_none_or(|(_, shard)| usize::from(*shard) < listing.highs.len());
                if !in_bounds {
                    return Err(ApiError::unprocessable(
                        "invalid-cursor",
                        "the cursor's limit, offset or shards are out of bounds",
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
            let offset = (page as usize - 1) * listing.limit;
            if offset != listing.offset {
                listing.offset = offset;
                listing.after = None; // found again by bisection
            }
        }
        let (total, entries, last) = if listing.as_of.is_empty() {
            (0, Vec::new(), None)
        } else {
            self.read_page(&listing).await?
        };
        let next_offset = listing.offset + listing.limit;
        let next_cursor = (next_offset < total && last.is_some()).then(|| {
            Cursor {
                offset: next_offset,
                after: last,
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
            items: entries,
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
        let newest = journal::newest_members(&mut conn, self.0.store.keys()).await?;
        let as_of = newest.iter().flatten().max().cloned().unwrap_or_default();
        let end = index_member(end_ms, 9_999_999_999);
        let highs = newest
            .into_iter()
            .map(|newest| newest.map(|newest| newest.min(end.clone())))
            .collect();
        Ok(Cursor {
            as_of,
            low: index_member(start_ms.max(floor), 0),
            highs,
            limit,
            offset: 0,
            after: None,
        })
    }

    /// The listing's page at its offset: each shard's part from where the
    /// page starts, merged newest first by (entry id, shard). Returns the
    /// windows' total, the page, and its last entry (where a next page starts).
    async fn read_page(
        &self,
        listing: &Cursor,
    ) -> Result<(usize, Vec<ReportEntry>, Option<(String, u16)>), ApiError> {
        let keys = self.0.store.keys();
        let mut conn = self.0.store.conn().await?;
        // Where each shard's part starts, and how many merged entries to skip.
        let (starts, skip): (Vec<Option<String>>, usize) = match (&listing.after, listing.offset) {
            (_, 0) => (
                listing
                    .highs
                    .iter()
                    .map(|high| high.as_ref().map(|high| format!("[{high}")))
                    .collect(),
                0,
            ),
            (Some((after, after_shard)), _) => (
                listing
                    .highs
                    .iter()
                    .enumerate()
                    .map(|(shard, high)| {
                        let high = high.as_ref()?;
                        // Order is (member, shard) descending: after (m, s)
                        // come m on lower shards, then anything below m.
                        Some(if after > high {
                            format!("[{high}")
                        } else if shard < usize::from(*after_shard) {
                            format!("[{after}")
                        } else {
                            format!("({after}")
                        })
                    })
                    .collect(),
                0,
            ),
            (None, offset) => {
                let Some((ms, skip)) = self.locate(&mut conn, listing, offset).await? else {
                    // Past the end: only the total is asked for.
                    let mut total = 0;
                    for (shard, high) in keys.shards().zip(&listing.highs) {
                        if let Some(high) = high {
                            total +=
                                journal::count_between(&mut conn, keys, shard, &listing.low, high)
                                    .await?;
                        }
                    }
                    return Ok((total, Vec::new(), None));
                };
                let bound = index_member(ms, 9_999_999_999);
                (
                    listing
                        .highs
                        .iter()
                        .map(|high| high.as_ref().map(|high| format!("[{}", high.min(&bound))))
                        .collect(),
                    skip,
                )
            }
        };
        let mut total = 0;
        let mut merged: Vec<(String, u16)> = Vec::new();
        for ((shard, high), start) in keys.shards().zip(&listing.highs).zip(&starts) {
            let (Some(high), Some(start)) = (high, start) else {
                continue;
            };
            let (count, members) = journal::window_page(
                &mut conn,
                keys,
                shard,
                &listing.low,
                high,
                start,
                skip + listing.limit,
            )
            .await?;
            total += count;
            merged.extend(members.into_iter().map(|member| (member, shard.index())));
        }
        merged.sort_unstable_by(|a, b| b.cmp(a));
        let page: Vec<(String, u16)> = merged.into_iter().skip(skip).take(listing.limit).collect();
        let last = page.last().cloned();
        // Read each shard's entries in one round trip, then put them in page order.
        let mut by_member = std::collections::HashMap::new();
        for shard in keys.shards() {
            let members: Vec<&str> = page
                .iter()
                .filter(|(_, of)| *of == shard.index())
                .map(|(member, _)| member.as_str())
                .collect();
            for entry in journal::entries(&mut conn, keys, shard, &members).await? {
                let member = journal::stream_id_member(&entry.id);
                by_member.insert((member, shard.index()), entry);
            }
        }
        let entries = page
            .into_iter()
            .filter_map(|(member, shard)| {
                // An entry trimmed between the two reads is simply not shown.
                let entry = by_member.remove(&(member, shard))?;
                Some(ReportEntry::from_entry(entry, shard))
            })
            .collect();
        Ok((total, entries, last))
    }

    /// Where the merged entry at `offset` (newest first) lies: the
    /// millisecond it was written in, and how many newer entries of that same
    /// millisecond come before it. Bisection on the entry time, each round
    /// one count per shard. `None` when the windows hold `offset` entries or
    /// fewer.
    async fn locate(
        &self,
        conn: &mut crate::store::connection::Conn,
        listing: &Cursor,
        offset: usize,
    ) -> Result<Option<(u64, usize)>, ApiError> {
        let keys = self.0.store.keys();
        // Entries at or after millisecond `ms`, in every window.
        let mut newer_than = async |ms: u64| -> Result<usize, ApiError> {
            let from = index_member(ms, 0).max(listing.low.clone());
            let mut count = 0;
            for (shard, high) in keys.shards().zip(&listing.highs) {
                if let Some(high) = high {
                    count += journal::count_between(conn, keys, shard, &from, high).await?;
                }
            }
            Ok(count)
        };
        let (mut low, mut high) = (
            member_ms(&listing.low),
            listing
                .highs
                .iter()
                .flatten()
                .map(|high| member_ms(high))
                .max()
                .unwrap_or(0),
        );
        if newer_than(low).await? <= offset {
            return Ok(None);
        }
        // The latest millisecond with more than `offset` entries at or after it.
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            if newer_than(middle).await? > offset {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        let skip = offset - newer_than(low + 1).await?;
        Ok(Some((low, skip)))
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
            highs: vec![Some(index_member(20, 3)), None, Some(index_member(19, 0))],
            limit: 50,
            offset: 100,
            after: Some((index_member(18, 2), 2)),
        };
        let text = cursor.encode("secret");
        assert_eq!(Cursor::decode(&text, "secret"), Some(cursor.clone()));
        assert_eq!(Cursor::decode(&text, "other secret"), None);
        assert_eq!(
            Cursor::decode(&text.replace(".100.", ".150."), "secret"),
            None
        );
        assert_eq!(Cursor::decode("nonsense", "secret"), None);
        let first = Cursor {
            after: None,
            offset: 0,
            ..cursor
        };
        assert_eq!(
            Cursor::decode(&first.encode("secret"), "secret"),
            Some(first)
        );
    }

    #[test]
    fn a_cursor_of_sixteen_shards_stays_short() {
        let now = 1_796_000_000_000;
        let day = 24 * 60 * 60 * 1000;
        let cursor = Cursor {
            as_of: index_member(now, 12),
            low: index_member(now - 5 * day, 0),
            // Shards written a moment ago, and shards quiet for days.
            highs: (0..16)
                .map(|shard| Some(index_member(now - shard * shard * day / 64, shard)))
                .collect(),
            limit: 100,
            offset: 1_000_000,
            after: Some((index_member(now - 3, 7), 15)),
        };
        let text = cursor.encode("secret");
        assert!(text.len() < 400, "{} bytes: {text}", text.len());
        assert_eq!(Cursor::decode(&text, "secret"), Some(cursor));
    }
}
