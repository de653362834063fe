//! Trimming the job and event streams. `XACK` does not delete an entry, and
//! a length bound on `XADD` would drop entries no consumer has read yet (the
//! outbox would lose events). So an entry is deleted only once every consumer
//! group on its stream is done with it: below the group's oldest pending
//! entry and at or below its last delivered one.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;

use super::{Conn, StoreResult};

static DELETE_IDLE_CONSUMERS: LazyLock<Script> = lua_script!("delete_idle_consumers.lua");

pub fn scripts() -> [&'static Script; 1] {
    [&DELETE_IDLE_CONSUMERS]
}

/// A kind of job stream (one per shard), the consumer group that works it;
/// jobs no worker can read are kept for an operator on its dead stream.
pub struct JobStream {
    pub kind: super::keys::StreamKind,
    pub group: &'static str,
}

/// Moves a job no worker can read to its dead-letter stream, with the
/// `problem` and the worker's name, and acknowledges it, in one MULTI: it is
/// kept for an operator, not handed out forever (a pending entry would also
/// hold back the stream's trim).
#[expect(
    clippy::too_many_arguments,
    reason = "where the job was (shard, stream) and what it was, each named where it is called"
)]
pub async fn dead_letter_unreadable(
    conn: &mut impl Conn,
    keys: &super::keys::Keys,
    shard: super::slots::Shard,
    jobs: &JobStream,
    stream_id: &str,
    fields: &HashMap<String, String>,
    problem: &str,
    worker: &str,
) -> StoreResult<()> {
    let mut entry: Vec<(&str, &str)> = fields
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    entry.extend([
        ("stream_id", stream_id),
        ("error", problem),
        ("worker", worker),
    ]);
    redis::pipe()
        .atomic()
        .xadd(keys.job_stream_dead(jobs.kind, shard), "*", &entry)
        .ignore()
        .xack(keys.job_stream(jobs.kind, shard), jobs.group, &[stream_id])
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Most consumers one call forgets, so one call stays short.
const IDLE_CONSUMERS_DELETED_MAX: usize = 100;

/// A stream id, `ms-seq`, as numbers so that ids compare as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// `XINFO GROUPS stream`: each group's fields; none for a stream not made yet.
async fn groups(
    conn: &mut impl Conn,
    stream: &str,
) -> StoreResult<Vec<HashMap<String, redis::Value>>> {
    let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    match groups {
        Ok(groups) => Ok(groups),
        Err(err) if err.to_string().contains("no such key") => Ok(Vec::new()),
        Err(err) => Err(err.into()),
    }
}

/// Forgets the consumers of every group on `stream` that hold no job and
/// have been idle at least `idle_ms`. Returns how many it forgot.
pub async fn delete_idle_consumers(
    conn: &mut impl Conn,
    stream: &str,
    idle_ms: u64,
) -> StoreResult<u64> {
    let mut deleted = 0;
    for group in groups(conn, stream).await? {
        let Some(name) = group
            .get("name")
            .and_then(|value| redis::from_redis_value::<String>(value.clone()).ok())
        else {
            continue;
        };
        let count: u64 = DELETE_IDLE_CONSUMERS
            .key(stream)
            .arg(&name)
            .arg(idle_ms)
            .arg(IDLE_CONSUMERS_DELETED_MAX)
            .invoke_async(conn)
            .await?;
        deleted += count;
    }
    Ok(deleted)
}

/// The lowest id any consumer group on `stream` may still need, or `None`
/// when the stream has no group (nothing is consumed, so nothing may go).
///
/// Read without a lock, which is safe: after this read a group's pending
/// entries can only be acknowledged and its last delivered id only grow, so
/// the floor found stays at or below the true one.
async fn consumed_floor(conn: &mut impl Conn, stream: &str) -> StoreResult<Option<StreamId>> {
    let groups = groups(conn, stream).await?;
    if groups.is_empty() {
        return Ok(None); // no stream, or nothing consumes it
    }
    let mut floor: Option<StreamId> = None;
    for group in groups {
        let text = |field: &str| -> Option<String> {
            group
                .get(field)
                .and_then(|value| redis::from_redis_value(value.clone()).ok())
        };
        let (Some(name), Some(last_delivered)) = (text("name"), text("last-delivered-id")) else {
            return Ok(None); // a reply we do not understand: trim nothing
        };
        let Some(mut group_floor) = StreamId::parse(&last_delivered) else {
            return Ok(None);
        };
        // Unknown counts as pending, so the floor is read rather than guessed.
        let pending: u64 = group
            .get("pending")
            .and_then(|value| redis::from_redis_value(value.clone()).ok())
            .unwrap_or(1);
        if pending > 0 {
            // XPENDING's summary: count, smallest id, greatest id, consumers.
            let summary: (u64, Option<String>, Option<String>, redis::Value) =
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(&name)
                    .query_async(conn)
                    .await?;
            if let Some(smallest) = summary.1.as_deref().and_then(StreamId::parse) {
                group_floor = group_floor.min(smallest);
            }
        }
        floor = Some(floor.map_or(group_floor, |floor| floor.min(group_floor)));
    }
    Ok(floor)
}

/// Deletes the entries of `stream` that every consumer group is done with
/// and that are older than `older_than_ms` (ms since the Unix epoch).
/// Returns the entries deleted.
pub async fn trim_consumed(
    conn: &mut impl Conn,
    stream: &str,
    older_than_ms: u64,
) -> StoreResult<u64> {
    let Some(floor) = consumed_floor(conn, stream).await? else {
        return Ok(0);
    };
    let cut = floor.min(StreamId {
        ms: older_than_ms,
        seq: 0,
    });
    let deleted: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(cut.to_string())
        .query_async(conn)
        .await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::StreamId;

    #[test]
    fn stream_ids_compare_as_numbers_not_text() {
        let early = StreamId::parse("999-5").unwrap();
        let late = StreamId::parse("1000-0").unwrap();
        assert!(early < late);
        assert!(StreamId::parse("1000-2").unwrap() < StreamId::parse("1000-10").unwrap());
        assert_eq!(late.to_string(), "1000-0");
        assert_eq!(StreamId::parse("12"), None);
        assert_eq!(StreamId::parse("a-1"), None);
    }
}
