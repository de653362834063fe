//! Retention: what is older than its window leaves Redis, into the archive
//! first (`archive`): the journal past `TALLY_JOURNAL_RETENTION`; batches
//! settled or refunded, with their orders, wallet transactions applied,
//! advances repaid, dead letters resolved and the operator log, past
//! `TALLY_RECORD_RETENTION`.
//!
//! One process archives a shard at a time (a lock on the shard, which the
//! trim script checks); a step reads a bounded batch, appends it to the
//! shard's archive files and fsyncs them, then trims it from Redis and
//! commits the files' new lengths in one script. A step that dies before
//! that script leaves its records in Redis and an uncommitted tail in the
//! files, which the next step cuts off before it writes them again: each
//! record is archived once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;

use crate::archive::{Archive, Line, day_of_id};
use crate::domain::{AccountId, BatchId, OrderId, Symbol};
use crate::store::archive::{self as archive_store, FinishedBatch, FinishedKind, Retired};
use crate::store::journal::{self, TRIM_BATCH_MAX, Trimmed};
use crate::store::locks::Lock;
use crate::store::slots::Shard;
use crate::store::{Store, now_ms};

/// Most trim batches per shard per round, so one round stays short.
pub const RETENTION_BATCHES_MAX: usize = 100;

/// Archives and trims a shard's journal entries older than `cutoff_ms`, at
/// most `batches_max` batches; returns how many entries left Redis. Does
/// nothing while another process archives the shard.
pub async fn archive_journal(
    store: &Store,
    archive: &Archive,
    shard: Shard,
    cutoff_ms: u64,
    batches_max: usize,
) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut conn = store.conn().await?;
    if journal::trim_paused(&mut conn, keys, shard).await?
        || journal::old_entries(&mut conn, keys, shard, cutoff_ms)
            .await?
            .is_none()
    {
        return Ok(0);
    }
    let Some(lock) = take_shard(store, archive, shard).await? else {
        return Ok(0);
    };
    let mut trimmed = 0;
    for _ in 0..batches_max {
        let Some(old) = journal::old_entries(&mut conn, keys, shard, cutoff_ms).await? else {
            break;
        };
        let lines = old
            .entries
            .iter()
            .map(|entry| {
                line(
                    &entry_id(&entry.id, shard),
                    "journal_entry",
                    shard,
                    &entry.fields,
                )
            })
            .collect();
        let committed = append(store, archive, shard, lines).await?;
        match journal::trim_archived(
            &mut conn,
            keys,
            shard,
            &old,
            cutoff_ms,
            lock.token(),
            &committed,
        )
        .await?
        {
            Trimmed::Entries(count) => {
                trimmed += count;
                if count < TRIM_BATCH_MAX {
                    break;
                }
            }
            // The appended tail is cut by the next step.
            Trimmed::Paused => break,
            Trimmed::LostLock => anyhow::bail!(
                "shard {}: the archive lock ran out during a step; nothing was trimmed",
                shard.index()
            ),
            Trimmed::Stale => anyhow::bail!(
                "shard {}: the journal changed under the archive step; nothing was trimmed",
                shard.index()
            ),
        }
    }
    Ok(trimmed)
}

/// A stream whose entries leave Redis after the records window.
#[derive(Debug, Clone)]
pub struct ArchivedStream {
    /// Its entries' `kind` in the archive.
    pub kind: &'static str,
    pub key: String,
    /// Settle dead letters: a batch's letter stays while the batch is still
    /// failed (an operator has yet to retry or refund it), and so do the
    /// letters after it, as the stream leaves oldest first.
    pub holds_failed_batches: bool,
}

/// The streams whose entries leave Redis after the records window, on a
/// shard. The operator log is also capped (`OPERATOR_LOG_ENTRIES_MAX`), a
/// bound retention stays far under.
pub fn archived_streams(store: &Store, shard: Shard) -> [ArchivedStream; 3] {
    let keys = store.keys();
    let stream = |kind, key, holds_failed_batches| ArchivedStream {
        kind,
        key,
        holds_failed_batches,
    };
    [
        stream("dead_letter", keys.dead_letters_resolved(shard), false),
        stream("dead_letter", keys.settle_dead(shard), true),
        stream("operator_action", keys.operator_log(shard), false),
    ]
}

