//! Trimming the job and event streams. `XACK` does not delete an entry, and
//! a length bound on `XADD` would drop entries no consumer has read yet (the
//! outbox would lose events). So an entry is deleted only once every consumer
//! group on its stream is done with it: below the group's oldest pending
//! entry and at or below its last delivered one.

use std::collections::HashMap;

use super::{Conn, StoreResult};

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

/// The lowest id any consumer group on `stream` may still need, or `None`
/// when the stream has no group (nothing is consumed, so nothing may go).
///
/// Read without a lock, which is safe: after this read a group's pending
/// entries can only be acknowledged and its last delivered id only grow, so
/// the floor found stays at or below the true one.
async fn consumed_floor(conn: &mut impl Conn, stream: &str) -> StoreResult<Option<StreamId>> {
    let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    let groups = match groups {
        Ok(groups) => groups,
        // No stream yet: nothing to trim.
        Err(err) if err.to_string().contains("no such key") => return Ok(None),
        Err(err) => return Err(err.into()),
    };
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
