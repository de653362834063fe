//! What the operator's console keeps in Redis: browser sessions, the log of
//! what operators did, and the last periodic audit's result.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::keys::Keys;
use super::slots::Shard;
use super::streams::StreamId;
use super::{Conn, StoreError, StoreResult};
use crate::access::{KeyId, Role};

/// Entries the operator log keeps per shard (trimmed approximately); the
/// audit trail of money lives in the journal, this says who asked for it.
pub const OPERATOR_LOG_ENTRIES_MAX: usize = 100_000;

/// A signed-in browser: the key it signed in with (checked again on every
/// request, so a revoked key ends its sessions) and its CSRF token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub key_id: KeyId,
    pub role: Role,
    pub csrf: String,
    pub created_at_ms: i64,
    /// The session ends here however active it is.
    pub expires_at_ms: i64,
}

/// Stores a new session under the hash of its token; it lapses after
/// `idle_ms` without a request.
pub async fn create_session(
    conn: &mut impl Conn,
    keys: &Keys,
    token_hash: &str,
    session: &Session,
    idle_ms: u64,
) -> StoreResult<()> {
    let key = keys.console_session(token_hash);
    redis::pipe()
        .atomic()
        .hset_multiple(
            &key,
            &[
                ("key_id", session.key_id.as_str().to_owned()),
                ("role", session.role.as_str().to_owned()),
                ("csrf", session.csrf.clone()),
                ("created_at_ms", session.created_at_ms.to_string()),
                ("expires_at_ms", session.expires_at_ms.to_string()),
            ],
        )
        .ignore()
        .pexpire(&key, i64::try_from(idle_ms).unwrap_or(i64::MAX))
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// The session a token's hash names, its idle lapse pushed back; `None`
/// when there is none or it is past its end.
pub async fn touch_session(
    conn: &mut impl Conn,
    keys: &Keys,
    token_hash: &str,
    idle_ms: u64,
    now_ms: i64,
) -> StoreResult<Option<Session>> {
    let key = keys.console_session(token_hash);
    let (fields, _): (HashMap<String, String>, i64) = redis::pipe()
        .hgetall(&key)
        .pexpire(&key, i64::try_from(idle_ms).unwrap_or(i64::MAX))
        .query_async(conn)
        .await?;
    if fields.is_empty() {
        return Ok(None);
    }
    let corrupt = |problem: &str| StoreError::Corrupt {
        key: key.clone(),
        problem: problem.to_owned(),
    };
    let field = |name: &str| {
        fields
            .get(name)
            .ok_or_else(|| corrupt(&format!("`{name}` is missing")))
    };
    let number = |name: &str| -> StoreResult<i64> {
        field(name)?
            .parse()
            .map_err(|_| corrupt(&format!("`{name}` is not an integer")))
    };
    let session = Session {
        key_id: KeyId::parse(field("key_id")?).map_err(|err| corrupt(&err.to_string()))?,
        role: Role::parse(field("role")?).map_err(|err| corrupt(&err.to_string()))?,
        csrf: field("csrf")?.clone(),
        created_at_ms: number("created_at_ms")?,
        expires_at_ms: number("expires_at_ms")?,
    };
    Ok((now_ms < session.expires_at_ms).then_some(session))
}

pub async fn delete_session(
    conn: &mut impl Conn,
    keys: &Keys,
    token_hash: &str,
) -> StoreResult<()> {
    conn.del::<_, ()>(keys.console_session(token_hash)).await?;
    Ok(())
}

/// One thing an operator did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAction {
    pub key_id: String,
    pub role: String,
    /// What was done: `retry`, `refund`, ...
    pub action: String,
    /// What it was done to: a batch id, ...
    pub target: String,
    /// The money it moved, in words ("credits 3 accounts 12.00 in all").
    pub effect: String,
    pub note: String,
    /// Through what: `console` or `api`.
    pub via: String,
}

/// An entry of the operator log, with its place in the merged log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedAction {
    pub id: StreamId,
    pub shard: Shard,
    pub action: OperatorAction,
}

impl LoggedAction {
    /// Its cursor in the merged log: `ms-seq.shard`.
    pub fn cursor(&self) -> String {
        format!("{}.{}", self.id, self.shard.index())
    }
}

/// Appends to the log of `shard` (the shard of what was acted on).
pub async fn record_operator_action(
    conn: &mut impl Conn,
    keys: &Keys,
    shard: Shard,
    action: &OperatorAction,
) -> StoreResult<()> {
    redis::cmd("XADD")
        .arg(keys.operator_log(shard))
        .arg("MAXLEN")
        .arg("~")
        .arg(OPERATOR_LOG_ENTRIES_MAX)
        .arg("*")
        .arg(&[
            ("key_id", action.key_id.as_str()),
            ("role", action.role.as_str()),
            ("action", action.action.as_str()),
            ("target", action.target.as_str()),
            ("effect", action.effect.as_str()),
            ("note", action.note.as_str()),
            ("via", action.via.as_str()),
        ])
        .query_async::<String>(conn)
        .await?;
    Ok(())
}

