//! The journal as a report: pages by rank inside a snapshot, and trimming
//! past the retention window.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::slots::Shard;
use super::{Conn, StoreError, StoreResult};
use crate::domain::AccountId;

static PAGE_JOURNAL: LazyLock<Script> = lua_script!("page_journal.lua");
static TRIM_JOURNAL: LazyLock<Script> = lua_script!("trim_journal.lua");

pub fn scripts() -> [&'static Script; 2] {
    [&PAGE_JOURNAL, &TRIM_JOURNAL]
}

/// Most entries trimmed by one script call, so a trim never blocks Redis long.
pub const TRIM_BATCH_MAX: usize = 1_000;

/// The index member of a stream id: zero-padded so text order is id order.
pub fn index_member(ms: u64, seq: u64) -> String {
    format!("{ms:013}-{seq:010}")
}

/// The index member of a stream id (`ms-seq`); junk maps to junk that
/// matches no member.
pub fn stream_id_member(id: &str) -> String {
    id.split_once('-')
        .and_then(|(ms, seq)| Some(index_member(ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or_else(|| id.to_owned())
}

/// The stream id of an index member, or `None` if it is not one.
pub fn stream_id(member: &str) -> Option<String> {
    let (ms, seq) = member.split_once('-')?;
    Some(format!(
        "{}-{}",
        ms.parse::<u64>().ok()?,
        seq.parse::<u64>().ok()?
    ))
}

/// The newest entry's index member of a shard's journal, if it has any.
pub async fn newest_member(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
) -> StoreResult<Option<String>> {
    let newest: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.journal_index(shard))
        .arg(-1)
        .arg(-1)
        .query_async(conn)
        .await?;
    Ok(newest.into_iter().next())
}

/// One journal entry as the report shows it.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub id: String,
    pub fields: HashMap<String, String>,
}

/// The newest index member of every shard's journal, in shard order.
pub async fn newest_members(conn: &mut impl Conn, keys: &Keys) -> StoreResult<Vec<Option<String>>> {
    let mut newest = Vec::with_capacity(usize::from(keys.layout().count()));
    for shard in keys.shards() {
        newest.push(newest_member(conn, keys, shard).await?);
    }
    Ok(newest)
}

/// How many of a shard's entries lie in `[from, high]` (index members).
pub async fn count_between(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    from: &str,
    high: &str,
) -> StoreResult<usize> {
    Ok(redis::cmd("ZLEXCOUNT")
        .arg(keys.journal_index(shard))
        .arg(format!("[{from}"))
        .arg(format!("[{high}"))
        .query_async(conn)
        .await?)
}

/// A shard's part of a report page: how many entries its window `[low,
/// high]` holds, and up to `count` index members, newest first, from
/// `start` (a `ZRANGE BYLEX` bound: `[member` or `(member`) down to `low`.
pub async fn window_page(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    low: &str,
    high: &str,
    start: &str,
    count: usize,
) -> StoreResult<(usize, Vec<String>)> {
    let reply: Vec<redis::Value> = PAGE_JOURNAL
        .key(keys.journal_index(shard))
        .arg(low)
        .arg(high)
        .arg(start)
        .arg(count)
        .invoke_async(conn)
        .await?;
    let mut reply = reply.into_iter();
    let total: usize = redis::from_redis_value(reply.next().unwrap_or(redis::Value::Int(0)))
        .map_err(|err| StoreError::UnexpectedReply(vec![err.to_string()]))?;
    let members: Vec<String> = reply
        .map(redis::from_redis_value::<String>)
        .collect::<Result<_, _>>()
        .map_err(|err| StoreError::UnexpectedReply(vec![err.to_string()]))?;
    Ok((total, members))
}

/// The entries of a shard's journal under `members` (index members), in
/// that order; one trimmed since is simply left out.
pub async fn entries(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    members: &[&str],
) -> StoreResult<Vec<JournalEntry>> {
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for member in members {
        let id = stream_id(member).ok_or_else(|| StoreError::Corrupt {
            key: keys.journal_index(shard),
            problem: format!("`{member}` is not a padded stream id"),
        })?;
        pipe.cmd("XRANGE")
            .arg(keys.journal(shard))
            .arg(&id)
            .arg(&id);
    }
    let ranges: Vec<StreamRangeReply> = pipe.query_async(conn).await?;
    Ok(ranges
        .into_iter()
        .flat_map(|range| range.ids)
        .map(|entry| JournalEntry {
            fields: super::stream_fields(&entry),
            id: entry.id,
        })
        .collect())
}

/// The oldest of a shard's journal entries older than `cutoff_ms`, at most
/// [`TRIM_BATCH_MAX`]: what one trim call takes. Entries older than the
/// window never change, so the trim takes exactly these.
pub struct OldEntries {
    /// The highest index member read.
    pub last: String,
    /// The index members read (an entry trimmed under its member is left
    /// out of `entries`).
    pub members: usize,
    pub entries: Vec<JournalEntry>,
}

pub async fn old_entries(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    cutoff_ms: u64,
) -> StoreResult<Option<OldEntries>> {
    let cutoff = index_member(cutoff_ms, 0);
    let old: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.journal_index(shard))
        .arg("-")
        .arg(format!("({cutoff}"))
        .arg("BYLEX")
        .arg("LIMIT")
        .arg(0)
        .arg(TRIM_BATCH_MAX)
        .query_async(conn)
        .await?;
    let Some(last) = old.last() else {
        return Ok(None);
    };
    let members: Vec<&str> = old.iter().map(String::as_str).collect();
    Ok(Some(OldEntries {
        last: last.clone(),
        members: old.len(),
        entries: entries(conn, keys, shard, &members).await?,
    }))
}

