//! API keys in Redis: their records (a keyed hash of the secret, never the
//! secret), their creation, listing and revocation.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::rate_limits::Take;
use super::{Conn, Record, StoreError, StoreResult, verdict};
use crate::access::{KeyId, Role};
use crate::domain::AccountId;

pub static CREATE_API_KEY: LazyLock<Script> = lua_script!("create_api_key.lua");
pub static REVOKE_API_KEY: LazyLock<Script> = lua_script!("revoke_api_key.lua");
pub static AUTHENTICATE_KEY: LazyLock<Script> = lua_script!("authenticate_key.lua");

pub fn scripts() -> [&'static Script; 3] {
    [&CREATE_API_KEY, &REVOKE_API_KEY, &AUTHENTICATE_KEY]
}

/// A key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub role: Role,
    /// The account a `customer` key is bound to.
    pub account: Option<AccountId>,
    /// Hex HMAC-SHA256(pepper, id ":" secret).
    pub secret_hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub label: Option<String>,
    /// Per-key limits; `None` takes the server's default.
    pub reads_per_s: Option<u32>,
    pub writes_per_s: Option<u32>,
}

impl KeyRecord {
    fn from_record(record: &Record) -> StoreResult<Self> {
        let positive = |field: &str| -> StoreResult<Option<i64>> {
            let value = record.integer(field)?;
            Ok((value > 0).then_some(value))
        };
        let limit = |field: &str| -> StoreResult<Option<u32>> {
            positive(field)?
                .map(|value| {
                    u32::try_from(value)
                        .map_err(|_| record.corrupt(format!("`{field}` is out of range")))
                })
                .transpose()
        };
        Ok(KeyRecord {
            id: record.parsed("id", KeyId::parse)?,
            role: record.parsed("role", Role::parse)?,
            account: record
                .optional_text("account")
                .map(AccountId::parse)
                .transpose()
                .map_err(|err| record.corrupt(format!("field `account`: {err}")))?,
            secret_hash: record.text("secret_hash")?.to_owned(),
            created_at_ms: record.integer("created_at")?,
            expires_at_ms: positive("expires_at")?,
            revoked_at_ms: positive("revoked_at")?,
            label: record.optional_text("label").map(str::to_owned),
            reads_per_s: limit("reads_per_s")?,
            writes_per_s: limit("writes_per_s")?,
        })
    }

    /// Whether the key may be used at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

#[tracing::instrument(skip_all, fields(key_id = %key.id, role = %key.role))]
pub async fn create_api_key(conn: &mut impl Conn, keys: &Keys, key: &KeyRecord) -> StoreResult<()> {
    let reply: Vec<String> = CREATE_API_KEY
        .key(keys.api_key(&key.id))
        .key(keys.api_keys(keys.api_key_shard(&key.id)))
        .arg(key.id.as_str())
        .arg(key.role.as_str())
        .arg(key.account.as_ref().map_or("", AccountId::as_str))
        .arg(&key.secret_hash)
        .arg(key.created_at_ms)
        .arg(key.expires_at_ms.unwrap_or(0))
        .arg(key.label.as_deref().unwrap_or(""))
        .arg(key.reads_per_s.unwrap_or(0))
        .arg(key.writes_per_s.unwrap_or(0))
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match verdict(&reply) {
        "created" => Ok(()),
        _ => Err(StoreError::UnexpectedReply(reply)),
    }
}

pub async fn get_api_key(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &KeyId,
) -> StoreResult<Option<KeyRecord>> {
    let key = keys.api_key(id);
    let fields = conn.hgetall(&key).await?;
    Record::new(key, fields)
        .map(|record| KeyRecord::from_record(&record))
        .transpose()
}

/// Keys by creation, oldest first: `limit` of them from `offset` (each
/// shard's first `offset + limit`, merged by creation time, then id).
pub async fn list_api_keys(
    conn: &mut impl Conn,
    keys: &Keys,
    offset: usize,
    limit: usize,
) -> StoreResult<Vec<KeyRecord>> {
    let ids = super::merged_page(conn, keys, Keys::api_keys, offset, limit).await?;
    let mut records = Vec::with_capacity(limit);
    for (id, shard) in ids {
        let id = KeyId::parse(&id).map_err(|err| StoreError::Corrupt {
            key: keys.api_keys(shard),
            problem: err.to_string(),
        })?;
        if let Some(record) = get_api_key(conn, keys, &id).await? {
            records.push(record);
        }
    }
    Ok(records)
}

/// Revokes a key; returns when it was revoked (the first time, if it already
/// was), or `None` for an unknown id.
#[tracing::instrument(skip_all, fields(key_id = %id))]
pub async fn revoke_api_key(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &KeyId,
    now_ms: i64,
) -> StoreResult<Option<i64>> {
    let reply: Vec<String> = REVOKE_API_KEY
        .key(keys.api_key(id))
        .key(keys.api_keys_epoch(keys.api_key_shard(id)))
        .arg(now_ms)
        .invoke_async(conn)
        .await?;
    match (verdict(&reply), reply.get(1).map(String::as_str)) {
        ("revoked", Some(at)) => at
            .parse()
            .map(Some)
            .map_err(|_| StoreError::UnexpectedReply(reply.clone())),
        ("refused", Some("not_found")) => Ok(None),
        _ => Err(StoreError::UnexpectedReply(reply)),
    }
}

/// What `authenticate_key.lua` is asked: the presented secret's hash, the
/// request's class and its limits, and how many tokens to lease.
#[derive(Debug, Clone, Copy)]
pub struct KeyCheck<'a> {
    pub secret_hash: &'a str,
    /// `reads` or `writes`: names the bucket and the record's own limit.
    pub class: &'a str,
    /// The server's limit per second for the class, for keys with none.
    pub default_per_s: u32,
    pub burst_s: u32,
    /// 0 only reads the record.
    pub want: u32,
}

