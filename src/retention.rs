//! Retention: what is older than its window leaves Redis, into the archive
//! first (`archive`). Today that is the journal past `TALLY_JOURNAL_RETENTION`.
//!
//! One process archives a shard at a time (a lock on the shard, which the
//! trim script checks); a step reads a bounded batch, appends it to the
//! shard's archive files and fsyncs them, then trims it from Redis and
//! commits the files' new lengths in one script. A step that dies before
//! that script leaves its records in Redis and an uncommitted tail in the
//! files, which the next step cuts off before it writes them again: each
//! record is archived once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use crate::archive::{Archive, Line, day_of_id};
use crate::store::journal::{self, TRIM_BATCH_MAX, Trimmed};
use crate::store::locks::Lock;
use crate::store::slots::Shard;
use crate::store::{Store, now_ms};

/// How often a worker process archives and trims the journal.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Most trim batches per shard per round, so one round stays short.
pub const RETENTION_BATCHES_MAX: usize = 100;
/// How long a shard's archive lock lasts: far longer than a step (a batch
/// read, a file append with fsync, a script), so it never runs out under a
/// live holder.
const ARCHIVE_LOCK_MS: u64 = 60_000;

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
    ensure_identity(store, archive).await?;
    let Some(lock) = Lock::acquire(store, keys.archive_lock(shard), ARCHIVE_LOCK_MS).await? else {
        return Ok(0);
    };
    let mut trimmed = 0;
    for _ in 0..batches_max {
        let Some(old) = journal::old_entries(&mut conn, keys, shard, cutoff_ms).await? else {
            break;
        };
        let archived_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut by_day: BTreeMap<String, Vec<Line>> = BTreeMap::new();
        for entry in &old.entries {
            let day = day_of_id(&entry.id).context("a journal entry id is a stream id")?;
            by_day.entry(day).or_default().push(Line {
                id: entry.id.clone(),
                kind: "journal_entry".to_owned(),
                shard: shard.index(),
                archived_at: archived_at.clone(),
                fields: entry.fields.clone().into_iter().collect(),
            });
        }
        let committed = append(store, archive, shard, by_day).await?;
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

/// Appends each day's lines to the shard's file of that day, from its
/// committed length; returns the new lengths, to be committed.
async fn append(
    store: &Store,
    archive: &Archive,
    shard: Shard,
    by_day: BTreeMap<String, Vec<Line>>,
) -> anyhow::Result<Vec<(String, u64)>> {
    let days: Vec<&String> = by_day.keys().collect();
    let mut conn = store.conn().await?;
    let lengths: Vec<Option<u64>> = redis::cmd("HMGET")
        .arg(store.keys().archive_committed(shard))
        .arg(&days)
        .query_async(&mut conn)
        .await?;
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

/// Archives and trims the journal past `retention` once a minute, until
/// shutdown. Any number of workers may run this: one at a time works on a
/// shard.
pub async fn retain_periodically(
    store: Store,
    archive: Archive,
    retention: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let cutoff_ms = u64::try_from(now_ms())
            .unwrap_or(0)
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        for shard in store.keys().shards() {
            match archive_journal(&store, &archive, shard, cutoff_ms, RETENTION_BATCHES_MAX).await {
                Ok(0) => {}
                Ok(count) => tracing::info!(
                    count,
                    shard = shard.index(),
                    "journal entries past retention archived and trimmed"
                ),
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), shard = shard.index(), "archiving the journal failed")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