/// Whether an audit is reading a shard's journal now (a trim waits).
pub async fn trim_paused(conn: &mut impl Conn, keys: &Keys, shard: Shard) -> StoreResult<bool> {
    let pauses: usize = redis::cmd("ZCOUNT")
        .arg(keys.journal_trim_pauses(shard))
        .arg(format!("({}", super::now_ms()))
        .arg("+inf")
        .query_async(conn)
        .await?;
    Ok(pauses > 0)
}

/// What a trim call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    Entries(usize),
    /// An audit is reading the journal: nothing was written.
    Paused,
    /// The archive lock ran out: nothing was written.
    LostLock,
    /// The entries are not the ones read: nothing was written.
    Stale,
}

/// Trims `old` (entries the caller archived, the archive files' new
/// lengths in `committed`: (day, bytes)) under the shard's archive lock.
pub async fn trim_archived(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    old: &OldEntries,
    cutoff_ms: u64,
    lock_token: &str,
    committed: &[(String, u64)],
) -> StoreResult<Trimmed> {
    let mut invocation = TRIM_JOURNAL.prepare_invoke();
    invocation
        .key(keys.journal(shard))
        .key(keys.journal_index(shard))
        .key(keys.journal_carried(shard))
        .key(keys.journal_trim_pauses(shard))
        .key(keys.archive_lock(shard))
        .key(keys.archive_committed(shard))
        .arg(&old.last)
        .arg(TRIM_BATCH_MAX)
        .arg(super::now_ms())
        .arg(cutoff_ms)
        .arg(old.members)
        .arg(lock_token)
        .arg(committed.len());
    for (day, length) in committed {
        invocation.arg(day).arg(length);
    }
    let mut customers: Vec<AccountId> = old.entries.iter().flat_map(listed_for).collect();
    customers.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    customers.dedup();
    for account in customers {
        invocation.key(keys.account_entries(&account));
    }
    let count: i64 = invocation.invoke_async(conn).await?;
    Ok(match count {
        -1 => Trimmed::Paused,
        -2 => Trimmed::LostLock,
        -3 => Trimmed::Stale,
        count => Trimmed::Entries(usize::try_from(count).unwrap_or(0)),
    })
}

/// A customer's list entry: the journal entry it names, on which shard.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub entry: String,
    pub shard: u16,
}

/// The entries of a customer's list of entries, as `XRANGE` gives them:
/// (list entry id, what it names); `None` for a malformed one.
pub fn parse_listed(reply: StreamRangeReply) -> Vec<(String, Option<Listed>)> {
    reply
        .ids
        .into_iter()
        .map(|item| {
            let fields = super::stream_fields(&item);
            let listed = fields
                .get("entry")
                .zip(fields.get("shard"))
                .and_then(|(entry, shard)| {
                    Some(Listed {
                        entry: entry.clone(),
                        shard: shard.parse().ok()?,
                    })
                });
            (item.id, listed)
        })
        .collect()
}

