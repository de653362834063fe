//! An account's page, and find by exact id: each a handful of reads on the
//! shard the id names, never a scan.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use poem::http::{StatusCode, header};
use poem::web::{Data, Path, Query};
use poem::{Response, handler};
use serde::Deserialize;

use super::Console;
use super::auth::{Viewer, message};
use super::pages::{Chrome, bad_cursor, render, rfc3339, store_failed, usd};
use crate::domain::{AccountId, BatchId, OrderId};
use crate::store::journal::{self, JournalEntry};
use crate::store::keys::Keys;
use crate::store::streams::StreamId;
use crate::store::{Conn, StoreError, accounts, advances, orders, wallet};

/// Rows of the account page's lists that do not page (its newest wallet
/// transactions, its advances); its journal entries and orders page by
/// cursor, a console page (`TALLY_CONSOLE_PAGE_SIZE`) at a time.
const ACCOUNT_ROWS_MAX: usize = 50;

/// One journal entry as the account sees it.
pub struct EntryLine {
    pub id: String,
    pub at: String,
    pub kind: String,
    /// The other side of the move.
    pub counterpart: String,
    /// Signed: what it did to this account (0.00 for a refused one).
    pub amount: String,
    pub status: String,
    pub reference: String,
    pub reason: String,
}

pub struct OrderLine {
    pub id: String,
    pub symbol: String,
    pub quantity: String,
    pub cost: String,
    pub status: String,
    pub batch: Option<String>,
    pub at: String,
}

pub struct WalletLine {
    pub id: String,
    pub kind: String,
    pub amount: String,
    pub status: String,
    pub at: String,
}

pub struct AdvanceLine {
    pub id: String,
    pub amount: String,
    pub at: String,
    /// `n: amount status, due`.
    pub installments: Vec<String>,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    chrome: Chrome,
    id: String,
    name: String,
    balance: String,
    created: String,
    entries: Vec<EntryLine>,
    /// The cursor of the next page of entries, if there are older ones.
    older_entries: Option<String>,
    orders: Vec<OrderLine>,
    older_orders: Option<String>,
    wallet: Vec<WalletLine>,
    advances: Vec<AdvanceLine>,
}

/// Where each list of an account's page starts (newest when absent).
#[derive(Deserialize)]
pub struct AccountQuery {
    /// A list entry id: the page starts at the entry before it.
    entries_before: Option<String>,
    /// A list entry id: the page starts at the order before it.
    orders_before: Option<String>,
}

/// A row of `entry` as `account` sees it.
fn entry_line(account: &AccountId, entry: JournalEntry) -> EntryLine {
    let field = |name: &str| entry.fields.get(name).cloned().unwrap_or_default();
    let cents: i64 = field("amount").parse().unwrap_or(0);
    let (counterpart, signed) = if field("debit") == account.as_str() {
        (field("credit"), -cents)
    } else {
        (field("debit"), cents)
    };
    let at = field("at").parse().map(rfc3339).unwrap_or_default();
    EntryLine {
        id: entry.id,
        at,
        kind: field("kind"),
        counterpart,
        amount: usd(signed),
        status: field("status"),
        reference: field("ref"),
        reason: field("reason"),
    }
}

/// A page read one row long: the page, and where the next starts if the
/// extra row says there is one.
fn split_page<T>(
    mut rows: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(cursor);
    (rows, next)
}

