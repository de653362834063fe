//! The journal as a report: pages by rank inside a snapshot, and trimming
//! past the retention window.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;
use redis::streams::StreamRangeReply;

use super::{Conn, StoreError, StoreResult, keys};

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

/// The stream id of an index member, or `None` if it is not one.
pub fn stream_id(member: &str) -> Option<String> {
    let (ms, seq) = member.split_once('-')?;
    Some(format!(
        "{}-{}",
        ms.parse::<u64>().ok()?,
        seq.parse::<u64>().ok()?
    ))
}

/// The newest entry's index member, if the journal has any.
pub async fn newest_member(conn: &mut impl Conn) -> StoreResult<Option<String>> {
    let newest: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys::JOURNAL_INDEX)
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

/// Entries `offset..offset + size` (newest first) of the window
/// `[low, high]`, and how many the window holds.
pub async fn page(
    conn: &mut impl Conn,
    low: &str,
    high: &str,
    offset: usize,
    size: usize,
) -> StoreResult<(usize, Vec<JournalEntry>)> {
    let reply: Vec<redis::Value> = PAGE_JOURNAL
        .key(keys::JOURNAL_INDEX)
        .arg(low)
        .arg(high)
        .arg(offset)
        .arg(size)
        .invoke_async(conn)
        .await?;
    let mut reply = reply.into_iter();
    let total: usize = redis::from_redis_value(reply.next().unwrap_or(redis::Value::Int(0)))
        .map_err(|err| StoreError::UnexpectedReply(vec![err.to_string()]))?;
    let members: Vec<String> = reply
        .map(redis::from_redis_value::<String>)
        .collect::<Result<_, _>>()
        .map_err(|err| StoreError::UnexpectedReply(vec![err.to_string()]))?;
    if members.is_empty() {
        return Ok((total, Vec::new()));
    }
    let mut pipe = redis::pipe();
    for member in &members {
        let id = stream_id(member).ok_or_else(|| StoreError::Corrupt {
            key: keys::JOURNAL_INDEX.to_owned(),
            problem: format!("`{member}` is not a padded stream id"),
        })?;
        pipe.cmd("XRANGE").arg(keys::JOURNAL).arg(&id).arg(&id);
    }
    let ranges: Vec<StreamRangeReply> = pipe.query_async(conn).await?;
    // An entry trimmed between the two reads is simply not shown.
    let entries = ranges
        .into_iter()
        .flat_map(|range| range.ids)
        .map(|entry| JournalEntry {
            fields: super::stream_fields(&entry),
            id: entry.id,
        })
        .collect();
    Ok((total, entries))
}

/// Trims every entry older than `cutoff_ms`, a bounded batch per call, and
/// returns how many went.
pub async fn trim(conn: &mut impl Conn, cutoff_ms: u64, batches_max: usize) -> StoreResult<usize> {
    let cutoff = index_member(cutoff_ms, 0);
    let mut trimmed = 0;
    for _ in 0..batches_max {
        let count: usize = TRIM_JOURNAL
            .key(keys::JOURNAL)
            .key(keys::JOURNAL_INDEX)
            .key(keys::JOURNAL_CARRIED)
            .key(keys::JOURNAL_TRIM_PAUSES)
            .arg(&cutoff)
            .arg(TRIM_BATCH_MAX)
            .arg(super::now_ms())
            .invoke_async(conn)
            .await?;
        trimmed += count;
        if count < TRIM_BATCH_MAX {
            break;
        }
    }
    Ok(trimmed)
}

/// Holds the trim off until `until_ms` for the audit `token` (set again to
/// extend it), and forgets pauses that ran out (an audit that died).
pub async fn pause_trim(conn: &mut impl Conn, token: &str, until_ms: i64) -> StoreResult<()> {
    redis::pipe()
        .zrembyscore(keys::JOURNAL_TRIM_PAUSES, "-inf", super::now_ms())
        .ignore()
        .zadd(keys::JOURNAL_TRIM_PAUSES, token, until_ms)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Ends the audit `token`'s pause; other audits' pauses stay.
pub async fn resume_trim(conn: &mut impl Conn, token: &str) -> StoreResult<()> {
    redis::cmd("ZREM")
        .arg(keys::JOURNAL_TRIM_PAUSES)
        .arg(token)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// What trimmed entries had moved: per account, and per kind (`kind:<kind>`).
pub async fn carried(conn: &mut impl Conn) -> StoreResult<HashMap<String, i64>> {
    Ok(redis::cmd("HGETALL")
        .arg(keys::JOURNAL_CARRIED)
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
