//! The overview's figures: one read of Redis, shared by every browser open
//! on this process. A read is at most `TALLY_CONSOLE_SNAPSHOT_MS` old; while
//! one is being made, every other request waits for it rather than making
//! its own, so ten open tabs cost what one does.
//!
//! Each read is O(shards): counts from `XLEN`, `ZCARD`, `XINFO GROUPS` and
//! `XPENDING`'s summary, each system sub-account's balance, one `LINDEX` per
//! bucket. Nothing scans.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::Value;
use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply};

use crate::api::metrics::{self, JOB_STREAMS};
use crate::domain::{OrderId, SystemAccount};
use crate::store::console::AuditSummary;
use crate::store::keys::StreamKind;
use crate::store::slots::Shard;
use crate::store::streams::StreamId;
use crate::store::{Store, StoreResult, now_ms};

/// How often the flow charts' counters are sampled, whether or not anyone
/// is looking, so the charts have their history when someone does.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// How far back the flow charts reach.
pub const CHART_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples kept: the window's, and one before it to take a rate from.
const SAMPLES_MAX: usize = (CHART_WINDOW.as_secs() / SAMPLE_INTERVAL.as_secs()) as usize + 2;

/// The consumer group that works each job stream.
pub fn group_of(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::Settle => crate::store::settlement::SETTLE_GROUP,
        StreamKind::Wallet => crate::store::wallet::WALLET_GROUP,
        StreamKind::Installments => crate::store::advances::COLLECT_GROUP,
        StreamKind::Events => crate::notifier::NOTIFY_GROUP,
    }
}

/// Cumulative counts the flow charts are drawn from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Orders paid (debited and owed to the exchange), ever.
    pub orders_paid: u64,
    pub batches_settled: u64,
    /// Accounting events read by the notifiers and no longer pending.
    pub events_delivered: u64,
}

#[derive(Debug, Clone)]
pub struct BucketRow {
    pub symbol: String,
    pub value_cents: i64,
    pub orders: i64,
    /// How long its oldest order has waited for the exchange minimum.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct StreamRow {
    pub label: &'static str,
    pub length: u64,
    /// Delivered to a worker, not yet acknowledged.
    pub pending: u64,
    /// Not yet delivered to any worker.
    pub lag: u64,
    /// The most consumers any shard's stream has.
    pub consumers: u64,
    pub dead_letters: u64,
    /// How long the oldest job not yet finished (pending or not delivered)
    /// has been on the stream.
    pub oldest_unfinished_age_ms: Option<i64>,
}

/// Everything the overview shows, as read at `read_at_ms`.
#[derive(Debug, Clone)]
pub struct Overview {
    pub read_at_ms: i64,
    /// Each system account's balance, its sub-accounts summed.
    pub system_balances: Vec<(SystemAccount, i64)>,
    /// What customers hold: every balance sums to zero, so it is minus the
    /// system accounts' (the audit sums customers' accounts themselves).
    pub customer_balances_cents: i64,
    pub audit: Option<AuditSummary>,
    pub buckets: Vec<BucketRow>,
    pub streams: Vec<StreamRow>,
    pub failed_batches: u64,
    /// Settle jobs waiting for their next attempt.
    pub settle_retries: u64,
    pub counters: Counters,
}

impl Overview {
    pub fn stream(&self, kind: StreamKind) -> Option<&StreamRow> {
        self.streams.iter().find(|row| row.label == kind.label())
    }
}

/// A snapshot and when it was read.
struct Cached {
    overview: Arc<Overview>,
    read_at: Instant,
}

/// The shared snapshot and the charts' samples.
pub struct SharedOverview {
    store: Store,
    /// The symbols whose buckets are shown.
    symbols: Vec<crate::domain::Symbol>,
    fresh_for: Duration,
    /// Held while a read is made: the requests behind it take its result.
    cached: tokio::sync::Mutex<Option<Cached>>,
    samples: Mutex<VecDeque<(i64, Counters)>>,
    /// Redis reads made, for the test that shows browsers share them.
    reads: std::sync::atomic::AtomicU64,
}

