//! Dead letters, for operators: jobs no worker could finish, kept per
//! stream and shard, listed oldest first and resolved one at a time.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::Script;

use super::keys::{Keys, StreamKind};
use super::slots::Shard;
use super::streams::StreamId;
use super::{Conn, StoreError, StoreResult};

static RESOLVE_DEAD_LETTER: LazyLock<Script> = lua_script!("resolve_dead_letter.lua");

pub fn scripts() -> [&'static Script; 1] {
    [&RESOLVE_DEAD_LETTER]
}

/// How long a resolution is remembered, so that the same call run again
/// answers as it did (a day).
pub const RESOLUTION_TTL_SECS: u64 = 86_400;

/// One dead letter, with its place in the merged list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: StreamId,
    pub shard: Shard,
    pub fields: Vec<(String, String)>,
}

impl DeadLetter {
    /// Its name across shards: `ms-seq.shard`.
    pub fn cursor(&self) -> String {
        format!("{}.{}", self.id, self.shard.index())
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Parses a name made by [`DeadLetter::cursor`].
pub fn parse_cursor(text: &str, keys: &Keys) -> Option<(StreamId, Shard)> {
    super::console::parse_log_cursor(text, keys)
}

/// The oldest `limit` dead letters of `stream` over every shard, after
/// `after` when given: one pipeline, each shard giving at most `limit`.
pub async fn page(
    conn: &mut impl Conn,
    keys: &Keys,
    stream: StreamKind,
    after: Option<(StreamId, Shard)>,
    limit: usize,
) -> StoreResult<Vec<DeadLetter>> {
    let mut pipe = redis::pipe();
    for shard in keys.shards() {
        // Ordered by (id, shard): a shard above the cursor's may still hold
        // the cursor's own id.
        let start = match after {
            None => "-".to_owned(),
            Some((id, at)) if shard > at => id.to_string(),
            Some((id, _)) => format!("({id}"),
        };
        pipe.cmd("XRANGE")
            .arg(keys.job_stream_dead(stream, shard))
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(limit);
    }
    let replies: Vec<redis::streams::StreamRangeReply> = pipe.query_async(conn).await?;
    let mut merged = Vec::new();
    for (shard, reply) in keys.shards().zip(replies) {
        for entry in &reply.ids {
            let id = StreamId::parse(&entry.id).ok_or_else(|| StoreError::Corrupt {
                key: keys.job_stream_dead(stream, shard),
                problem: format!("entry id {} is not ms-seq", entry.id),
            })?;
            let fields: HashMap<String, String> = super::stream_fields(entry);
            let mut fields: Vec<(String, String)> = fields.into_iter().collect();
            fields.sort();
            merged.push(DeadLetter { id, shard, fields });
        }
    }
    merged.sort_unstable_by_key(|letter| (letter.id, letter.shard));
    merged.truncate(limit);
    Ok(merged)
}

/// What an operator does with a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Back on its job stream, as a new entry.
    Replay,
    /// Gone from the dead-letter stream (the operator log keeps why).
    Discard,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Replay => "replay",
            Resolution::Discard => "discard",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("there is no such dead letter (resolved already, or never there)")]
    Missing,
    #[error("this dead letter cannot be replayed: {0}")]
    BadEntry(String),
    #[error("a dead settle job is resolved through its batch (retry or refund it)")]
    SettleJob,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replays or discards one dead letter of `stream`; a replay answers the
/// new job's stream id. Dead settle jobs are refused: their batch is what an
/// operator retries or refunds.
pub async fn resolve(
    conn: &mut impl Conn,
    keys: &Keys,
    stream: StreamKind,
    shard: Shard,
    id: StreamId,
    resolution: Resolution,
) -> Result<Option<String>, ResolveError> {
    if stream == StreamKind::Settle {
        return Err(ResolveError::SettleJob);
    }
    let id = id.to_string();
    let reply: Vec<String> = RESOLVE_DEAD_LETTER
        .key(keys.job_stream_dead(stream, shard))
        .key(keys.job_stream(stream, shard))
        .key(keys.dead_letter_resolution(stream, shard, &id))
        .key(keys.dead_letters_resolved(shard))
        .arg(&id)
        .arg(resolution.as_str())
        .arg(RESOLUTION_TTL_SECS)
        .arg(stream.label())
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match reply.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["replayed", new_id] => Ok(Some(new_id.to_owned())),
        ["discarded", _] => Ok(None),
        ["refused", "missing", _] => Err(ResolveError::Missing),
        ["refused", "bad_entry", why] => Err(ResolveError::BadEntry(why.to_owned())),
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}