/// Parses a cursor made by [`LoggedAction::cursor`].
pub fn parse_log_cursor(text: &str, keys: &Keys) -> Option<(StreamId, Shard)> {
    let (id, shard) = text.rsplit_once('.')?;
    let shard: u16 = shard.parse().ok()?;
    let shard = keys.shards().find(|known| known.index() == shard)?;
    Some((StreamId::parse(id)?, shard))
}

/// The newest `limit` actions over every shard, older than `before` when
/// given: each shard gives at most `limit`, so a page costs O(shards x limit).
pub async fn operator_log_page(
    conn: &mut impl Conn,
    keys: &Keys,
    before: Option<(StreamId, Shard)>,
    limit: usize,
) -> StoreResult<Vec<LoggedAction>> {
    // One pipeline over every shard.
    let mut pipe = redis::pipe();
    for shard in keys.shards() {
        // Entries are ordered by (id, shard); a shard below the cursor's
        // may still hold the cursor's own id.
        let end = match before {
            None => "+".to_owned(),
            Some((id, at)) if shard < at => id.to_string(),
            Some((id, _)) => format!("({id}"),
        };
        pipe.cmd("XREVRANGE")
            .arg(keys.operator_log(shard))
            .arg(&end)
            .arg("-")
            .arg("COUNT")
            .arg(limit);
    }
    let replies: Vec<redis::streams::StreamRangeReply> = pipe.query_async(conn).await?;
    let mut merged = Vec::new();
    for (shard, reply) in keys.shards().zip(replies) {
        let key = keys.operator_log(shard);
        for entry in &reply.ids {
            let id = StreamId::parse(&entry.id).ok_or_else(|| StoreError::Corrupt {
                key: key.clone(),
                problem: format!("entry id {} is not ms-seq", entry.id),
            })?;
            let fields = super::stream_fields(entry);
            let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
            merged.push(LoggedAction {
                id,
                shard,
                action: OperatorAction {
                    key_id: field("key_id"),
                    role: field("role"),
                    action: field("action"),
                    target: field("target"),
                    effect: field("effect"),
                    note: field("note"),
                    via: field("via"),
                },
            });
        }
    }
    merged.sort_unstable_by_key(|entry| std::cmp::Reverse((entry.id, entry.shard)));
    merged.truncate(limit);
    Ok(merged)
}

/// What the console shows of the last periodic audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSummary {
    pub at_ms: i64,
    pub clean: bool,
    /// The balances of customers' accounts, summed.
    pub customer_balances_cents: i64,
    pub accounts_checked: u64,
    pub journal_entries: u64,
    /// The report, as `tally audit` prints it.
    pub report: String,
}

pub async fn record_audit(
    conn: &mut impl Conn,
    keys: &Keys,
    audit: &AuditSummary,
) -> StoreResult<()> {
    conn.hset_multiple::<_, _, _, ()>(
        keys.last_audit(),
        &[
            ("at_ms", audit.at_ms.to_string()),
            ("clean", u8::from(audit.clean).to_string()),
            (
                "customer_balances_cents",
                audit.customer_balances_cents.to_string(),
            ),
            ("accounts_checked", audit.accounts_checked.to_string()),
            ("journal_entries", audit.journal_entries.to_string()),
            ("report", audit.report.clone()),
        ],
    )
    .await?;
    Ok(())
}

/// The last audit's result; `None` before the first.
pub async fn last_audit(conn: &mut impl Conn, keys: &Keys) -> StoreResult<Option<AuditSummary>> {
    let key = keys.last_audit();
    let fields: HashMap<String, String> = conn.hgetall(&key).await?;
    if fields.is_empty() {
        return Ok(None);
    }
    let number = |name: &str| -> StoreResult<i64> {
        fields
            .get(name)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| StoreError::Corrupt {
                key: key.clone(),
                problem: format!("`{name}` is missing or not an integer"),
            })
    };
    Ok(Some(AuditSummary {
        at_ms: number("at_ms")?,
        clean: number("clean")? == 1,
        customer_balances_cents: number("customer_balances_cents")?,
        accounts_checked: u64::try_from(number("accounts_checked")?).unwrap_or(0),
        journal_entries: u64::try_from(number("journal_entries")?).unwrap_or(0),
        report: fields.get("report").cloned().unwrap_or_default(),
    }))
}
