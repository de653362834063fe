//! Redis: the connection pool, key names, and one typed wrapper per script.
//!
//! Everything that talks to Redis goes through [`Store`]. Scripts are loaded
//! from `lua/` at compile time and run with EVALSHA (falling back to EVAL once
//! after a Redis restart flushed the script cache).

/// A script from `lua/`, with `lua/lib.lua`'s shared helpers prepended,
/// built once on first use.
macro_rules! lua_script {
    ($file:literal) => {
        std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $file))
            ))
        })
    };
}

pub mod accounts;
pub mod advances;
pub mod api_keys;
pub mod archive;
pub mod connection;
pub mod console;
pub mod dead_letters;
pub mod journal;
pub mod keys;
pub mod locks;
pub mod order_saga;
pub mod orders;
pub mod rate_limits;
pub mod refund_saga;
pub mod replica_acks;
pub mod settlement;
pub mod slots;
pub mod streams;
pub mod transfer_saga;
pub mod transfers;
pub mod wallet;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;

use crate::config::RedisSettings;
use crate::domain::{AccountId, SystemAccount};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection to Redis could be made (refused, timed out, the
    /// handshake failed): no command was sent.
    #[error("redis connect: {0}")]
    Connect(redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// Data in Redis that tally could not have written: a broken invariant.
    #[error("corrupt record {key}: {problem}")]
    Corrupt { key: String, problem: String },
    #[error("unexpected script reply: {0:?}")]
    UnexpectedReply(Vec<String>),
    /// What a multi-step read depends on kept changing under it (the journal
    /// trimmed during an audit); nothing was written. Run it again.
    #[error("{0}")]
    Contended(String),
    /// A grouped script call failed as a whole; each order in it gets this.
    #[error("redis: {message}")]
    GroupFailed {
        message: String,
        /// The call may have run (see [`StoreError::outcome_unknown`]).
        outcome_unknown: bool,
    },
}

impl StoreError {
    /// Whether the command may have reached Redis and run with only its
    /// reply lost (an IO error, a timeout, a dropped connection). A failed
    /// connect (refused or timed out), a pool checkout failure or an error
    /// reply (a full Redis refusing a write) means it did not run.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            // A refused connection never carried the command: nothing ran.
            StoreError::Redis(err) if err.is_connection_refusal() => false,
            StoreError::Redis(err) => {
                err.is_io_error() || err.is_timeout() || err.is_connection_dropped()
            }
            StoreError::GroupFailed {
                outcome_unknown, ..
            } => *outcome_unknown,
            StoreError::Connect(_)
            | StoreError::Pool(_)
            | StoreError::Corrupt { .. }
            | StoreError::UnexpectedReply(_)
            | StoreError::Contended(_) => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Any async Redis connection the wrappers can run on: a pooled one in the
/// app, a plain one in tests.
pub trait Conn: redis::aio::ConnectionLike + Send + Sync {}

impl<T: redis::aio::ConnectionLike + Send + Sync> Conn for T {}

/// A handle on Redis (a standalone node or a cluster), cheap to clone.
///
/// Requests share one multiplexed connection: commands from concurrent tasks
/// are pipelined on it, with no checkout and no per-request round trip
/// beyond the command itself. Blocking reads (`XREADGROUP ... BLOCK`) would
/// stall everyone else on that connection, so they take a dedicated one.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    keys: keys::Keys,
    /// Whether operations over two shards run as sagas (see [`Store::sagas`]).
    sagas: bool,
}

#[derive(Clone)]
enum Backend {
    /// A standalone Redis: the shared connection, and a pool that makes the
    /// blocking readers' own connections.
    Node {
        shared: connection::SharedConnection,
        pool: Pool,
    },
    /// A Redis Cluster: redis-rs's cluster connection, and how to reach one
    /// of its nodes for a blocking reader.
    Cluster {
        shared: connection::ClusterConn,
        node: redis::ConnectionInfo,
        config: AsyncConnectionConfig,
    },
}

impl Store {
    /// Connects to `TALLY_REDIS_URL`: asks the first of its seed nodes that
    /// answers whether it is part of a cluster (`cluster_enabled:1`), and
    /// connects to the cluster or to that one node accordingly.
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let seeds = settings.seeds();
        let config = connection_config(settings);
        let mut failures = Vec::new();
        let mut cluster = None;
        for seed in &seeds {
            match cluster_enabled(seed, &config).await {
                Ok(enabled) => {
                    cluster = Some(enabled);
                    break;
                }
                Err(err) => failures.push(format!("{seed}: {err}")),
            }
        }
        let Some(cluster) = cluster else {
            anyhow::bail!("no Redis answered: {}", failures.join("; "));
        };
        if !cluster {
            anyhow::ensure!(
                seeds.len() == 1,
                "TALLY_REDIS_URL lists {} nodes, but {} is not part of a Redis Cluster: \
                 name one standalone Redis, or seeds of a cluster",
                seeds.len(),
                seeds[0]
            );
            return Self::connect_node(settings);
        }
        let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(settings.timeout())
            .response_timeout(settings.timeout())
            .build()?;
        let conn = client.get_async_connection().await?;
        let node = redis::IntoConnectionInfo::into_connection_info(seeds[0])?;
        Ok(Store {
            backend: Backend::Cluster {
                shared: connection::ClusterConn::new(conn),
                node,
                config,
            },
            keys: keys::Keys::new(settings.shards),
            sagas: true,
        })
    }

    /// Connects to one standalone Redis, lazily: nothing is sent until the
    /// first command (`tally migrate`, which works on one node only, and
    /// the spec's unconnected store).
    pub fn connect_node(settings: &RedisSettings) -> anyhow::Result<Self> {
        let config = connection_config(settings);
        let client = redis::Client::open(settings.url())?;
        let manager = Manager::new_with_config(settings.url(), config.clone())?;
        let pool = Pool::builder(manager)
            .max_size(settings.redis_pool_size_max)
            .wait_timeout(Some(settings.timeout()))
            .create_timeout(Some(settings.timeout()))
            .recycle_timeout(Some(settings.timeout()))
            .runtime(Runtime::Tokio1)
            .build()?;
        Ok(Store {
            backend: Backend::Node {
                shared: connection::SharedConnection::new(client, config),
                pool,
            },
            keys: keys::Keys::new(settings.shards),
            sagas: settings.sagas == crate::config::Sagas::Always,
        })
    }

    /// Whether an operation whose keys lie on two shards runs as a saga of
    /// one-shard steps (a cluster, or `TALLY_SAGAS=always`) rather than as
    /// one script over both shards, which only a standalone Redis allows.
    pub fn sagas(&self) -> bool {
        self.sagas
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// The key names of this deployment's shard layout.
    pub fn keys(&self) -> &keys::Keys {
        &self.keys
    }

    /// A store that has not connected (pools connect lazily): enough to
    /// build the API for its spec.
    pub fn unconnected() -> Self {
        let settings = RedisSettings::for_url(crate::config::REDIS_URL_DEFAULT);
        Self::connect_node(&settings).expect("the default Redis URL parses")
    }

    /// The shared connection, for every command that does not block; a
    /// failure here ([`StoreError::Connect`]) means nothing was sent.
    pub async fn conn(&self) -> StoreResult<connection::Conn> {
        match &self.backend {
            Backend::Node { shared, .. } => Ok(connection::Conn::Node(shared.get().await?)),
            Backend::Cluster { shared, .. } => Ok(connection::Conn::Cluster(shared.clone())),
        }
    }

    /// Notes every later script call's keys in `recorder`, on this store
    /// and every clone of it (tests: how far the layout is from a cluster's).
    pub fn record_script_slots(&self, recorder: std::sync::Arc<slots::SlotRecorder>) {
        match &self.backend {
            Backend::Node { shared, .. } => shared.record_script_slots(recorder),
            Backend::Cluster { shared, .. } => shared.record_script_slots(recorder),
        }
    }

    /// A connection of its own to the node that holds `key`, for blocking
    /// reads of it. On one node: made by the pool, then taken out of it,
    /// since a blocking reader holds it for its whole life (a worker runs
    /// one per stream per shard) and must not starve the pool. On a cluster:
    /// to the master of `key`'s slot as the cluster says now; a reader whose
    /// node fails or gives the slot away (`MOVED`) takes another.
    pub async fn dedicated_conn(
        &self,
        key: &str,
    ) -> StoreResult<redis::aio::MultiplexedConnection> {
        match &self.backend {
            Backend::Node { pool, .. } => Ok(deadpool_redis::Connection::take(pool.get().await?)),
            Backend::Cluster {
                shared,
                node,
                config,
            } => {
                let slot = slots::hash_slot(key.as_bytes());
                let (host, port) = master_of(&mut shared.clone(), slot).await?;
                let info = node
                    .clone()
                    .set_addr(redis::ConnectionAddr::Tcp(host, port));
                let client = redis::Client::open(info)?;
                Ok(client
                    .get_multiplexed_async_connection_with_config(config)
                    .await
                    .map_err(StoreError::Connect)?)
            }
        }
    }

    /// Keys of which each lives on another master, one per master: the
    /// replica counter of one shard each master serves now (one key on a
    /// standalone Redis). What `TALLY_REPLICA_ACKS` waits on.
    pub async fn one_key_per_master(&self) -> StoreResult<Vec<String>> {
        let Backend::Cluster { shared, .. } = &self.backend else {
            return Ok(vec![self.keys.replica_ack()]);
        };
        let mut conn = shared.clone();
        let mut masters: Vec<(String, u16)> = Vec::new();
        let mut keys = Vec::new();
        for shard in self.keys.shards() {
            let key = self.keys.replica_ack_on(shard);
            let master = master_of(&mut conn, slots::hash_slot(key.as_bytes())).await?;
            if !masters.contains(&master) {
                masters.push(master);
                keys.push(key);
            }
        }
        Ok(keys)
    }

    /// Connects and checks the data in Redis is laid out as this process
    /// would write it ([`Store::check_layout`]): what every command but
    /// `tally migrate` opens Redis with.
    pub async fn open(settings: &RedisSettings) -> anyhow::Result<Self> {
        let store = Store::connect(settings).await?;
        store
            .check_layout()
            .await
            .with_context(|| format!("opening Redis at {}", settings.url()))?;
        Ok(store)
    }

    /// Refuses data in the single-node layout of an earlier tally, and data
    /// written with another shard count; stamps this process's count on an
    /// empty Redis. Safe to run from every process at every start.
    pub async fn check_layout(&self) -> anyhow::Result<()> {
        let mut conn = self.conn().await?;
        let unsharded: bool = redis::cmd("EXISTS")
            .arg(keys::UNSHARDED_BANK)
            .query_async(&mut conn)
            .await?;
        if unsharded {
            anyhow::bail!(
                "this Redis holds data in the single-node key layout of an earlier tally \
                 (`{}` exists): run `tally migrate` to move it to the sharded layout first",
                keys::UNSHARDED_BANK
            );
        }
        let count = self.keys.layout().count();
        let stamped: Option<u16> = redis::cmd("SET")
            .arg(keys::SHARD_COUNT)
            .arg(count)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await?;
        if let Some(stamped) = stamped.filter(|stamped| *stamped != count) {
            anyhow::bail!(
                "this Redis holds data written with TALLY_SHARDS={stamped}, and this process \
                 runs with {count}: the shard count is fixed once data exists; set \
                 TALLY_SHARDS={stamped}"
            );
        }
        Ok(())
    }

    /// Checks the layout ([`Store::check_layout`]), then creates the system
    /// accounts' sub-accounts on every shard if they do not exist yet. Safe
    /// to run from every process at every start.
    pub async fn ensure_system_accounts(&self) -> anyhow::Result<()> {
        self.check_layout().await?;
        let mut conn = self.conn().await?;
        let created_at = now_ms();
        for shard in self.keys.shards() {
            let mut pipe = redis::pipe();
            for system in SystemAccount::ALL {
                let id = system.id();
                let key = self.keys.system_account(system, shard);
                pipe.hset_nx(&key, "id", id.as_str())
                    .hset_nx(&key, "name", id.as_str())
                    .hset_nx(&key, "balance", 0)
                    .hset_nx(&key, "created_at", created_at);
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Loads every script into Redis' cache and checks Redis answers.
    pub async fn ready(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        for script in [&*accounts::CREATE_ACCOUNT, &*orders::PLACE_ORDERS]
            .into_iter()
            .chain(order_saga::scripts())
            .chain(settlement::scripts())
            .chain(journal::scripts())
            .chain(transfers::scripts())
            .chain(transfer_saga::scripts())
            .chain(refund_saga::scripts())
            .chain(wallet::scripts())
            .chain(advances::scripts())
            .chain(streams::scripts())
            .chain(dead_letters::scripts())
            .chain(archive::scripts())
            .chain(api_keys::scripts())
            .chain([&*rate_limits::TAKE_RATE_TOKENS, &*locks::RELEASE_LOCK])
        {
            script.prepare_invoke().load_async(&mut conn).await?;
        }
        Ok(())
    }
}

/// Connection and reply timeouts of every connection to Redis.
fn connection_config(settings: &RedisSettings) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.timeout()))
        .set_response_timeout(Some(settings.timeout()))
}

/// Whether the Redis at `url` is a node of a cluster.
async fn cluster_enabled(url: &str, config: &AsyncConnectionConfig) -> redis::RedisResult<bool> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(config)
        .await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut conn)
        .await?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}