impl SharedOverview {
    pub fn new(
        store: Store,
        symbols: Vec<crate::domain::Symbol>,
        fresh_for: Duration,
    ) -> Arc<Self> {
        Arc::new(SharedOverview {
            store,
            symbols,
            fresh_for,
            cached: tokio::sync::Mutex::new(None),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES_MAX)),
            reads: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Samples the counters every [`SAMPLE_INTERVAL`] for as long as the
    /// console lives.
    pub fn start_sampling(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(shared) = weak.upgrade() else { return };
                if let Err(err) = shared.current().await {
                    tracing::debug!(error = %err, "console: sampling the counters failed");
                }
                drop(shared);
                tokio::time::sleep(SAMPLE_INTERVAL).await;
            }
        });
    }

    /// Redis reads made so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The snapshot, read now if the last is older than `fresh_for`.
    pub async fn current(&self) -> StoreResult<Arc<Overview>> {
        let mut cached = self.cached.lock().await;
        if let Some(hit) = cached.as_ref()
            && hit.read_at.elapsed() < self.fresh_for
        {
            return Ok(hit.overview.clone());
        }
        let read_at = Instant::now();
        let overview = Arc::new(read(&self.store, &self.symbols).await?);
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sample(overview.read_at_ms, overview.counters);
        *cached = Some(Cached {
            overview: overview.clone(),
            read_at,
        });
        Ok(overview)
    }

    fn sample(&self, at_ms: i64, counters: Counters) {
        let mut samples = self.samples.lock().expect("samples lock");
        let interval_ms = SAMPLE_INTERVAL.as_millis() as i64;
        if samples
            .back()
            .is_some_and(|(last, _)| at_ms - last < interval_ms / 2)
        {
            return;
        }
        if samples.len() == SAMPLES_MAX {
            samples.pop_front();
        }
        samples.push_back((at_ms, counters));
    }

    /// Rates per second between consecutive samples in the window, each at
    /// the later sample's time: (ms, orders/s, batches/s, events/s).
    pub fn rates(&self) -> Vec<(i64, f64, f64, f64)> {
        let samples = self.samples.lock().expect("samples lock");
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .filter_map(|((t0, c0), (t1, c1))| {
                let seconds = (t1 - t0) as f64 / 1000.0;
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
                (seconds > 0.0).then(|| {
                    (
                        *t1,
                        rate(c0.orders_paid, c1.orders_paid),
                        rate(c0.batches_settled, c1.batches_settled),
                        rate(c0.events_delivered, c1.events_delivered),
                    )
                })
            })
            .collect()
    }
}

/// What one shard adds to the overview, besides what `/metrics` reads.
#[derive(Default)]
struct ShardFigures {
    system_balances: Vec<i64>,
    orders_paid: u64,
    /// Per job stream: (consumers, pending, lag, entries read, oldest unfinished id).
    streams: Vec<(u64, u64, u64, u64, Option<StreamId>)>,
}

async fn read(store: &Store, symbols: &[crate::domain::Symbol]) -> StoreResult<Overview> {
    let read_at_ms = now_ms();
    let counts = metrics::read_redis(store).await?;
    let mut conn = store.conn().await?;
    let audit = crate::store::console::last_audit(&mut conn, store.keys()).await?;
    let mut system_balances: Vec<(SystemAccount, i64)> =
        SystemAccount::ALL.iter().map(|&kind| (kind, 0)).collect();
    let mut streams: Vec<StreamRow> = JOB_STREAMS
        .iter()
        .map(|kind| StreamRow {
            label: kind.label(),
            ..StreamRow::default()
        })
        .collect();
    let mut orders_paid = 0;
    let mut events_read = 0;
    let mut events_pending = 0;
    for shard in store.keys().shards() {
        let figures = read_shard(store, shard).await?;
        for ((_, total), cents) in system_balances.iter_mut().zip(&figures.system_balances) {
            *total += cents;
        }
        orders_paid += figures.orders_paid;
        for ((row, kind), (consumers, pending, lag, read, oldest)) in
            streams.iter_mut().zip(JOB_STREAMS).zip(figures.streams)
        {
            row.consumers = row.consumers.max(consumers);
            row.pending += pending;
            row.lag += lag;
            let age = oldest.map(|id| read_at_ms - id.ms as i64);
            row.oldest_unfinished_age_ms = row.oldest_unfinished_age_ms.max(age);
            if kind == StreamKind::Events {
                events_read += read;
                events_pending += pending;
            }
        }
    }
    for (row, length) in streams.iter_mut().zip(&counts.stream_lengths) {
        row.length = length.unwrap_or(0);
    }
    for (row, kind) in streams.iter_mut().zip(JOB_STREAMS) {
        let dead = metrics::DEAD_LETTER_STREAMS
            .iter()
            .position(|dead| *dead == kind)
            .and_then(|at| counts.dead_letter_lengths[at]);
        row.dead_letters = dead.unwrap_or(0);
    }
    let customer_balances_cents = -system_balances.iter().map(|(_, cents)| cents).sum::<i64>();
    let buckets = read_buckets(&mut conn, store, symbols, read_at_ms).await?;
    Ok(Overview {
        read_at_ms,
        system_balances,
        customer_balances_cents,
        audit,
        buckets,
        streams,
        failed_batches: counts.failed_batches.unwrap_or(0),
        settle_retries: counts.retries_waiting[0].unwrap_or(0),
        counters: Counters {
            orders_paid,
            batches_settled: counts.stats[0].unwrap_or(0),
            events_delivered: events_read.saturating_sub(events_pending),
        },
    })
}