/// Archives and removes a shard's `stream` entries made before `cutoff_ms`,
/// at most `steps_max` steps of [`STEP_RECORDS_MAX`]; returns how many left
/// Redis. Their archive ids are `ms-seq.shard`, as journal entries', told
/// apart by `kind`.
pub async fn archive_stream(
    store: &Store,
    archive: &Archive,
    shard: Shard,
    stream: &ArchivedStream,
    cutoff_ms: i64,
    steps_max: usize,
) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut conn = store.conn().await?;
    let first = archive_store::old_stream_entries(&mut conn, &stream.key, cutoff_ms, 1).await?;
    if leaving(&mut conn, store, stream, first).await?.is_empty() {
        return Ok(0);
    }
    let Some(lock) = take_shard(store, archive, shard).await? else {
        return Ok(0);
    };
    let mut trimmed = 0;
    for _ in 0..steps_max {
        let read =
            archive_store::old_stream_entries(&mut conn, &stream.key, cutoff_ms, STEP_RECORDS_MAX)
                .await?;
        let full = read.len() == STEP_RECORDS_MAX;
        let old = leaving(&mut conn, store, stream, read).await?;
        let Some((last, _)) = old.last() else {
            break;
        };
        let last = last.clone();
        let lines = old
            .iter()
            .map(|(id, fields)| line(&entry_id(id, shard), stream.kind, shard, fields))
            .collect();
        let committed = append(store, archive, shard, lines).await?;
        let done = archive_store::trim_archived_stream(
            &mut conn,
            keys,
            shard,
            &stream.key,
            &last,
            old.len(),
            lock.token(),
            &committed,
        )
        .await?;
        step_done(done, stream.kind, &old.len().to_string(), shard)?;
        trimmed += old.len();
        if !full || old.len() < STEP_RECORDS_MAX {
            break;
        }
    }
    lock.release().await?;
    Ok(trimmed)
}

/// The oldest of `entries` that may leave: all, or for settle dead letters
/// those before the first whose batch is still failed.
async fn leaving(
    conn: &mut crate::store::connection::Conn,
    store: &Store,
    stream: &ArchivedStream,
    mut entries: Vec<(String, HashMap<String, String>)>,
) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
    if !stream.holds_failed_batches || entries.is_empty() {
        return Ok(entries);
    }
    let batches: Vec<Option<BatchId>> = entries
        .iter()
        .map(|(_, fields)| {
            fields
                .get("batch_id")
                .and_then(|id| BatchId::parse(id).ok())
        })
        .collect();
    if batches.iter().all(Option::is_none) {
        return Ok(entries);
    }
    let mut pipe = redis::pipe();
    for batch in batches.iter().flatten() {
        pipe.hget(store.keys().batch(batch), "status");
    }
    let statuses: Vec<Option<String>> = pipe.query_async(conn).await?;
    let mut statuses = statuses.into_iter();
    // A letter naming no batch holds nothing up.
    let held = batches
        .iter()
        .position(|batch| batch.is_some() && statuses.next().flatten().as_deref() == Some("failed"))
        .unwrap_or(entries.len());
    entries.truncate(held);
    Ok(entries)
}

/// A journal entry's id in the archive, as the report gives it: `ms-seq.shard`
/// (a stream id is unique within its shard's journal only).
pub fn entry_id(stream_id: &str, shard: Shard) -> String {
    format!("{stream_id}.{}", shard.index())
}

/// A record as the archive keeps it.
fn line(id: &str, kind: &str, shard: Shard, fields: &HashMap<String, String>) -> Line {
    Line {
        id: id.to_owned(),
        kind: kind.to_owned(),
        shard: shard.index(),
        archived_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        fields: fields.clone().into_iter().collect(),
    }
}

