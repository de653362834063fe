//! `/metrics`: Prometheus text exposition, format 0.0.4, written by hand (the
//! format is a few lines, not worth a crate).
//!
//! Two sources:
//!
//! - **Redis, read at scrape time** in one pipeline of read commands: each job
//!   stream's length, each consumer group's consumers, pending entries and lag,
//!   the dead-letter streams, the failed batches, the retries waiting, the
//!   installments, and the counters in `tally:stats`. Every process shares
//!   these, so any API process answers the same.
//! - **This API process**: requests by status class and a latency histogram,
//!   kept in atomics by [`RecordRequests`]. They count this process only;
//!   Prometheus sums them over the processes it scrapes.
//!
//! When Redis does not answer within [`scrape_timeout`], the answer is still
//! 200, with `tally_redis_up 0`, the process metrics and no Redis metrics, so
//! an outage shows in the scrape rather than as a failed scrape.
//!
//! Labels stay few on purpose: streams, queues and states come from the fixed
//! tables below, groups are the ones the workers create, and requests are
//! labelled by status class only, never by path (one series per customer id
//! would be unbounded).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poem::web::Data;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, handler};
use redis::Value;
use redis::streams::{StreamInfoGroup, StreamInfoGroupsReply};

use super::AppState;
use crate::config::ApiSettings;
use crate::store::keys::{Keys, StreamKind};
use crate::store::slots::Shard;
use crate::store::{Store, StoreError, StoreResult};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bound on reading Redis for one scrape. The scrape also stays within
/// half the request timeout, so it answers `tally_redis_up 0` before the
/// request itself would time out.
pub const REDIS_SCRAPE_TIMEOUT_MAX: Duration = Duration::from_millis(2_000);

/// The job streams, by label: the consumers' work queues (one per shard,
/// summed).
pub(crate) const JOB_STREAMS: [StreamKind; 4] = StreamKind::ALL;

/// Streams of jobs that failed for good, by the job stream they came from.
pub(crate) const DEAD_LETTER_STREAMS: [StreamKind; 4] = [
    StreamKind::Settle,
    StreamKind::Events,
    StreamKind::Wallet,
    StreamKind::Installments,
];

/// A per-shard key, by its name in [`Keys`].
type ShardKey = fn(&Keys, Shard) -> String;

/// Sorted sets of jobs waiting for their next attempt, by queue.
pub(crate) const RETRY_QUEUES: [(&str, ShardKey); 2] = [
    ("settle", Keys::settle_retries),
    ("events", Keys::events_retries),
];

/// Sorted sets of installments, by state.
const INSTALLMENT_STATES: [(&str, ShardKey); 2] = [
    ("scheduled", Keys::installments_due),
    ("leased", Keys::installments_leased),
];

/// Fields of the `tally:stats` hash, each exposed as its own counter:
/// (field, metric name, help).
pub(crate) const STATS_COUNTERS: [(&str, &str, &str); 1] = [(
    "batches_settled",
    "tally_batches_settled_total",
    "Batches settled with the exchange, as finish_batches.lua counts them.",
)];