#[handler]
pub async fn account_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    id: Path<String>,
    Query(query): Query<AccountQuery>,
) -> Response {
    // Both cursors are list entry ids (stream ids).
    let cursors = [&query.entries_before, &query.orders_before];
    if cursors.iter().any(|cursor| {
        cursor
            .as_deref()
            .is_some_and(|id| StreamId::parse(id).is_none())
    }) {
        return bad_cursor();
    }
    let not_found = || {
        message(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no account with that id.",
        )
    };
    let Ok(id) = AccountId::parse(&id) else {
        return not_found();
    };
    if id.is_system() {
        return not_found();
    }
    let store = &console.state.store;
    let keys = store.keys();
    let limit = console.state.api.console.page_size;
    let read = async {
        let mut conn = store.conn().await?;
        let Some(account) = accounts::get_account(&mut conn, keys, &id).await? else {
            return Ok(None);
        };
        let entries = journal::account_entries(
            &mut conn,
            keys,
            &id,
            query.entries_before.as_deref(),
            limit + 1,
        )
        .await?;
        let (entries, older_entries) = split_page(entries, limit, |(member, _)| member.clone());
        let entries = entries
            .into_iter()
            .map(|(_, entry)| entry_line(&id, entry))
            .collect();
        let order_ids = orders::account_orders(
            &mut conn,
            keys,
            &id,
            query.orders_before.as_deref(),
            limit + 1,
        )
        .await?;
        let (order_ids, older_orders) = split_page(order_ids, limit, |(listed, _)| listed.clone());
        let mut order_lines = Vec::with_capacity(order_ids.len());
        for (_, order) in &order_ids {
            if let Some(order) = orders::get_order(&mut conn, keys, order).await? {
                order_lines.push(OrderLine {
                    id: order.id.to_string(),
                    symbol: order.symbol.to_string(),
                    quantity: order.quantity.to_string(),
                    cost: order.cost.to_string(),
                    status: order.status.as_str().to_owned(),
                    batch: order.batch_id.map(|batch| batch.to_string()),
                    at: rfc3339(order.created_at_ms),
                });
            }
        }
        let listed = Listed {
            entries,
            older_entries,
            orders: order_lines,
            older_orders,
        };
        let mut lines = Vec::new();
        for txn in wallet::history(&mut conn, keys, &id, None, ACCOUNT_ROWS_MAX).await? {
            if let Some(txn) = wallet::get(&mut conn, keys, &txn).await? {
                lines.push(WalletLine {
                    id: txn.id,
                    kind: txn.kind.as_str().to_owned(),
                    amount: txn.amount.to_string(),
                    status: txn.status,
                    at: rfc3339(txn.created_at_ms),
                });
            }
        }
        let mut advance_lines = Vec::new();
        for advance in advances::ids(&mut conn, keys, Some(&id), 0, ACCOUNT_ROWS_MAX).await? {
            if let Some(advance) = advances::get(&mut conn, keys, &advance).await? {
                advance_lines.push(AdvanceLine {
                    installments: advance
                        .installments
                        .iter()
                        .map(|i| {
                            format!(
                                "{}: {} {}, due {}",
                                i.n,
                                usd(i.amount_cents),
                                i.status,
                                rfc3339(i.due_ms)
                            )
                        })
                        .collect(),
                    id: advance.id,
                    amount: usd(advance.amount_cents),
                    at: rfc3339(advance.created_at_ms),
                });
            }
        }
        Ok::<_, StoreError>(Some((account, listed, lines, advance_lines)))
    };
    let (account, listed, wallet, advances) = match read.await {
        Ok(Some(read)) => read,
        Ok(None) => return not_found(),
        Err(err) => return store_failed(err),
    };
    let page = AccountPage {
        chrome: Chrome::new(format!("Account {}", account.name), &viewer),
        id: account.id.to_string(),
        name: account.name,
        balance: usd(account.balance_cents),
        created: rfc3339(account.created_at_ms),
        entries: listed.entries,
        older_entries: listed.older_entries,
        orders: listed.orders,
        older_orders: listed.older_orders,
        wallet,
        advances,
    };
    render(&page, StatusCode::OK)
}

/// The account page's lists that page by cursor.
struct Listed {
    entries: Vec<EntryLine>,
    older_entries: Option<String>,
    orders: Vec<OrderLine>,
    older_orders: Option<String>,
}

#[derive(Template)]
#[template(path = "record.html")]
struct RecordPage {
    chrome: Chrome,
    kind: &'static str,
    id: String,
    fields: Vec<(String, String)>,
    /// Where the record leads (its batch, its account), as (label, path).
    links: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "find.html")]
struct FindPage {
    chrome: Chrome,
    id: String,
    problem: Option<String>,
}