/// Appends `lines` to the shard's files of their ids' days, each from its
/// committed length; returns the new lengths, to be committed.
async fn append(
    store: &Store,
    archive: &Archive,
    shard: Shard,
    lines: Vec<Line>,
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut by_day: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    for line in lines {
        let day = day_of_id(&line.id).with_context(|| format!("{} has no day", line.id))?;
        by_day.entry(day).or_default().push(line);
    }
    let days: Vec<&String> = by_day.keys().collect();
    let mut conn = store.conn().await?;
    let lengths = archive_store::committed(&mut conn, store.keys(), shard, &days).await?;
    let archive = archive.clone();
    let written = tokio::task::spawn_blocking(move || {
        by_day
            .into_iter()
            .zip(lengths)
            .map(|((day, lines), committed)| {
                let length = archive.append(&day, shard, committed.unwrap_or(0), &lines)?;
                Ok((day, length))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })
    .await??;
    Ok(written)
}

/// Batches a round retires per home shard, at most.
pub const RETIRE_BATCHES_MAX: usize = 1_000;
/// Batches older than the window a round looks at per home shard: those
/// still in flight are passed over.
const BATCH_SCAN_MAX: usize = 5_000;

/// Batches settled or refunded before `cutoff_ms` on a home shard leave
/// Redis with their orders, each archived once: first their orders, a step
/// per customer shard (archived there, then retired), then the batches on
/// their home shard (archived, then retired, their value carried for the
/// audit). A batch with orders on a shard another process is archiving
/// waits for the next round. Returns how many batches left.
pub async fn retire_batches(
    store: &Store,
    archive: &Archive,
    home: Shard,
    cutoff_ms: i64,
    limit: usize,
) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut conn = store.conn().await?;
    let finished =
        archive_store::finished_batches(&mut conn, keys, home, cutoff_ms, limit, BATCH_SCAN_MAX)
            .await?;
    if finished.is_empty() {
        return Ok(0);
    }
    let mut by_shard: BTreeMap<u16, Vec<(&BatchId, &OrderFields)>> = BTreeMap::new();
    for batch in &finished {
        for order in &batch.orders {
            by_shard
                .entry(keys.shard_of_id(&order.0.uuid()).index())
                .or_default()
                .push((&batch.id, order));
        }
    }
    let mut waiting: HashSet<&BatchId> = HashSet::new();
    for (index, orders) in by_shard {
        let shard = keys
            .layout()
            .shard(index)
            .context("a shard of the layout")?;
        let fields = orders.iter().map(|(_, order)| *order).collect::<Vec<_>>();
        if !retire_orders(store, archive, shard, &fields).await? {
            waiting.extend(orders.iter().map(|(batch, _)| *batch));
        }
    }
    let ready: Vec<&FinishedBatch> = finished
        .iter()
        .filter(|batch| !waiting.contains(&batch.id))
        .collect();
    retire_batch_records(store, archive, home, cutoff_ms, &ready).await
}

/// Most records one archive step appends and removes.
pub const STEP_RECORDS_MAX: usize = 1_000;

/// An order as Redis held it.
type OrderFields = (OrderId, HashMap<String, String>);

/// Archives and removes orders of one customer shard, in steps of at most
/// [`STEP_RECORDS_MAX`]; false when another process holds the shard.
async fn retire_orders(
    store: &Store,
    archive: &Archive,
    shard: Shard,
    orders: &[&OrderFields],
) -> anyhow::Result<bool> {
    let keys = store.keys();
    let Some(lock) = take_shard(store, archive, shard).await? else {
        return Ok(false);
    };
    let mut conn = store.conn().await?;
    for step in orders.chunks(STEP_RECORDS_MAX) {
        let lines = step
            .iter()
            .map(|(id, fields)| line(&id.to_string(), "order", shard, fields))
            .collect();
        let committed = append(store, archive, shard, lines).await?;
        let named = step
            .iter()
            .map(|(id, fields)| Ok((*id, account_of(fields, "order", &id.to_string())?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let done =
            archive_store::retire_orders(&mut conn, keys, shard, lock.token(), &committed, &named)
                .await?;
        step_done(done, "orders", &named.len().to_string(), shard)?;
    }
    lock.release().await?;
    Ok(true)
}

/// Archives and removes batches of one home shard whose orders have left,
/// in steps of at most [`STEP_RECORDS_MAX`]; returns how many left (none
/// while another process holds the shard).
async fn retire_batch_records(
    store: &Store,
    archive: &Archive,
    home: Shard,
    cutoff_ms: i64,
    batches: &[&FinishedBatch],
) -> anyhow::Result<usize> {
    if batches.is_empty() {
        return Ok(0);
    }
    let keys = store.keys();
    let Some(lock) = take_shard(store, archive, home).await? else {
        return Ok(0);
    };
    let mut conn = store.conn().await?;
    for step in batches.chunks(STEP_RECORDS_MAX) {
        let mut lines = Vec::with_capacity(step.len());
        let mut named = Vec::with_capacity(step.len());
        for batch in step {
            let symbol = batch
                .fields
                .get("symbol")
                .and_then(|symbol| Symbol::parse(symbol).ok())
                .with_context(|| format!("batch {} has no symbol", batch.id))?;
            let mut fields = batch.fields.clone();
            fields.insert("orders".to_owned(), batch.order_ids.join(","));
            lines.push(line(&batch.id.to_string(), "batch", home, &fields));
            named.push((batch.id, symbol));
        }
        let committed = append(store, archive, home, lines).await?;
        let done = archive_store::retire_batches(
            &mut conn,
            keys,
            home,
            &named,
            cutoff_ms,
            lock.token(),
            &committed,
        )
        .await?;
        step_done(done, "batches", &named.len().to_string(), home)?;
    }
    lock.release().await?;
    Ok(batches.len())
}

/// Records of a kind a round retires per shard, at most.
pub const RETIRE_RECORDS_MAX: usize = 1_000;

/// Records of `kind` finished (a wallet transaction applied, an advance
/// repaid) before `cutoff_ms` on a shard leave Redis, each archived once;
/// returns how many left.
pub async fn retire_records(
    store: &Store,
    archive: &Archive,
    kind: FinishedKind,
    shard: Shard,
    cutoff_ms: i64,
    limit: usize,
) -> anyhow::Result<usize> {
    let keys = store.keys();
    let mut conn = store.conn().await?;
    let finished =
        archive_store::finished_records(&mut conn, keys, kind, shard, cutoff_ms, limit).await?;
    if finished.is_empty() {
        return Ok(0);
    }
    let Some(lock) = take_shard(store, archive, shard).await? else {
        return Ok(0);
    };
    let lines = finished
        .iter()
        .map(|(id, fields)| line(id, kind.name(), shard, fields))
        .collect();
    let committed = append(store, archive, shard, lines).await?;
    let named = finished
        .iter()
        .map(|(id, fields)| Ok((id.clone(), account_of(fields, kind.name(), id)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let done = archive_store::retire_records(
        &mut conn,
        keys,
        kind,
        shard,
        cutoff_ms,
        lock.token(),
        &committed,
        &named,
    )
    .await?;
    lock.release().await?;
    step_done(done, kind.name(), &named.len().to_string(), shard)?;
    Ok(named.len())
}

/// The account a record names (its `account_id`).
fn account_of(fields: &HashMap<String, String>, what: &str, id: &str) -> anyhow::Result<AccountId> {
    let account = fields
        .get("account_id")
        .map(String::as_str)
        .unwrap_or_default();
    AccountId::parse(account).with_context(|| format!("{what} {id}"))
}

/// A retiring script's answer as a step's outcome: a refusal stops the
/// round (the files' tails are cut by the next step).
fn step_done(done: Retired, what: &str, id: &str, shard: Shard) -> anyhow::Result<()> {
    match done {
        Retired::Records(_) => Ok(()),
        Retired::LostLock => anyhow::bail!(
            "shard {}: the archive lock ran out while retiring the {what} {id}; nothing was removed",
            shard.index()
        ),
        Retired::Stale => anyhow::bail!(
            "shard {}: the {what} {id} changed under the archive step; nothing was removed",
            shard.index()
        ),
    }
}

/// Takes a shard for an archive step: checks that the directory is this
/// dataset's, then takes the shard's archive lock (None while another
/// process holds it).
async fn take_shard(
    store: &Store,
    archive: &Archive,
    shard: Shard,
) -> anyhow::Result<Option<Lock>> {
    ensure_identity(store, archive).await?;
    Ok(Lock::acquire(store, store.keys().archive_lock(shard), archive.lease_ms()).await?)
}

/// Refuses an archive directory of another dataset (or a dataset whose
/// directory is not this one): its committed lengths would not match. The
/// first archive step of a dataset names the directory.
async fn ensure_identity(store: &Store, archive: &Archive) -> anyhow::Result<()> {
    let key = store.keys().archive_identity();
    let mut conn = store.conn().await?;
    let known: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    let dir = archive.clone();
    let found = tokio::task::spawn_blocking(move || dir.identity()).await??;
    match (known, found) {
        (Some(known), Some(found)) if known == found => Ok(()),
        (None, None) => {
            let id = uuid::Uuid::now_v7().to_string();
            let dir = archive.clone();
            let written = id.clone();
            tokio::task::spawn_blocking(move || dir.set_identity(&written)).await??;
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&id)
                .arg("NX")
                .query_async(&mut conn)
                .await?;
            anyhow::ensure!(
                set.is_some(),
                "another archive directory was named for this dataset at the same time as {}",
                archive.dir().display()
            );
            Ok(())
        }
        (known, found) => anyhow::bail!(
            "the archive directory {} ({}) is not this dataset's ({}): set TALLY_ARCHIVE_DIR to the directory this dataset archives to",
            archive.dir().display(),
            found.as_deref().unwrap_or("empty"),
            known
                .as_deref()
                .unwrap_or("none yet, while the directory names another"),
        ),
    }
}

/// The archive day a record id missing from Redis leads to: its id is older
/// than `window` (a record finishes after it is made, so a younger one
/// cannot have left) and its shard has archived records of that day. `None`
/// for an id that was never a record here, as far as Redis can tell: one
/// read, on the id's shard.
pub async fn archive_day_of(
    store: &Store,
    id: &str,
    window: Duration,
) -> crate::store::StoreResult<Option<String>> {
    let Some(ms) = crate::archive::ms_of_id(id).filter(|&ms| ms < window_start(window)) else {
        return Ok(None);
    };
    let day = crate::archive::day_of_ms(ms);
    let keys = store.keys();
    let mut conn = store.conn().await?;
    let archived: bool = redis::cmd("HEXISTS")
        .arg(keys.archive_committed(keys.shard_of_text_id(id)))
        .arg(&day)
        .query_async(&mut conn)
        .await?;
    Ok(archived.then_some(day))
}

/// The two windows retention keeps in Redis.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// The journal (the report's window).
    pub journal: Duration,
    /// Finished records: batches settled or refunded, with their orders;
    /// wallet transactions applied; advances repaid; dead letters resolved;
    /// the operator log.
    pub records: Duration,
}

impl Windows {
    pub fn of(ledger: &crate::config::LedgerSettings) -> Self {
        Windows {
            journal: ledger.journal_retention,
            records: ledger.record_retention,
        }
    }
}

/// The start of a window that ends now, in ms since the Unix epoch.
pub fn window_start(window: Duration) -> i64 {
    now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
}

/// Logs what a retention step did on a shard: records past their window
/// archived and removed, or why it stopped.
fn logged(what: &str, shard: Shard, done: anyhow::Result<usize>) {
    match done {
        Ok(0) => {}
        Ok(count) => tracing::info!(
            count,
            shard = shard.index(),
            "{what} past retention archived and removed from Redis"
        ),
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), shard = shard.index(), "archiving {what} failed")
        }
    }
}

/// Archives what is past its window, a round every `interval`, until
/// shutdown. Any number of workers may run this: one at a time works on a
/// shard.
pub async fn retain_periodically(
    store: Store,
    archive: Archive,
    windows: Windows,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let cutoff_ms = u64::try_from(window_start(windows.journal)).unwrap_or(0);
        let records_cutoff_ms = window_start(windows.records);
        for shard in store.keys().shards() {
            logged(
                "batches, with their orders",
                shard,
                retire_batches(
                    &store,
                    &archive,
                    shard,
                    records_cutoff_ms,
                    RETIRE_BATCHES_MAX,
                )
                .await,
            );
            for kind in FinishedKind::ALL {
                logged(
                    kind.name(),
                    shard,
                    retire_records(
                        &store,
                        &archive,
                        kind,
                        shard,
                        records_cutoff_ms,
                        RETIRE_RECORDS_MAX,
                    )
                    .await,
                );
            }
            for stream in archived_streams(&store, shard) {
                logged(
                    stream.kind,
                    shard,
                    archive_stream(
                        &store,
                        &archive,
                        shard,
                        &stream,
                        records_cutoff_ms,
                        RETENTION_BATCHES_MAX,
                    )
                    .await,
                );
            }
            logged(
                "journal entries",
                shard,
                archive_journal(&store, &archive, shard, cutoff_ms, RETENTION_BATCHES_MAX).await,
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