/// Up to `limit` of a customer's journal entries, newest first, from below
/// the list entry id `before` if given, each with its list entry id (the
/// cursor of the next page); entries trimmed since the list was read are
/// left out.
pub async fn account_entries(
    conn: &mut impl Conn,
    keys: &Keys,
    account: &AccountId,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<(String, JournalEntry)>> {
    let high = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
    let listed: StreamRangeReply = conn
        .xrevrange_count(keys.account_entries(account), high, "-", limit)
        .await?;
    let listed = parse_listed(listed);
    let mut pipe = redis::pipe();
    for (id, names) in &listed {
        let (entry, shard) = names
            .as_ref()
            .and_then(|names| Some((&names.entry, keys.layout().shard(names.shard)?)))
            .ok_or_else(|| StoreError::Corrupt {
                key: keys.account_entries(account),
                problem: format!("list entry {id} names no shard's journal entry"),
            })?;
        pipe.cmd("XRANGE")
            .arg(keys.journal(shard))
            .arg(entry)
            .arg(entry);
    }
    let ranges: Vec<StreamRangeReply> = pipe.query_async(conn).await?;
    Ok(listed
        .into_iter()
        .zip(ranges)
        .filter_map(|((id, _), range)| {
            let entry = range.ids.into_iter().next()?;
            Some((
                id,
                JournalEntry {
                    fields: super::stream_fields(&entry),
                    id: entry.id,
                },
            ))
        })
        .collect())
}

/// The customers whose lists of entries ([`Keys::account_entries`]) hold
/// `entry`, as the scripts list it: its debit side, and its credit side but
/// for a refused transfer, which moved nothing (its payee never saw it; a
/// voided one moved the money back to its payer, and is listed for it). On
/// a cluster these are always on the entry's own shard: a script writes one
/// slot.
pub fn listed_for(entry: &JournalEntry) -> impl Iterator<Item = AccountId> + '_ {
    let field = |name: &str| entry.fields.get(name).map(String::as_str);
    let refused_transfer = field("kind") == Some("transfer")
        && field("status") == Some("failed")
        && field("amount") == Some("0");
    let credit = field("credit").filter(|_| !refused_transfer);
    [field("debit"), credit]
        .into_iter()
        .flatten()
        .filter_map(|id| AccountId::parse(id).ok())
        .filter(|id| !id.is_system())
}

/// Holds the trim of every shard's journal off until `until_ms` for the
/// audit `token` (set again to extend it), and forgets pauses that ran out
/// (an audit that died).
pub async fn pause_trim(
    conn: &mut impl Conn,
    keys: &Keys,
    token: &str,
    until_ms: i64,
) -> StoreResult<()> {
    for shard in keys.shards() {
        let pauses = keys.journal_trim_pauses(shard);
        redis::pipe()
            .zrembyscore(&pauses, "-inf", super::now_ms())
            .ignore()
            .zadd(&pauses, token, until_ms)
            .ignore()
            .query_async::<()>(conn)
            .await?;
    }
    Ok(())
}

/// Ends the audit `token`'s pause on every shard; other audits' pauses stay.
pub async fn resume_trim(conn: &mut impl Conn, keys: &Keys, token: &str) -> StoreResult<()> {
    for shard in keys.shards() {
        redis::cmd("ZREM")
            .arg(keys.journal_trim_pauses(shard))
            .arg(token)
            .query_async::<()>(conn)
            .await?;
    }
    Ok(())
}

/// What trimmed entries of a shard's journal had moved: per account, and
/// per kind (`kind:<kind>`).
pub async fn carried(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
) -> StoreResult<HashMap<String, i64>> {
    Ok(redis::cmd("HGETALL")
        .arg(keys.journal_carried(shard))
        .query_async(conn)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_members_sort_like_stream_ids_and_map_back() {
        let ids = [(1, 9), (1, 10), (2, 0), (10, 0)];
        let members: Vec<String> = ids
            .iter()
            .map(|(ms, seq)| index_member(*ms, *seq))
            .collect();
        let mut sorted = members.clone();
        sorted.sort();
        assert_eq!(sorted, members);
        assert_eq!(stream_id(&members[1]).unwrap(), "1-10");
        assert_eq!(stream_id("nonsense"), None);
    }
}