/// Reads a key's record and, when the secret matches and the key is live,
/// takes tokens from its bucket, in one round trip. `None` for an unknown
/// key; the take is `None` when the script took nothing because the key did
/// not pass (the caller checks the record again itself).
#[tracing::instrument(skip_all, fields(key_id = %id))]
pub async fn authenticate_key(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &KeyId,
    check: KeyCheck<'_>,
) -> StoreResult<Option<(KeyRecord, Option<Take>)>> {
    let record_key = keys.api_key(id);
    let reply: Vec<String> = AUTHENTICATE_KEY
        .key(&record_key)
        .key(keys.api_key_rate_limit(id, check.class))
        .arg(check.secret_hash)
        .arg(format!("{}_per_s", check.class))
        .arg(check.default_per_s)
        .arg(check.burst_s)
        .arg(check.want)
        .invoke_async(conn)
        .await?;
    match verdict(&reply) {
        "missing" => return Ok(None),
        "checked" if reply.len() >= 3 && reply.len() % 2 == 1 => {}
        _ => return Err(StoreError::UnexpectedReply(reply)),
    }
    let number = |index: usize| -> StoreResult<u64> {
        reply[index]
            .parse()
            .map_err(|_| StoreError::UnexpectedReply(reply.clone()))
    };
    let (granted, retry_after_us) = (number(1)?, number(2)?);
    let fields = reply[3..]
        .chunks(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .collect();
    let record = Record::new(record_key, fields)
        .ok_or_else(|| StoreError::UnexpectedReply(reply.clone()))?;
    let take = match (granted, retry_after_us) {
        (0, 0) => None,
        (0, retry_after_us) => Some(Take::Refused {
            retry_after: std::time::Duration::from_micros(retry_after_us),
        }),
        (granted, _) => Some(Take::Granted(u32::try_from(granted).unwrap_or(u32::MAX))),
    };
    Ok(Some((KeyRecord::from_record(&record)?, take)))
}

/// The revocation epoch: how many revocations there have been, the sum of
/// every shard's count (one `GET` per shard, in one pipeline).
pub async fn revocation_epoch(conn: &mut impl Conn, keys: &Keys) -> StoreResult<u64> {
    let mut pipe = redis::pipe();
    for shard in keys.shards() {
        pipe.get(keys.api_keys_epoch(shard));
    }
    let epochs: Vec<Option<u64>> = pipe.query_async(conn).await?;
    Ok(epochs.into_iter().flatten().sum())
}