/// Upper bounds of the latency histogram's buckets, in microseconds
/// (0.5 ms to 10 s); slower requests fall in `+Inf`.
const DURATION_BUCKETS_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Status classes, the only label on the request counter.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Request counts and latencies of this process, in atomics: recording a
/// request takes no lock and no allocation.
#[derive(Default)]
pub struct HttpMetrics {
    requests_by_class: [AtomicU64; STATUS_CLASSES.len()],
    /// Requests per latency bucket, not cumulative; the last is `+Inf`. The
    /// histogram's count is their sum, so it always matches the buckets.
    duration_buckets: [AtomicU64; DURATION_BUCKETS_MICROS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl HttpMetrics {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn record(&self, status: poem::http::StatusCode, elapsed: Duration) {
        // `StatusCode` admits 100..=999; anything past 5xx counts as 5xx.
        let class = usize::from(status.as_u16() / 100).clamp(1, STATUS_CLASSES.len()) - 1;
        self.requests_by_class[class].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(DURATION_BUCKETS_MICROS.len());
        self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let name = "tally_http_requests_total";
        header(
            out,
            name,
            "counter",
            "HTTP requests answered by this process, by status class.",
        );
        for (class, count) in STATUS_CLASSES.iter().zip(&self.requests_by_class) {
            let count = count.load(Ordering::Relaxed);
            sample(out, name, &[("status_class", class)], count);
        }
        let name = "tally_http_request_duration_seconds";
        header(
            out,
            name,
            "histogram",
            "Time to answer an HTTP request in this process.",
        );
        let mut cumulative = 0u64;
        for (bound, count) in DURATION_BUCKETS_MICROS.iter().zip(&self.duration_buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let le = seconds(*bound);
            sample(out, &format!("{name}_bucket"), &[("le", &le)], cumulative);
        }
        cumulative += self.duration_buckets[DURATION_BUCKETS_MICROS.len()].load(Ordering::Relaxed);
        sample(
            out,
            &format!("{name}_bucket"),
            &[("le", "+Inf")],
            cumulative,
        );
        let sum = seconds(self.duration_sum_micros.load(Ordering::Relaxed));
        sample(out, &format!("{name}_sum"), &[], sum);
        sample(out, &format!("{name}_count"), &[], cumulative);
    }
}

/// Middleware that records every request's status class and latency.
pub struct RecordRequests(pub Arc<HttpMetrics>);

impl<E: Endpoint> Middleware<E> for RecordRequests {
    type Output = RecordRequestsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        RecordRequestsEndpoint {
            inner,
            metrics: self.0.clone(),
        }
    }
}

pub struct RecordRequestsEndpoint<E> {
    inner: E,
    metrics: Arc<HttpMetrics>,
}

impl<E: Endpoint> Endpoint for RecordRequestsEndpoint<E> {
    type Output = Response;

    async fn call(&self, request: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let result = self
            .inner
            .call(request)
            .await
            .map(IntoResponse::into_response);
        let status = match &result {
            Ok(response) => response.status(),
            Err(err) => err.status(),
        };
        self.metrics.record(status, started.elapsed());
        result
    }
}

/// Every metric, Redis's read now and this process's.
#[handler]
pub async fn metrics(
    state: Data<&Arc<AppState>>,
    http: Data<&Arc<HttpMetrics>>,
    caller: Data<&crate::access::Caller>,
) -> Response {
    use crate::access::Role;
    if !(caller.role.reads_everything() || caller.role == Role::Metrics) {
        let detail = format!(
            "/metrics needs a key with one of the roles metrics, read, ops, bank, admin; this key's role is {}",
            caller.role
        );
        return poem::IntoResponse::into_response(super::problem::ApiError::forbidden(
            "forbidden",
            detail,
        ));
    }
    let started = Instant::now();
    let timeout = scrape_timeout(&state.api);
    let snapshot = match tokio::time::timeout(timeout, read_redis(&state.store)).await {
        Ok(Ok(snapshot)) => Some(snapshot),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "metrics: redis did not answer");
            None
        }
        Err(_) => {
            tracing::warn!(timeout_ms = timeout.as_millis(), "metrics: redis timed out");
            None
        }
    };
    let scrape_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut out = String::with_capacity(8 * 1024);
    render_redis(&mut out, snapshot.as_ref(), scrape_micros);
    http.render(&mut out);
    out.with_content_type(CONTENT_TYPE).into_response()
}

/// How long one scrape may wait on Redis.
pub fn scrape_timeout(api: &ApiSettings) -> Duration {
    REDIS_SCRAPE_TIMEOUT_MAX.min(Duration::from_millis(api.request_timeout_ms) / 2)
}