/// The address of the master that serves `slot`, from `CLUSTER SLOTS`.
async fn master_of(conn: &mut impl Conn, slot: u16) -> StoreResult<(String, u16)> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    for range in ranges {
        let redis::Value::Array(range) = range else {
            continue;
        };
        let bound = |at: usize| -> Option<i64> {
            match range.get(at) {
                Some(redis::Value::Int(n)) => Some(*n),
                _ => None,
            }
        };
        let (Some(low), Some(high)) = (bound(0), bound(1)) else {
            continue;
        };
        if !(low..=high).contains(&i64::from(slot)) {
            continue;
        }
        if let Some(redis::Value::Array(master)) = range.get(2)
            && let [host, redis::Value::Int(port), ..] = &master[..]
        {
            let host = match host {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                redis::Value::SimpleString(text) => text.clone(),
                _ => String::new(),
            };
            let port = u16::try_from(*port).map_err(|_| {
                StoreError::UnexpectedReply(vec![format!("port {port} in CLUSTER SLOTS")])
            })?;
            return Ok((host, port));
        }
    }
    Err(StoreError::UnexpectedReply(vec![format!(
        "no master serves slot {slot}"
    )]))
}

/// Members `offset..offset + limit` of a per-shard sorted set (`index`, one
/// per shard, scored by time) merged over every shard by (score, member):
/// each shard gives its first `offset + limit`, so a page costs O(shards x
/// (offset + limit)). Returns each member with its shard.
pub async fn merged_page(
    conn: &mut impl Conn,
    keys: &keys::Keys,
    index: fn(&keys::Keys, slots::Shard) -> String,
    offset: usize,
    limit: usize,
) -> StoreResult<Vec<(String, slots::Shard)>> {
    use redis::AsyncCommands;
    let last = isize::try_from(offset + limit).unwrap_or(isize::MAX) - 1;
    let mut merged: Vec<(i64, String, slots::Shard)> = Vec::new();
    for shard in keys.shards() {
        let page: Vec<(String, i64)> = conn.zrange_withscores(index(keys, shard), 0, last).await?;
        merged.extend(
            page.into_iter()
                .map(|(member, score)| (score, member, shard)),
        );
    }
    merged.sort_unstable();
    Ok(merged
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(_, member, shard)| (member, shard))
        .collect())
}