#[derive(Deserialize)]
pub struct FindQuery {
    id: Option<String>,
    /// An Idempotency-Key, with the id of the API key that sent it (keys
    /// are scoped by API key).
    idempotency_key: Option<String>,
    key_id: Option<String>,
}

/// The kinds of request an Idempotency-Key is remembered for.
const IDEMPOTENCY_SCOPES: [&str; 6] = [
    "orders",
    "accounts",
    "transfer",
    "bank_transaction",
    "wallet",
    "advances",
];

/// What an Idempotency-Key of an API key made, on any shard and for any kind
/// of request: (kind, record id); `None` for a key or key id that cannot be
/// one. One pipeline of shards x kinds reads.
async fn by_idempotency_key(
    store: &crate::store::Store,
    key: &str,
    key_id: &str,
) -> Result<Option<Vec<(&'static str, String)>>, StoreError> {
    let (Ok(key), Ok(key_id)) = (
        crate::domain::IdempotencyKey::parse(key),
        crate::access::KeyId::parse(key_id),
    ) else {
        return Ok(None);
    };
    let scoped = key.scoped(key_id.as_str());
    let keys = store.keys();
    let mut pipe = redis::pipe();
    let mut asked = Vec::new();
    for shard in keys.shards() {
        for scope in IDEMPOTENCY_SCOPES {
            pipe.get(keys.idempotency(shard, scope, scoped.as_str()));
            asked.push(scope);
        }
    }
    let mut conn = store.conn().await?;
    let found: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
    Ok(Some(
        asked
            .into_iter()
            .zip(found)
            .filter_map(|(scope, value)| {
                let record = value?.split(' ').next()?.to_owned();
                Some((scope, record))
            })
            .collect(),
    ))
}

/// The kinds of record an id tally drew may name, each with its key.
const RECORD_KINDS: [&str; 6] = [
    "account",
    "batch",
    "order",
    "wallet transaction",
    "transfer",
    "advance",
];

fn record_keys(keys: &Keys, id: &uuid::Uuid) -> [String; 6] {
    let text = id.to_string();
    [
        keys.account(&AccountId::from_uuid(*id)),
        keys.batch(&BatchId::from_uuid(*id)),
        keys.order(&OrderId::from_uuid(*id)),
        keys.wallet_transaction(&text),
        keys.transaction(&text),
        keys.advance(&text),
    ]
}