/// What one scrape read from Redis. A reading Redis refused (a key of the
/// wrong type) is `None` and left out of the answer.
/// The console's overview reads it too ([`crate::console`]).
pub(crate) struct RedisSnapshot {
    /// By [`JOB_STREAMS`].
    pub(crate) stream_lengths: Vec<Option<u64>>,
    pub(crate) stream_groups: Vec<Option<Vec<StreamInfoGroup>>>,
    /// By [`DEAD_LETTER_STREAMS`].
    pub(crate) dead_letter_lengths: Vec<Option<u64>>,
    pub(crate) wallet_rejected_length: Option<u64>,
    pub(crate) failed_batches: Option<u64>,
    /// By [`RETRY_QUEUES`].
    pub(crate) retries_waiting: Vec<Option<u64>>,
    pub(crate) installments: Vec<Option<u64>>,
    /// By [`STATS_COUNTERS`].
    pub(crate) stats: Vec<Option<u64>>,
}

/// Reads everything, one round trip of read-only commands per shard (each
/// shard's keys share a slot), and sums the shards. A group's consumers are
/// the most any shard's stream knows: every worker reads every shard.
pub(crate) async fn read_redis(store: &Store) -> StoreResult<RedisSnapshot> {
    let mut total: Option<RedisSnapshot> = None;
    for shard in store.keys().shards() {
        let snapshot = read_shard(store, shard).await?;
        total = Some(match total {
            None => snapshot,
            Some(total) => total.add(snapshot),
        });
    }
    total.ok_or_else(|| StoreError::UnexpectedReply(vec!["no shards".to_owned()]))
}

impl RedisSnapshot {
    fn add(self, other: RedisSnapshot) -> RedisSnapshot {
        fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            Some(a? + b?)
        }
        fn sums(a: Vec<Option<u64>>, b: Vec<Option<u64>>) -> Vec<Option<u64>> {
            a.into_iter().zip(b).map(|(a, b)| sum(a, b)).collect()
        }
        let stream_groups = self
            .stream_groups
            .into_iter()
            .zip(other.stream_groups)
            .map(|(a, b)| {
                let (mut a, b) = (a?, b?);
                for group in b {
                    match a.iter_mut().find(|known| known.name == group.name) {
                        Some(known) => {
                            known.consumers = known.consumers.max(group.consumers);
                            known.pending += group.pending;
                            known.lag = known.lag.zip(group.lag).map(|(x, y)| x + y);
                        }
                        None => a.push(group),
                    }
                }
                Some(a)
            })
            .collect();
        RedisSnapshot {
            stream_lengths: sums(self.stream_lengths, other.stream_lengths),
            stream_groups,
            dead_letter_lengths: sums(self.dead_letter_lengths, other.dead_letter_lengths),
            wallet_rejected_length: sum(self.wallet_rejected_length, other.wallet_rejected_length),
            failed_batches: sum(self.failed_batches, other.failed_batches),
            retries_waiting: sums(self.retries_waiting, other.retries_waiting),
            installments: sums(self.installments, other.installments),
            stats: sums(self.stats, other.stats),
        }
    }
}

async fn read_shard(store: &Store, shard: Shard) -> StoreResult<RedisSnapshot> {
    let keys = store.keys();
    let mut pipe = redis::pipe();
    for kind in JOB_STREAMS {
        pipe.cmd("XLEN").arg(keys.job_stream(kind, shard));
    }
    for kind in JOB_STREAMS {
        pipe.cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.job_stream(kind, shard));
    }
    for kind in DEAD_LETTER_STREAMS {
        pipe.cmd("XLEN").arg(keys.job_stream_dead(kind, shard));
    }
    pipe.cmd("XLEN").arg(keys.wallet_errors(shard));
    pipe.cmd("ZCARD").arg(keys.failed_batches(shard));
    for (_, key) in RETRY_QUEUES.iter().chain(&INSTALLMENT_STATES) {
        pipe.cmd("ZCARD").arg(key(keys, shard));
    }
    pipe.cmd("HMGET").arg(keys.stats(shard));
    for (field, _, _) in STATS_COUNTERS {
        pipe.arg(field);
    }
    // Errors of single commands come back as values, so that one refused
    // reading (XINFO on a stream not made yet) does not lose the others.
    let mut conn = store.conn().await?;
    let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
    if replies.len() != pipe.len() {
        let replies = replies.iter().map(|reply| format!("{reply:?}")).collect();
        return Err(StoreError::UnexpectedReply(replies));
    }
    let mut replies = replies.into_iter();
    let mut next = || replies.next().unwrap_or(Value::Nil);
    let stream_lengths = (0..JOB_STREAMS.len()).map(|_| count(next())).collect();
    let stream_groups = (0..JOB_STREAMS.len()).map(|_| groups(next())).collect();
    let dead_letter_lengths = (0..DEAD_LETTER_STREAMS.len())
        .map(|_| count(next()))
        .collect();
    let wallet_rejected_length = count(next());
    let failed_batches = count(next());
    let retries_waiting = (0..RETRY_QUEUES.len()).map(|_| count(next())).collect();
    let installments = (0..INSTALLMENT_STATES.len())
        .map(|_| count(next()))
        .collect();
    let stats = match next() {
        Value::Array(fields) => fields.into_iter().map(optional_count).collect(),
        other => {
            tracing::warn!(reply = ?other, "metrics: unexpected HMGET reply");
            vec![None; STATS_COUNTERS.len()]
        }
    };
    Ok(RedisSnapshot {
        stream_lengths,
        stream_groups,
        dead_letter_lengths,
        wallet_rejected_length,
        failed_batches,
        retries_waiting,
        installments,
        stats,
    })
}