/// Which end of a scored index a page starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Lowest score first.
    Oldest,
    /// Highest score first.
    Newest,
}

/// Members sharing one score on one shard that a page cursor steps over
/// exactly; more than this at one score, and a page may skip some.
pub const SCORE_TIES_MAX: usize = 1_000;

/// A page of a per-shard sorted set (`index`, scored by time) merged over
/// every shard by (score, member), in `order`, past the cursor (the last
/// page's last (score, member)). One pipeline: per shard, the members
/// tied with the cursor's score, then at most `limit` past it, so a page
/// costs O(shards x limit) however deep it is.
pub async fn scored_page(
    conn: &mut impl Conn,
    keys: &keys::Keys,
    index: fn(&keys::Keys, slots::Shard) -> String,
    order: Order,
    cursor: Option<(i64, String)>,
    limit: usize,
) -> StoreResult<Vec<(String, i64)>> {
    let mut pipe = redis::pipe();
    for shard in keys.shards() {
        let key = index(keys, shard);
        let (from, to) = match (&cursor, order) {
            (None, Order::Oldest) => ("-inf".to_owned(), "+inf".to_owned()),
            (None, Order::Newest) => ("+inf".to_owned(), "-inf".to_owned()),
            (Some((score, _)), Order::Oldest) => (format!("({score}"), "+inf".to_owned()),
            (Some((score, _)), Order::Newest) => (format!("({score}"), "-inf".to_owned()),
        };
        if let Some((score, _)) = &cursor {
            pipe.cmd("ZRANGE")
                .arg(&key)
                .arg(score)
                .arg(score)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(SCORE_TIES_MAX)
                .arg("WITHSCORES");
        }
        let range = pipe
            .cmd("ZRANGE")
            .arg(&key)
            .arg(&from)
            .arg(&to)
            .arg("BYSCORE");
        if order == Order::Newest {
            range.arg("REV");
        }
        range.arg("LIMIT").arg(0).arg(limit).arg("WITHSCORES");
    }
    let replies: Vec<Vec<(String, i64)>> = pipe.query_async(conn).await?;
    let mut merged: Vec<(i64, String)> = Vec::new();
    for (index, reply) in replies.into_iter().enumerate() {
        // With a cursor, even replies are its score's ties: only the members
        // past the cursor's count.
        let ties = cursor.as_ref().filter(|_| index % 2 == 0);
        merged.extend(
            reply
                .into_iter()
                .filter(|(member, _)| match (ties, order) {
                    (None, _) => true,
                    (Some((_, at)), Order::Oldest) => member > at,
                    (Some((_, at)), Order::Newest) => member < at,
                })
                .map(|(member, score)| (score, member)),
        );
    }
    merged.sort_unstable();
    if order == Order::Newest {
        merged.reverse();
    }
    merged.truncate(limit);
    Ok(merged
        .into_iter()
        .map(|(score, member)| (member, score))
        .collect())
}

