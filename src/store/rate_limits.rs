//! Rate-limit buckets shared by every API process (`take_rate_tokens.lua`).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Conn, StoreResult};

pub static TAKE_RATE_TOKENS: LazyLock<Script> = lua_script!("take_rate_tokens.lua");

/// A bucket's shape: `per_s` tokens a second, `burst` at most at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_s: u32,
    pub burst: u32,
}

impl RateLimit {
    /// Rounded up: a limit is never looser than asked.
    fn interval_us(self) -> u64 {
        1_000_000u64.div_ceil(u64::from(self.per_s.max(1)))
    }
}

/// What Redis granted: some tokens, or how long until one is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Granted(u32),
    Refused { retry_after: Duration },
}

/// Takes up to `want` tokens from the bucket at `bucket` (a key from
/// [`super::keys::rate_limit`] or [`super::keys::Keys::api_key_rate_limit`]; at most a
/// quarter of its burst at once).
pub async fn take_rate_tokens(
    conn: &mut impl Conn,
    bucket: &str,
    limit: RateLimit,
    want: u32,
) -> StoreResult<Take> {
    let (granted, retry_after_us): (u32, u64) = TAKE_RATE_TOKENS
        .key(bucket)
        .arg(limit.interval_us())
        .arg(limit.burst.max(1))
        .arg(want.max(1))
        .invoke_async(conn)
        .await?;
    Ok(if granted > 0 {
        Take::Granted(granted)
    } else {
        Take::Refused {
            retry_after: Duration::from_micros(retry_after_us),
        }
    })
}