/// One round trip for the shard's balances and stream groups, and one more
/// for the first job not yet delivered of each stream that has any.
async fn read_shard(store: &Store, shard: Shard) -> StoreResult<ShardFigures> {
    let keys = store.keys();
    let mut pipe = redis::pipe();
    for kind in SystemAccount::ALL {
        pipe.hget(keys.system_account(kind, shard), "balance");
    }
    pipe.hget(
        keys.system_account(SystemAccount::Exchange, shard),
        "orders_paid",
    );
    for kind in JOB_STREAMS {
        let stream = keys.job_stream(kind, shard);
        pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(group_of(kind));
    }
    let mut conn = store.conn().await?;
    let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
    let mut replies = replies.into_iter();
    let mut next = || replies.next().unwrap_or(Value::Nil);
    let mut figures = ShardFigures::default();
    for _ in SystemAccount::ALL {
        figures.system_balances.push(integer(next()));
    }
    figures.orders_paid = u64::try_from(integer(next())).unwrap_or(0);
    let mut undelivered = Vec::new();
    for kind in JOB_STREAMS {
        let group = group(next(), group_of(kind));
        let oldest_pending = pending_min_id(next());
        let Some(group) = group else {
            figures.streams.push((0, 0, 0, 0, None));
            continue;
        };
        let lag = group.lag.unwrap_or(0) as u64;
        if lag > 0 {
            undelivered.push((figures.streams.len(), kind, group.last_delivered_id.clone()));
        }
        figures.streams.push((
            group.consumers as u64,
            group.pending as u64,
            lag,
            group.entries_read.unwrap_or(0) as u64,
            oldest_pending,
        ));
    }
    if !undelivered.is_empty() {
        let mut pipe = redis::pipe();
        for (_, kind, last) in &undelivered {
            pipe.cmd("XRANGE")
                .arg(keys.job_stream(*kind, shard))
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(1);
        }
        let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
        for ((at, _, _), reply) in undelivered.iter().zip(replies) {
            let first = first_entry_id(reply);
            let row = &mut figures.streams[*at];
            // The oldest of the pending and the undelivered.
            row.4 = match (row.4, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(figures)
}

async fn read_buckets(
    conn: &mut crate::store::connection::Conn,
    store: &Store,
    symbols: &[crate::domain::Symbol],
    now: i64,
) -> StoreResult<Vec<BucketRow>> {
    let keys = store.keys();
    let buckets = crate::store::orders::buckets(conn, keys, symbols).await?;
    let mut rows = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let oldest: Option<String> = redis::cmd("LINDEX")
            .arg(keys.bucket_orders(&bucket.symbol))
            .arg(0)
            .query_async(conn)
            .await?;
        let oldest_age_ms = oldest
            .and_then(|id| OrderId::parse(&id).ok())
            .and_then(|id| id.uuid().get_timestamp())
            .map(|at| {
                let (seconds, nanos) = at.to_unix();
                now - (seconds as i64 * 1000 + i64::from(nanos / 1_000_000))
            });
        rows.push(BucketRow {
            symbol: bucket.symbol.to_string(),
            value_cents: bucket.value_cents,
            orders: bucket.order_count,
            oldest_age_ms,
        });
    }
    Ok(rows)
}

/// An integer reply, 0 for none (an account never written) or an error.
fn integer(value: Value) -> i64 {
    match value {
        Value::Nil => 0,
        other => redis::from_redis_value::<i64>(other).unwrap_or(0),
    }
}

/// The named group of an `XINFO GROUPS` reply; none for a stream not made yet.
fn group(value: Value, name: &str) -> Option<StreamInfoGroup> {
    let reply = redis::from_redis_value::<StreamInfoGroupsReply>(value).ok()?;
    reply.groups.into_iter().find(|group| group.name == name)
}

/// The smallest id of an `XPENDING` summary: `[count, min, max, consumers]`.
fn pending_min_id(value: Value) -> Option<StreamId> {
    let Value::Array(fields) = value else {
        return None;
    };
    let min = fields.get(1)?;
    let text: String = redis::from_redis_value_ref(min).ok()?;
    StreamId::parse(&text)
}

/// The id of the first entry of an `XRANGE` reply.
fn first_entry_id(value: Value) -> Option<StreamId> {
    let Value::Array(entries) = value else {
        return None;
    };
    let Value::Array(entry) = entries.into_iter().next()? else {
        return None;
    };
    let text: String = redis::from_redis_value_ref(entry.first()?).ok()?;
    StreamId::parse(&text)
}