/// A script's yes/no argument.
pub(crate) fn flag(yes: bool) -> &'static str {
    if yes { "1" } else { "0" }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(since_epoch.as_millis()).expect("milliseconds fit in i64")
}

/// A Redis hash read back with `HGETALL`, with typed, checked field access.
pub struct Record {
    key: String,
    fields: HashMap<String, String>,
}

impl Record {
    /// `None` when the hash does not exist (`HGETALL` gave nothing).
    pub fn new(key: String, fields: HashMap<String, String>) -> Option<Self> {
        (!fields.is_empty()).then_some(Record { key, fields })
    }

    pub fn text(&self, field: &str) -> StoreResult<&str> {
        self.fields
            .get(field)
            .map(String::as_str)
            .ok_or_else(|| self.corrupt(format!("field `{field}` is missing")))
    }

    pub fn optional_text(&self, field: &str) -> Option<&str> {
        self.fields
            .get(field)
            .map(String::as_str)
            .filter(|text| !text.is_empty())
    }

    pub fn integer(&self, field: &str) -> StoreResult<i64> {
        let text = self.text(field)?;
        text.parse()
            .map_err(|_| self.corrupt(format!("field `{field}` is `{text}`, not an integer")))
    }

    /// Parses a field with a domain parser, reporting failure as corruption.
    pub fn parsed<T, E: std::fmt::Display>(
        &self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> StoreResult<T> {
        let text = self.text(field)?;
        parse(text).map_err(|err| self.corrupt(format!("field `{field}`: {err}")))
    }

    pub fn corrupt(&self, problem: String) -> StoreError {
        StoreError::Corrupt {
            key: self.key.clone(),
            problem,
        }
    }
}

/// The first word of a script's reply, which every script uses as its verdict.
pub fn verdict(reply: &[String]) -> &str {
    reply.first().map(String::as_str).unwrap_or("")
}

/// The account a `balance_limit` refusal names (the one the move would take
/// past [`crate::domain::BALANCE_LIMIT_CENTS`]), parsed strictly: `None` for
/// anything else, which the caller reports as an unexpected reply.
pub fn balance_limit_account(word: Option<&String>) -> Option<AccountId> {
    word.and_then(|id| AccountId::parse(id).ok())
}

/// A stream entry's fields as text (tally writes only text and integers).
pub fn stream_fields(entry: &redis::streams::StreamId) -> HashMap<String, String> {
    entry
        .map
        .iter()
        .filter_map(|(name, value)| {
            redis::from_redis_value_ref::<String>(value)
                .ok()
                .map(|value| (name.clone(), value))
        })
        .collect()
}
