//! The one generic stream-consumer loop every worker capability plugs into.
//!
//! A consumer reads its group's streams (every shard's on a standalone Redis,
//! one shard's on a cluster) in one `XREADGROUP` with explicit `COUNT` and
//! `BLOCK`, on a connection of its own. Before a read, at most every
//! `HOUSEKEEPING_INTERVAL`, it runs its handler's housekeeping (due retries
//! back onto the stream), and every quarter of `claim_idle_ms` (within
//! bounds) it first takes over jobs another consumer left pending for longer
//! than `claim_idle_ms` (it crashed, or hangs) with `XAUTOCLAIM`. It hands each
//! delivery to a [`JobHandler`], which ends the job itself (in the same script
//! that records the outcome). A handler that fails leaves the job pending, so
//! it is delivered again after `claim_idle_ms`: nothing is lost, and because
//! every ending script checks state first, nothing is applied twice.
//!
//! On shutdown a consumer lets a read in flight finish (Redis has already
//! made its entries pending for it), handles the deliveries in hand, then returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::join_all;
use tokio::sync::watch;

use crate::store::keys::StreamKind;
use crate::store::slots::Shard;
use crate::store::{Store, StoreResult};

/// One stream entry delivered to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub stream_id: String,
    pub fields: HashMap<String, String>,
}

impl Delivery {
    /// Stream entries, `[[id, [field, value, ...]], ...]`, as deliveries,
    /// taken straight from the reply without redis-rs's intermediate maps
    /// (they showed in the profile). Fields that are not text are left out,
    /// as tally writes only text and integers.
    fn from_entries(entries: redis::Value) -> Vec<Delivery> {
        let redis::Value::Array(entries) = entries else {
            return Vec::new();
        };
        entries
            .into_iter()
            .filter_map(|entry| {
                let redis::Value::Array(parts) = entry else {
                    return None;
                };
                let mut parts = parts.into_iter();
                let stream_id = text(parts.next()?)?;
                let redis::Value::Array(flat) = parts.next()? else {
                    return None; // an entry deleted since: nothing to deliver
                };
                let mut fields = HashMap::with_capacity(flat.len() / 2);
                let mut flat = flat.into_iter();
                while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                    if let (Some(name), Some(value)) = (text(name), text(value)) {
                        fields.insert(name, value);
                    }
                }
                Some(Delivery { stream_id, fields })
            })
            .collect()
    }
}

fn text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        redis::Value::SimpleString(text) => Some(text),
        redis::Value::Int(number) => Some(number.to_string()),
        _ => None,
    }
}