/// Find by exact id: an account, batch, order, wallet transaction,
/// transfer or bank transaction, advance (all ids tally drew, on the shard
/// the id names: one round trip), or an accounting event (`sN-ms-seq`,
/// while its stream still holds it).
#[handler]
pub async fn find_page(
    console: Data<&Arc<Console>>,
    viewer: Data<&Viewer>,
    query: Query<FindQuery>,
) -> Response {
    let id = query.id.as_deref().unwrap_or_default().trim().to_owned();
    let store = &console.state.store;
    let keys = store.keys();
    let page = |problem: Option<String>| FindPage {
        chrome: Chrome::new("Find", &viewer),
        id: id.chars().take(80).collect(),
        problem,
    };
    if let (Some(key), Some(key_id)) = (&query.idempotency_key, &query.key_id) {
        let found = match by_idempotency_key(store, key.trim(), key_id.trim()).await {
            Ok(found) => found,
            Err(err) => return store_failed(err),
        };
        return match found.as_deref() {
            None => render(
                &page(Some(
                    "An Idempotency-Key is 1 to 128 visible characters, and an API key id 32 hex digits."
                        .to_owned(),
                )),
                StatusCode::BAD_REQUEST,
            ),
            Some([(_, record)]) => Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, format!("/ops/find?id={record}"))
                .finish(),
            Some([]) => render(
                &page(Some(
                    "No request of that API key with that Idempotency-Key is remembered (keys are kept for TALLY_IDEMPOTENCY_TTL_SECS)."
                        .to_owned(),
                )),
                StatusCode::NOT_FOUND,
            ),
            Some(several) => {
                let listed = several
                    .iter()
                    .map(|(scope, record)| format!("{scope}: {record}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let problem = format!("That key made several records: {listed}.");
                render(&page(Some(problem)), StatusCode::OK)
            }
        };
    }
    if id.is_empty() {
        return render(&page(None), StatusCode::OK);
    }
    let found = async {
        let mut conn = store.conn().await?;
        if let Ok(uuid) = uuid::Uuid::try_parse(&id) {
            let names = record_keys(keys, &uuid);
            let mut pipe = redis::pipe();
            for key in &names {
                pipe.hgetall(key);
            }
            let records: Vec<BTreeMap<String, String>> = pipe.query_async(&mut conn).await?;
            return Ok(RECORD_KINDS
                .iter()
                .zip(records)
                .find(|(_, fields)| !fields.is_empty())
                .map(|(kind, fields)| (*kind, uuid.to_string(), fields)));
        }
        event(&mut conn, keys, &id).await
    };
    let (kind, id, fields) = match found.await {
        Ok(Some(found)) => found,
        Ok(None) => {
            // A record retention took out of Redis is in the archive.
            let window = console.state.ledger.record_retention;
            let archived = match uuid::Uuid::try_parse(&id) {
                Ok(uuid) => {
                    crate::retention::archive_day_of(store, &uuid.to_string(), window).await
                }
                Err(_) => Ok(None),
            };
            let problem = match archived {
                Ok(Some(day)) => {
                    let problem = format!(
                        "{id} is older than the retention window and no longer in Redis: it is in the archive of {day} (`tally archive find {id}`)."
                    );
                    return render(&page(Some(problem)), StatusCode::GONE);
                }
                Ok(None) => format!(
                    "Nothing has the id {}. Ids are exact: an account, batch, order, transaction, advance, or an event (sN-ms-seq, while its stream keeps it).",
                    id.chars().take(80).collect::<String>()
                ),
                Err(err) => return store_failed(err),
            };
            return render(&page(Some(problem)), StatusCode::NOT_FOUND);
        }
        Err(err) => return store_failed(err),
    };
    let to = match kind {
        "account" => Some(format!("/ops/accounts/{id}")),
        "batch" => Some(format!("/ops/batches/{id}")),
        _ => None,
    };
    if let Some(to) = to {
        return Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, to)
            .finish();
    }
    let mut links = Vec::new();
    if let Some(account) = fields.get("account_id") {
        links.push(("its account".to_owned(), format!("/ops/accounts/{account}")));
    }
    if kind == "order"
        && let Ok(order) = OrderId::parse(&id)
    {
        let batch = async {
            let mut conn = store.conn().await?;
            crate::store::orders::get_order(&mut conn, keys, &order).await
        };
        if let Ok(Some(order)) = batch.await
            && let Some(batch) = order.batch_id
        {
            links.push(("its batch".to_owned(), format!("/ops/batches/{batch}")));
        }
    }
    let page = RecordPage {
        chrome: Chrome::new(format!("{kind} {id}"), &viewer),
        kind,
        id,
        fields: fields.into_iter().collect(),
        links,
    };
    render(&page, StatusCode::OK)
}

/// An accounting event by its id, `s<shard>-<stream id>`.
async fn event(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &str,
) -> Result<Option<(&'static str, String, BTreeMap<String, String>)>, StoreError> {
    let Some((shard, stream_id)) = id.strip_prefix('s').and_then(|rest| rest.split_once('-'))
    else {
        return Ok(None);
    };
    let Some(shard) = shard
        .parse::<u16>()
        .ok()
        .and_then(|index| keys.shards().find(|shard| shard.index() == index))
    else {
        return Ok(None);
    };
    let Some(stream_id) = crate::store::streams::StreamId::parse(stream_id) else {
        return Ok(None);
    };
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(keys.events(shard))
        .arg(stream_id.to_string())
        .arg(stream_id.to_string())
        .query_async(conn)
        .await?;
    Ok(reply.ids.first().map(|entry| {
        let fields = crate::store::stream_fields(entry).into_iter().collect();
        ("event", id.to_owned(), fields)
    }))
}