/// An integer reply; `None` (logged) for an error or anything else.
fn count(value: Value) -> Option<u64> {
    match redis::from_redis_value::<u64>(value) {
        Ok(count) => Some(count),
        Err(err) => {
            tracing::warn!(error = %err, "metrics: a reading failed");
            None
        }
    }
}

/// A counter field: absent (never counted) reads as 0.
fn optional_count(value: Value) -> Option<u64> {
    match value {
        Value::Nil => Some(0),
        other => count(other),
    }
}

/// `XINFO GROUPS`: a stream no one has written or read yet has no groups.
fn groups(value: Value) -> Option<Vec<StreamInfoGroup>> {
    if let Value::ServerError(err) = &value
        && err
            .details()
            .is_some_and(|details| details.contains("no such key"))
    {
        return Some(Vec::new());
    }
    match redis::from_redis_value::<StreamInfoGroupsReply>(value) {
        Ok(reply) => Some(reply.groups),
        Err(err) => {
            tracing::warn!(error = %err, "metrics: XINFO GROUPS failed");
            None
        }
    }
}

fn render_redis(out: &mut String, snapshot: Option<&RedisSnapshot>, scrape_micros: u64) {
    let up = "tally_redis_up";
    header(
        out,
        up,
        "gauge",
        "1 when Redis answered this scrape's reads, else 0 (and no Redis metrics follow).",
    );
    sample(out, up, &[], u8::from(snapshot.is_some()));
    let name = "tally_redis_scrape_duration_seconds";
    header(out, name, "gauge", "Time this scrape spent reading Redis.");
    sample(out, name, &[], seconds(scrape_micros));
    let Some(snapshot) = snapshot else {
        return;
    };
    let streams = JOB_STREAMS.map(StreamKind::label);
    labelled(
        out,
        "tally_stream_length",
        "Entries in each job stream, acknowledged or not (acknowledged ones stay until trimmed).",
        "stream",
        &streams,
        &snapshot.stream_lengths,
    );
    render_groups(out, &streams, &snapshot.stream_groups);
    let dead = DEAD_LETTER_STREAMS.map(StreamKind::label);
    labelled(
        out,
        "tally_dead_letter_length",
        "Jobs that failed for good, in each dead-letter stream.",
        "stream",
        &dead,
        &snapshot.dead_letter_lengths,
    );
    unlabelled(
        out,
        "tally_wallet_rejected_length",
        "gauge",
        "Entries in the rejected wallet transactions stream (trimmed to a bound).",
        snapshot.wallet_rejected_length,
    );
    unlabelled(
        out,
        "tally_failed_batches",
        "gauge",
        "Batches dead-lettered and waiting for an operator to retry or refund them.",
        snapshot.failed_batches,
    );
    let queues = RETRY_QUEUES.map(|(label, _)| label);
    labelled(
        out,
        "tally_retries_waiting",
        "Jobs waiting for their next attempt, by queue.",
        "queue",
        &queues,
        &snapshot.retries_waiting,
    );
    let states = INSTALLMENT_STATES.map(|(label, _)| label);
    labelled(
        out,
        "tally_installments",
        "Installments scheduled (not yet due) or leased to a worker.",
        "state",
        &states,
        &snapshot.installments,
    );
    for ((_, name, help), value) in STATS_COUNTERS.iter().zip(&snapshot.stats) {
        unlabelled(out, name, "counter", help, *value);
    }
}