/// What a capability does with its jobs. Every stream is per shard: a
/// handler is told which shard's stream a delivery came from.
pub trait JobHandler: Send + Sync + 'static {
    /// Handles one delivery and ends it (acknowledges it) when done. Errors
    /// leave the job pending for re-delivery.
    fn handle(
        &self,
        consumer: &str,
        shard: Shard,
        delivery: Delivery,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Housekeeping before each read of a shard's stream, such as moving due
    /// retries onto it.
    fn tick(&self, _shard: Shard) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Handles one read's deliveries, concurrently, to the end. A handler may
    /// do better for the whole read (one acknowledgement for all of it).
    fn handle_all(
        &self,
        consumer: &str,
        shard: Shard,
        deliveries: Vec<Delivery>,
    ) -> impl Future<Output = ()> + Send {
        let handled = deliveries.into_iter().map(move |delivery| async move {
            let stream_id = delivery.stream_id.clone();
            // A panic in a handler is a system failure like any other: the
            // job stays pending and is delivered again.
            let handled = AssertUnwindSafe(self.handle(consumer, shard, delivery))
                .catch_unwind()
                .await;
            match handled {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(worker = consumer, stream_id, error = %err, "job left pending for re-delivery")
                }
                Err(_) => tracing::error!(worker = consumer, stream_id, "handler panicked; job left pending for re-delivery"),
            }
        });
        async move {
            join_all(handled).await;
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The streams this consumer reads, each with its shard: every shard's
    /// on a standalone Redis, in one read; one shard's on a cluster, where a
    /// command's keys must share a slot (see [`stream_groups`]).
    pub streams: Vec<(Shard, String)>,
    pub group: &'static str,
    /// Unique per consumer: names the pending jobs it holds.
    pub consumer: String,
    /// Most jobs read from each stream at once, and most handled
    /// concurrently (a read of several streams is handled a stream at a
    /// time when it holds more).
    pub read_count: usize,
    /// Longest a read waits for new jobs.
    pub block_ms: u64,
    /// Pause after a short read (no stream gave a full `read_count`), so the
    /// next one gathers more jobs.
    pub gather: Duration,
    /// Whether this consumer runs the handler's housekeeping (`tick`): one
    /// consumer per stream in a process is enough.
    pub housekeeping: bool,
    /// How long a job may stay pending with one consumer before another takes it over.
    pub claim_idle_ms: u64,
}

/// Pause after a failed read, so a Redis outage is not a busy loop.
const READ_ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Least time between two rounds of housekeeping (the handler's `tick`), so
/// a busy consumer does not pay another round trip on every read. An idle
/// one does it once per read, that is at most once per `block_ms`.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);
/// Bounds on how often a consumer looks for jobs left pending too long
/// (`XAUTOCLAIM`): a quarter of `claim_idle_ms` within these, since a job is
/// only taken over after that long anyway. A process reads every shard's
/// streams, so this is paid once per stream per shard.
const TAKE_OVER_INTERVAL_MIN: Duration = Duration::from_millis(50);
const TAKE_OVER_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// Runs one consumer until `shutdown` turns true.
pub async fn run_consumer<H: JobHandler>(
    store: Store,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    let consumer = settings.consumer.as_str();
    tracing::debug!(
        worker = consumer,
        streams = settings.streams.len(),
        "consumer started"
    );
    let mut groups_ready = false;
    // The consumer's own connection for its blocking reads, kept between
    // reads and replaced after an error.
    let mut reader: Option<redis::aio::MultiplexedConnection> = None;
    let mut last_housekeeping: Option<Instant> = None;
    let mut last_take_over: Option<Instant> = None;
    let take_over_interval = (Duration::from_millis(settings.claim_idle_ms) / 4)
        .clamp(TAKE_OVER_INTERVAL_MIN, TAKE_OVER_INTERVAL_MAX);
    while !*shutdown.borrow() {
        if !groups_ready {
            groups_ready = ensure_groups(&store, &settings).await.is_ok();
        }
        let housekeeping = settings.housekeeping
            && last_housekeeping.is_none_or(|at| at.elapsed() >= HOUSEKEEPING_INTERVAL);
        if housekeeping {
            last_housekeeping = Some(Instant::now());
            for &(shard, _) in &settings.streams {
                if let Err(err) = handler.tick(shard).await {
                    tracing::warn!(worker = consumer, error = %err, "housekeeping failed");
                }
            }
        }
        // Not raced against shutdown: once Redis has answered a read, its
        // entries are pending for this consumer, and dropping the answer would
        // leave them to wait claim_idle_ms for another. A read blocks at most
        // block_ms, so that is the most shutdown waits for it.
        let take_over = last_take_over.is_none_or(|at| at.elapsed() >= take_over_interval);
        if take_over {
            last_take_over = Some(Instant::now());
        }
        let read = next_deliveries(&store, &mut reader, &settings, take_over).await;
        let deliveries = match read {
            Ok(deliveries) => deliveries,
            Err(err) => {
                // A group may be gone (its stream was deleted): create it
                // again; the connection may be broken: take another.
                groups_ready = false;
                reader = None;
                tracing::warn!(worker = consumer, error = %err, "reading the streams failed");
                tokio::time::sleep(READ_ERROR_PAUSE).await;
                continue;
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        let short = deliveries
            .iter()
            .all(|(_, read)| read.len() < settings.read_count);
        // Each shard's deliveries to the end, even if shutdown arrives
        // meanwhile: the shards side by side while they hold no more than
        // `read_count` jobs together (COUNT bounds each stream's share of a
        // read, not the sum), else one shard after another.
        let total: usize = deliveries.iter().map(|(_, read)| read.len()).sum();
        if total <= settings.read_count {
            let handled = deliveries
                .into_iter()
                .map(|(shard, read)| handler.handle_all(consumer, shard, read));
            join_all(handled).await;
        } else {
            for (shard, read) in deliveries {
                handler.handle_all(consumer, shard, read).await;
            }
        }
        if short && !settings.gather.is_zero() {
            let mut shutdown = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(settings.gather) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        }
    }
    tracing::debug!(worker = consumer, "consumer stopped");
}

/// Every stream's consumer group, made where missing.
async fn ensure_groups(store: &Store, settings: &ConsumerSettings) -> StoreResult<()> {
    let mut conn = store.conn().await?;
    for (_, stream) in &settings.streams {
        ensure_group(&mut conn, stream, settings.group).await?;
    }
    Ok(())
}

/// How a process's consumers split a kind of stream over the shards: one
/// consumer reads every shard's stream in one `XREADGROUP` on a standalone
/// Redis (16 streams, one read: the reads stay as large as one stream's
/// were), one per shard on a cluster.
pub fn stream_groups(store: &Store, kind: StreamKind) -> Vec<Vec<(Shard, String)>> {
    let keys = store.keys();
    let streams = keys
        .shards()
        .map(|shard| (shard, keys.job_stream(kind, shard)));
    if store.is_cluster() {
        streams.map(|stream| vec![stream]).collect()
    } else {
        vec![streams.collect()]
    }
}

/// Runs a worker process's consumers until `shutdown` turns true, each
/// finishing the jobs in hand first: `consumers` each of settlement (against
/// the HTTP exchange), wallet transactions, installment collection and
/// notifications, over every shard's streams (one consumer for all shards on
/// a standalone Redis, one per shard on a cluster); retention (the journal
/// archived, then trimmed) and the stream trims, the saga sweeper and the periodic audit. Each consumer blocks on a connection of its own.
pub async fn run_workers(
    store: Store,
    settings: &crate::config::WorkerSettings,
    windows: crate::retention::Windows,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    settings.validate().map_err(anyhow::Error::msg)?;
    let exchange = crate::exchange::HttpExchange::new(&crate::exchange::ExchangeSettings {
        url: settings.exchange_url().to_owned(),
        connect_timeout: Duration::from_millis(settings.exchange_connect_timeout_ms),
        request_timeout: Duration::from_millis(settings.exchange_timeout_ms),
    })?;
    let settler = Arc::new(crate::settlement::Settler::new(
        store.clone(),
        exchange,
        crate::settlement::SettlementSettings {
            attempts_max: settings.attempts_max,
            retry_base: Duration::from_millis(settings.retry_base_ms),
            retry_max: Duration::from_millis(settings.retry_max_ms),
            promote_limit: crate::config::RETRY_PROMOTE_LIMIT_DEFAULT,
        },
    ));
    let name = settings.worker_name();
    let mut consumers = tokio::task::JoinSet::new();
    consumers.spawn(crate::retention::retain_periodically(
        store.clone(),
        crate::archive::Archive::new(&settings.archive_dir)
            .with_lease_ms(settings.archive_lease_ms),
        windows,
        Duration::from_millis(settings.retention_interval_ms),
        shutdown.clone(),
    ));
    consumers.spawn(crate::sagas::sweep_periodically(
        store.clone(),
        shutdown.clone(),
    ));
    consumers.spawn(crate::audit::audit_periodically(
        store.clone(),
        Duration::from_millis(settings.audit_interval_ms),
        shutdown.clone(),
    ));
    consumers.spawn(trim_streams_periodically(
        store.clone(),
        Duration::from_millis(settings.stream_retention_ms),
        shutdown.clone(),
    ));
    let wallet = Arc::new(crate::wallet::WalletWorker::new(store.clone()));
    let collector = Arc::new(crate::advances::Collector::new(
        store.clone(),
        settings.installments_max,
    ));
    let notifier = Arc::new(crate::notifier::Notifier::new(
        store.clone(),
        settings.notifier(),
    )?);
    for index in 0..settings.consumers {
        let consumer =
            |streams: Vec<(Shard, String)>, group: &'static str, role: &str| ConsumerSettings {
                streams,
                group,
                consumer: if settings.consumers == 1 {
                    format!("{name}-{role}")
                } else {
                    format!("{name}-{role}-{index}")
                },
                read_count: settings.read_count,
                block_ms: settings.block_ms,
                gather: Duration::from_millis(settings.gather_ms),
                housekeeping: index == 0,
                claim_idle_ms: settings.claim_idle_ms,
            };
        for streams in stream_groups(&store, StreamKind::Settle) {
            let settle = consumer(streams, crate::store::settlement::SETTLE_GROUP, "settle");
            consumers.spawn(run_consumer(
                store.clone(),
                settle,
                settler.clone(),
                shutdown.clone(),
            ));
        }
        for streams in stream_groups(&store, StreamKind::Wallet) {
            let wallet_consumer = consumer(streams, crate::store::wallet::WALLET_GROUP, "wallet");
            consumers.spawn(run_consumer(
                store.clone(),
                wallet_consumer,
                wallet.clone(),
                shutdown.clone(),
            ));
        }
        for streams in stream_groups(&store, StreamKind::Installments) {
            let collect = consumer(streams, crate::store::advances::COLLECT_GROUP, "collect");
            consumers.spawn(run_consumer(
                store.clone(),
                collect,
                collector.clone(),
                shutdown.clone(),
            ));
        }
        for streams in stream_groups(&store, StreamKind::Events) {
            let notify = consumer(streams, crate::notifier::NOTIFY_GROUP, "notify");
            consumers.spawn(run_consumer(
                store.clone(),
                notify,
                notifier.clone(),
                shutdown.clone(),
            ));
        }
    }
    while let Some(joined) = consumers.join_next().await {
        joined?;
    }
    Ok(())
}

/// How often a worker process trims what the consumer groups are done with.
const STREAM_TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// A consumer that holds no job and has not read for this long most likely
/// belongs to a worker process that is gone. (On Redis 7.0 a read that
/// returns nothing does not reset a consumer's idle time, so a live one on a
/// quiet stream may be forgotten too: harmless, as it holds no job and its
/// next read makes it again.)
const CONSUMER_IDLE_FORGET_MS: u64 = 60 * 60 * 1000;

/// Trims the consumed entries of every shard's job streams, and forgets their
/// long-idle consumers that hold no job, every `STREAM_TRIM_INTERVAL` until
/// shutdown. Any number of workers may do this at once: each step only
/// deletes what no group needs.
pub async fn trim_streams_periodically(
    store: Store,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let older_than_ms = u64::try_from(crate::store::now_ms())
            .unwrap_or(0)
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let streams = store
            .keys()
            .shards()
            .flat_map(|shard| StreamKind::ALL.map(|kind| store.keys().job_stream(kind, shard)));
        for stream in streams {
            let stream = stream.as_str();
            let trimmed = match store.conn().await {
                Ok(mut conn) => {
                    crate::store::streams::trim_consumed(&mut conn, stream, older_than_ms).await
                }
                Err(err) => Err(err),
            };
            match trimmed {
                Ok(0) => {}
                Ok(count) => tracing::debug!(stream, count, "consumed stream entries trimmed"),
                Err(err) => tracing::warn!(stream, error = %err, "trimming a stream failed"),
            }
            let forgotten = match store.conn().await {
                Ok(mut conn) => {
                    crate::store::streams::delete_idle_consumers(
                        &mut conn,
                        stream,
                        CONSUMER_IDLE_FORGET_MS,
                    )
                    .await
                }
                Err(err) => Err(err),
            };
            match forgotten {
                Ok(0) => {}
                Ok(count) => tracing::info!(stream, count, "idle consumers with no jobs forgotten"),
                Err(err) => {
                    tracing::warn!(stream, error = %err, "forgetting idle consumers failed")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STREAM_TRIM_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// One read's deliveries, by shard: jobs left pending too long by any
/// consumer first (when `take_over`), then new ones, from every stream at once.
type Read = Vec<(Shard, Vec<Delivery>)>;

/// Jobs left pending too long by any consumer first (when `take_over`), then new ones.
async fn next_deliveries(
    store: &Store,
    reader: &mut Option<redis::aio::MultiplexedConnection>,
    settings: &ConsumerSettings,
    take_over: bool,
) -> StoreResult<Read> {
    let Some((_, first)) = settings.streams.first() else {
        return Ok(Vec::new());
    };
    if reader.is_none() {
        *reader = Some(store.dedicated_conn(first).await?);
    }
    let conn = reader.as_mut().expect("a reader connection");
    if take_over {
        let mut claimed = Vec::new();
        for (shard, stream) in &settings.streams {
            let taken = take_over_pending(conn, settings, stream).await?;
            if !taken.is_empty() {
                claimed.push((*shard, taken));
            }
        }
        if !claimed.is_empty() {
            return Ok(claimed);
        }
    }
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(settings.group)
        .arg(&settings.consumer)
        .arg("COUNT")
        .arg(settings.read_count)
        .arg("BLOCK")
        .arg(settings.block_ms)
        .arg("STREAMS");
    for (_, stream) in &settings.streams {
        read.arg(stream);
    }
    for _ in &settings.streams {
        read.arg(">");
    }
    // Nil after the block, or [stream, [entries]] per stream with entries
    // (a map under RESP3).
    let reply: redis::Value = read.query_async(conn).await?;
    let per_stream: Vec<(redis::Value, redis::Value)> = match reply {
        redis::Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                redis::Value::Array(pair) => {
                    let mut pair = pair.into_iter();
                    Some((pair.next()?, pair.next()?))
                }
                _ => None,
            })
            .collect(),
        redis::Value::Map(streams) => streams,
        _ => Vec::new(),
    };
    Ok(per_stream
        .into_iter()
        .filter_map(|(name, entries)| {
            let name = text(name)?;
            let (shard, _) = settings.streams.iter().find(|(_, s)| *s == name)?;
            Some((*shard, Delivery::from_entries(entries)))
        })
        .filter(|(_, deliveries)| !deliveries.is_empty())
        .collect())
}

/// Takes over jobs another consumer has left pending on `stream` for `claim_idle_ms`.
async fn take_over_pending(
    conn: &mut redis::aio::MultiplexedConnection,
    settings: &ConsumerSettings,
    stream: &str,
) -> StoreResult<Vec<Delivery>> {
    // [next cursor, [entries], [ids deleted meanwhile]]
    let reply: redis::Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(settings.group)
        .arg(&settings.consumer)
        .arg(settings.claim_idle_ms)
        .arg("0-0")
        .arg("COUNT")
        .arg(settings.read_count)
        .query_async(conn)
        .await?;
    let claimed = match reply {
        redis::Value::Array(parts) => parts
            .into_iter()
            .nth(1)
            .map(Delivery::from_entries)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    for delivery in &claimed {
        tracing::info!(worker = %settings.consumer, stream, stream_id = %delivery.stream_id, "took over a job left pending");
    }
    Ok(claimed)
}

/// Creates the consumer group (and the stream) if needed; reading from the
/// start, so jobs written before the first worker ever ran are not skipped.
pub async fn ensure_group(
    conn: &mut impl crate::store::Conn,
    stream: &str,
    group: &str,
) -> StoreResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// A delay that doubles with each attempt from `base` up to `max`, with
/// "equal jitter": somewhere in the upper half, so delays still grow while
/// workers that failed together spread out.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1 << doublings).min(max);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_deliveries_without_their_deleted_ones() {
        use redis::Value::{Array, BulkString, Nil};
        let bulk = |text: &str| BulkString(text.as_bytes().to_vec());
        let entries = Array(vec![
            Array(vec![
                bulk("1-0"),
                Array(vec![
                    bulk("batch_id"),
                    bulk("b1"),
                    bulk("attempt"),
                    bulk("2"),
                ]),
            ]),
            Array(vec![bulk("2-0"), Nil]), // deleted since it was read
            Array(vec![
                bulk("3-0"),
                Array(vec![bulk("type"), bulk("x"), bulk("odd")]),
            ]),
        ]);
        let deliveries = Delivery::from_entries(entries);
        assert_eq!(deliveries.len(), 2);
        assert_eq!(deliveries[0].stream_id, "1-0");
        assert_eq!(deliveries[0].fields["batch_id"], "b1");
        assert_eq!(deliveries[0].fields["attempt"], "2");
        assert_eq!(deliveries[1].stream_id, "3-0");
        assert_eq!(
            deliveries[1].fields.len(),
            1,
            "a name without a value is dropped"
        );
    }

    #[test]
    fn backoff_grows_within_bounds() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let ceiling = (base * 2u32.saturating_pow(attempt - 1).min(1 << 30)).min(max);
            let delay = backoff(attempt, base, max);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