/// Consumers, pending entries and lag of every consumer group of every job stream.
fn render_groups(out: &mut String, streams: &[&str], groups: &[Option<Vec<StreamInfoGroup>>]) {
    type Reading = fn(&StreamInfoGroup) -> Option<u64>;
    let families: [(&str, &str, Reading); 3] = [
        (
            "tally_stream_group_consumers",
            "Consumers known to each consumer group.",
            |group| Some(group.consumers as u64),
        ),
        (
            "tally_stream_group_pending",
            "Entries delivered to each consumer group and not yet acknowledged.",
            |group| Some(group.pending as u64),
        ),
        (
            "tally_stream_group_lag",
            "Entries not yet delivered to each consumer group (left out when Redis cannot tell).",
            |group| group.lag.map(|lag| lag as u64),
        ),
    ];
    for (name, help, reading) in families {
        header(out, name, "gauge", help);
        for (stream, groups) in streams.iter().zip(groups) {
            for group in groups.iter().flatten() {
                if let Some(value) = reading(group) {
                    sample(
                        out,
                        name,
                        &[("stream", stream), ("group", &group.name)],
                        value,
                    );
                }
            }
        }
    }
}

/// A gauge family with one label, one sample per known reading.
fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
    readings: &[Option<u64>],
) {
    header(out, name, "gauge", help);
    for (value, reading) in values.iter().zip(readings) {
        if let Some(reading) = reading {
            sample(out, name, &[(label, value)], reading);
        }
    }
}

fn unlabelled(out: &mut String, name: &str, kind: &str, help: &str, reading: Option<u64>) {
    header(out, name, kind, help);
    if let Some(reading) = reading {
        sample(out, name, &[], reading);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (index, (label, text)) in labels.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"");
            escape_label(out, text);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value as the format requires: backslash, quote, newline.
fn escape_label(out: &mut String, text: &str) {
    for character in text.chars() {
        match character {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
}

/// Microseconds as exact decimal seconds, with no float on the way:
/// 2_500 -> "0.0025", 1_000_000 -> "1".
fn seconds(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(500), "0.0005");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(12_345_678), "12.345678");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("group", "a\"b\\c\nd")], 1);
        assert_eq!(out, "m{group=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn the_histogram_is_cumulative_and_counts_every_request() {
        let http = HttpMetrics::default();
        http.record(poem::http::StatusCode::OK, Duration::from_micros(400));
        http.record(poem::http::StatusCode::NOT_FOUND, Duration::from_millis(3));
        http.record(poem::http::StatusCode::OK, Duration::from_secs(11));
        let mut out = String::new();
        http.render(&mut out);
        for line in [
            "tally_http_requests_total{status_class=\"2xx\"} 2\n",
            "tally_http_requests_total{status_class=\"4xx\"} 1\n",
            "tally_http_request_duration_seconds_bucket{le=\"0.0005\"} 1\n",
            "tally_http_request_duration_seconds_bucket{le=\"0.0025\"} 1\n",
            "tally_http_request_duration_seconds_bucket{le=\"0.005\"} 2\n",
            "tally_http_request_duration_seconds_bucket{le=\"10\"} 2\n",
            "tally_http_request_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "tally_http_request_duration_seconds_sum 11.0034\n",
            "tally_http_request_duration_seconds_count 3\n",
        ] {
            assert!(out.contains(line), "{line} in\n{out}");
        }
    }
}
