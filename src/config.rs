//! Settings from flags and `TALLY_*` environment variables. Every limit is
//! named here with its default, so that `tally serve --help` lists them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::{Amount, Symbol};

pub const REDIS_URL_DEFAULT: &str = "redis://127.0.0.1:6379";
pub const REDIS_POOL_SIZE_MAX_DEFAULT: usize = 64;
pub const REDIS_TIMEOUT_MS_DEFAULT: u64 = 2_000;
/// Logical shards the keys are spread over (see CLUSTER.md): fixed once data exists.
pub const SHARDS_DEFAULT: u16 = 16;
/// Most logical shards a deployment may have: far more than masters anyone
/// runs, and few enough that every shard's per-shard work (a stream reader, a
/// sweeper) stays cheap.
pub const SHARDS_MAX: u16 = 1_024;
/// Most replicas a write may be made to wait for (`TALLY_REPLICA_ACKS`).
pub const REPLICA_ACKS_MAX: u8 = 5;
pub const REPLICA_ACK_TIMEOUT_MS_DEFAULT: u64 = 1_000;
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
pub const PRICES_DEFAULT: &str = "ABAN=4.00";
pub const EXCHANGE_MINIMUM_DEFAULT: &str = "10.00";
pub const BODY_SIZE_MAX_BYTES_DEFAULT: usize = 16 * 1024;
pub const PAGE_SIZE_DEFAULT: usize = 20;
pub const PAGE_SIZE_MAX_DEFAULT: usize = 100;
/// Most wallet transactions one account may have waiting to be applied.
pub const WALLET_QUEUE_MAX_DEFAULT: usize = 1_000;
pub const IDEMPOTENCY_TTL_SECS_DEFAULT: u64 = 24 * 60 * 60;
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub const WORKER_CONSUMERS_DEFAULT: usize = 1;
pub const WORKER_READ_COUNT_DEFAULT: usize = 16;
/// Most runtime worker threads `--threads` accepts.
pub const RUNTIME_THREADS_MAX: i64 = 256;
/// A read's jobs go to one script call (and one XACK), whose arguments Lua
/// unpacks onto its C stack: keep a read well under that bound.
pub const WORKER_READ_COUNT_MAX: usize = 1_000;
pub const WORKER_BLOCK_MS_DEFAULT: u64 = 1_000;
/// A consumer whose read came back short waits this long before the next,
/// so jobs gather into fewer, larger reads (see `WorkerSettings::gather_ms`).
pub const WORKER_GATHER_MS_DEFAULT: u64 = 20;
pub const WORKER_GATHER_MS_MAX: u64 = 1_000;
pub const CLAIM_IDLE_MS_DEFAULT: u64 = 30_000;
pub const ATTEMPTS_MAX_DEFAULT: u32 = 8;
pub const RETRY_BASE_MS_DEFAULT: u64 = 500;
pub const RETRY_MAX_MS_DEFAULT: u64 = 60_000;
pub const RETRY_PROMOTE_LIMIT_DEFAULT: usize = 100;
pub const EXCHANGE_URL_DEFAULT: &str = "http://127.0.0.1:8090";
pub const EXCHANGE_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const EXCHANGE_CONNECT_TIMEOUT_MS_DEFAULT: u64 = 1_000;
pub const EXCHANGE_SIM_LISTEN_DEFAULT: &str = "127.0.0.1:8090";
pub const WEBHOOK_SECRET_DEFAULT: &str = "tally-development-webhook-secret";
pub const WEBHOOK_ATTEMPTS_MAX_DEFAULT: u32 = 12;
pub const WEBHOOK_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const WEBHOOK_RETRY_BASE_MS_DEFAULT: u64 = 1_000;
pub const WEBHOOK_RETRY_MAX_MS_DEFAULT: u64 = 300_000;
pub const STREAM_RETENTION_MS_DEFAULT: u64 = 60_000;
/// How often a worker process audits the ledger for the console (one
/// process at a time does): five minutes.
pub const AUDIT_INTERVAL_MS_DEFAULT: u64 = 300_000;
pub const INSTALLMENTS_MAX_DEFAULT: u32 = crate::store::advances::INSTALLMENTS_MAX;
pub const ADVANCE_PERIOD_DEFAULT: &str = "7d";
pub const INSTALLMENT_LEASE_MS_DEFAULT: u64 = 30_000;
pub const SCHEDULER_INTERVAL_MS_DEFAULT: u64 = 500;
pub const SCHEDULER_BATCH_MAX: usize = 500;
pub const JOURNAL_RETENTION_DEFAULT: &str = "5d";
pub const RECORD_RETENTION_DEFAULT: &str = "30d";
pub const RETENTION_INTERVAL_MS_DEFAULT: u64 = 60_000;
pub const ARCHIVE_LEASE_MS_DEFAULT: u64 = 30_000;
/// Where a worker archives what leaves Redis, relative to its working directory.
pub const ARCHIVE_DIR_DEFAULT: &str = "archive";
pub const CURSOR_SECRET_DEFAULT: &str = "tally-development-cursor-secret";
pub const API_KEY_CACHE_MS_DEFAULT: u64 = 1_000;
pub const RATE_LIMIT_READS_PER_S_DEFAULT: u32 = 200;
pub const RATE_LIMIT_WRITES_PER_S_DEFAULT: u32 = 100;
pub const RATE_LIMIT_BURST_S_DEFAULT: u32 = 2;
pub const AUTH_FAILURES_PER_S_DEFAULT: u32 = 1;
pub const AUTH_FAILURE_BURST_DEFAULT: u32 = 20;
pub const DEV_DATA_DIR_DEFAULT: &str = ".tally";
pub const DEV_REDIS_PORT_DEFAULT: u16 = 6399;
/// A request's headers must all arrive within this of the server starting to
/// wait for them: honest clients send them in one packet, and a client that
/// trickles them would otherwise hold its connection as long as it likes.
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// A connection with no request in flight for this long is closed. Below the
/// header-read timeout on purpose: hyper arms that one too while a keep-alive
/// connection waits for its next request (see `http_server`), so this is the
/// bound that decides by default.
pub const KEEP_ALIVE_TIMEOUT_MS_DEFAULT: u64 = 4_000;
/// Open connections one API process keeps: far more than its runtime can
/// serve at once, and far fewer than the file descriptors it raises its limit to.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// No origin gets CORS headers unless named.
pub const CORS_ALLOWED_ORIGINS_DEFAULT: &str = "";

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "A Redis-native ledger and settlement service"
)]
pub struct Cli {
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Worker threads of this process's runtime. Default: one per core, or
    /// for `bench`, one fewer (the box also runs Redis and the workers).
    #[arg(long, env = "TALLY_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=RUNTIME_THREADS_MAX))]
    pub threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

/// How an operation whose keys lie on two shards (an order whose symbol
/// lives on another shard, a transfer between shards, a refund) is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sagas {
    /// One atomic script where every shard is on one node (a standalone
    /// Redis, which ignores slots); the saga on a cluster, which cannot run
    /// a script over two slots.
    Auto,
    /// The saga everywhere, on one node too: to test it without a cluster.
    Always,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up and moved a few times: its size does not matter,
// and boxing the large variants would only blur the match in cli.rs.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ArchiveAction {
    /// The records archived under ID: an order, batch or wallet transaction
    /// id, or a journal entry's `ms-seq.shard` (as the report gives it; a
    /// bare `ms-seq` is looked for on every shard). Reads only the files the
    /// id's day and shard name.
    Find {
        id: String,
        /// The archive directory.
        #[arg(long, env = "TALLY_ARCHIVE_DIR", default_value = ARCHIVE_DIR_DEFAULT)]
        dir: PathBuf,
        /// The dataset's logical shards, as it runs with.
        #[arg(long, env = "TALLY_SHARDS", default_value_t = SHARDS_DEFAULT,
              value_parser = clap::value_parser!(u16).range(1..=i64::from(SHARDS_MAX)))]
        shards: u16,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (Swagger UI at /docs).
    Serve(ServeArgs),
    /// Run everything in one process; starts a private redis-server unless TALLY_REDIS_URL is set.
    Dev(Box<DevArgs>),
    /// Run settlement workers (consumer group on the settle stream).
    Worker(WorkerArgs),
    /// Run a stand-in international exchange over HTTP, with fault injection.
    ExchangeSim(ExchangeSimArgs),
    /// Operator actions on failed batches: list, retry, refund.
    Batches {
        #[command(flatten)]
        redis: RedisSettings,
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Lease due installments to the collectors; re-queue expired leases. Run as many as you like.
    Scheduler {
        #[command(flatten)]
        redis: RedisSettings,
        #[command(flatten)]
        scheduler: SchedulerArgs,
    },
    /// Send N random deposits, withdrawals, card payments and orders through the API.
    Gen(crate::traffic::GenArgs),
    /// Measure throughput and latency on this machine, then audit the result.
    Bench {
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Print the OpenAPI spec (YAML), or write it to a file.
    Openapi {
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// API keys, straight against Redis: create (the key alone on the last
    /// line of standard output, shown once), list, revoke.
    Keys(KeysArgs),
    /// The archive of what left Redis: `find ID` prints the lines archived
    /// under an id (JSON, one per line); exits non-zero if there are none.
    Archive {
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// Check the ledger invariants; exits non-zero on any breach.
    Audit {
        #[command(flatten)]
        redis: RedisSettings,
    },
    /// Move an idle dataset of the single-node key layout (before shards) to
    /// the sharded layout of TALLY_SHARDS shards, on a standalone Redis, then
    /// audit it. Refuses, writing nothing, while work is in flight. Safe to
    /// run again after a crash part way: it finishes.
    Migrate {
        #[command(flatten)]
        redis: RedisSettings,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub ledger: LedgerSettings,
    #[command(flatten)]
    pub api: ApiSettings,
    #[command(flatten)]
    pub access: AccessSettings,
}

/// API keys and rate limits.
#[derive(Debug, Clone, Args)]
pub struct AccessSettings {
    /// Keys the HMAC-SHA256 of every API key's secret; Redis keeps only that
    /// hash. At least 32 bytes, the same on every process; required by
    /// `serve` and `keys`. `tally dev` keeps one in its data folder.
    #[arg(long, env = "TALLY_API_KEY_PEPPER", hide_env_values = true)]
    pub api_key_pepper: Option<String>,
    /// How long a process trusts its copies of key records without having
    /// confirmed that no key was revoked since (it checks five times a
    /// second). At most 1,000: a revoked key is refused everywhere within it.
    #[arg(long, env = "TALLY_API_KEY_CACHE_MS", default_value_t = API_KEY_CACHE_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(0..=crate::access::KEY_CACHE_MS_MAX))]
    pub api_key_cache_ms: u64,
    /// Reads (GET) per second one key may make, unless the key sets its own.
    #[arg(long, env = "TALLY_RATE_LIMIT_READS_PER_S", default_value_t = RATE_LIMIT_READS_PER_S_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_reads_per_s: u32,
    /// Writes (POST, DELETE) per second one key may make, unless the key sets its own.
    #[arg(long, env = "TALLY_RATE_LIMIT_WRITES_PER_S", default_value_t = RATE_LIMIT_WRITES_PER_S_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_writes_per_s: u32,
    /// Seconds' worth of requests a quiet key may send at once (the burst).
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST_S", default_value_t = RATE_LIMIT_BURST_S_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub rate_limit_burst_s: u32,
    /// Failed authentications per second one client address may make; past
    /// the burst below, it gets 429 instead of 401.
    #[arg(long, env = "TALLY_AUTH_FAILURES_PER_S", default_value_t = AUTH_FAILURES_PER_S_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub auth_failures_per_s: u32,
    /// Failed authentications one client address may make at once.
    #[arg(long, env = "TALLY_AUTH_FAILURE_BURST", default_value_t = AUTH_FAILURE_BURST_DEFAULT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub auth_failure_burst: u32,
    /// Off only inside `tally bench`, to measure what authentication costs:
    /// no flag or variable turns it off.
    #[arg(skip = true)]
    pub authentication: bool,
}

impl Default for AccessSettings {
    fn default() -> Self {
        AccessSettings {
            api_key_pepper: None,
            api_key_cache_ms: API_KEY_CACHE_MS_DEFAULT,
            rate_limit_reads_per_s: RATE_LIMIT_READS_PER_S_DEFAULT,
            rate_limit_writes_per_s: RATE_LIMIT_WRITES_PER_S_DEFAULT,
            rate_limit_burst_s: RATE_LIMIT_BURST_S_DEFAULT,
            auth_failures_per_s: AUTH_FAILURES_PER_S_DEFAULT,
            auth_failure_burst: AUTH_FAILURE_BURST_DEFAULT,
            authentication: true,
        }
    }
}

impl AccessSettings {
    /// The pepper, or why there is none to use.
    pub fn pepper(&self) -> anyhow::Result<crate::access::Pepper> {
        pepper_from(self.api_key_pepper.as_deref())
    }
}

/// `TALLY_API_KEY_PEPPER` checked, or why it cannot be used.
pub fn pepper_from(text: Option<&str>) -> anyhow::Result<crate::access::Pepper> {
    let text = text.ok_or_else(|| {
        anyhow::anyhow!(
            "TALLY_API_KEY_PEPPER is not set: set a secret of at least {} bytes (the same on every process), e.g. `openssl rand -hex 32`",
            crate::access::PEPPER_LENGTH_MIN
        )
    })?;
    crate::access::Pepper::new(text).map_err(|err| anyhow::anyhow!("TALLY_API_KEY_PEPPER: {err}"))
}

#[derive(Debug, Subcommand)]
pub enum BenchScenario {
    /// Orders/s over HTTP against the HTTP and Redis ceilings, then settlement.
    Orders(crate::bench::BenchArgs),
    /// Batches/s settled by the workers from a queued backlog.
    Settle(crate::bench::BenchArgs),
    /// The transactions report: a deep page against the first, 10,000 entries.
    Report(crate::bench::BenchArgs),
    /// The operator's console: every page empty, then with `--entries`
    /// journal entries and `--batches` failed batches.
    Console(crate::bench::BenchArgs),
    /// What an order leaves in Redis and its AOF, without retention and
    /// with a `--retention-window`, at a steady `--order-rate`.
    Retention(crate::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// List failed batches, oldest failure first.
    List {
        #[arg(long, default_value_t = PAGE_SIZE_MAX_DEFAULT)]
        limit: usize,
    },
    /// Send a failed batch back to the exchange.
    Retry { batch_id: String },
    /// Give every customer of a failed batch their money back.
    Refund {
        batch_id: String,
        /// Why, for the record.
        #[arg(long, default_value = "refunded by operator")]
        note: String,
        /// Needed when an exchange call got no answer: you checked that the
        /// exchange did not fill the batch (otherwise retry it).
        #[arg(long)]
        exchange_confirmed_unfilled: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub redis: RedisSettings,
    /// Keys the hash of each key's secret: the API processes' own value.
    #[arg(
        long,
        env = "TALLY_API_KEY_PEPPER",
        hide_env_values = true,
        global = true
    )]
    pub api_key_pepper: Option<String>,
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeyAction {
    /// Make a key and print it (last line of standard output). Only a keyed
    /// hash of its secret is stored: this is its only copy.
    Create {
        /// customer, bank, read, metrics, ops or admin.
        #[arg(long, value_parser = |text: &str| crate::access::Role::parse(text).map_err(|err| err.to_string()))]
        role: crate::access::Role,
        /// The account a customer key is bound to.
        #[arg(long)]
        account: Option<String>,
        /// How long until the key stops working, e.g. `90d` (default: never).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// What the key is for, shown in listings.
        #[arg(long)]
        label: Option<String>,
        /// The key's own limit on reads per second (default: the server's).
        #[arg(long)]
        reads_per_s: Option<u32>,
        /// The key's own limit on writes per second (default: the server's).
        #[arg(long)]
        writes_per_s: Option<u32>,
    },
    /// List keys, oldest first (never their secrets).
    List {
        #[arg(long, default_value_t = PAGE_SIZE_MAX_DEFAULT)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Revoke a key by id: every API process refuses it within a second.
    Revoke { id: String },
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub ledger: LedgerSettings,
    #[command(flatten)]
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// Names this process's consumers (default: host name and process id).
    #[arg(long, env = "TALLY_WORKER_NAME")]
    pub worker_name: Option<String>,
    /// Settlement consumers in this process.
    #[arg(long, env = "TALLY_WORKER_CONSUMERS", default_value_t = WORKER_CONSUMERS_DEFAULT)]
    pub consumers: usize,
    /// Most jobs one consumer reads, and handles concurrently, at once.
    #[arg(long, env = "TALLY_WORKER_READ_COUNT", default_value_t = WORKER_READ_COUNT_DEFAULT)]
    pub read_count: usize,
    /// Longest one read blocks waiting for jobs.
    #[arg(long, env = "TALLY_WORKER_BLOCK_MS", default_value_t = WORKER_BLOCK_MS_DEFAULT)]
    pub block_ms: u64,
    /// After a read that came back with fewer jobs than `read_count`, wait
    /// this long before reading again: every shard has its own streams, so
    /// without it a busy process reads one or two jobs at a time on each.
    /// A job that arrives while nothing is gathering is read at once; one
    /// that arrives during the wait is read at most this late. 0 turns it off.
    #[arg(long, env = "TALLY_WORKER_GATHER_MS", default_value_t = WORKER_GATHER_MS_DEFAULT)]
    pub gather_ms: u64,
    /// A job pending this long with one consumer is taken over by another.
    #[arg(long, env = "TALLY_CLAIM_IDLE_MS", default_value_t = CLAIM_IDLE_MS_DEFAULT)]
    pub claim_idle_ms: u64,
    /// Exchange calls per batch before it is dead-lettered.
    #[arg(long, env = "TALLY_ATTEMPTS_MAX", default_value_t = ATTEMPTS_MAX_DEFAULT)]
    pub attempts_max: u32,
    /// First retry delay; each further one doubles (with jitter).
    #[arg(long, env = "TALLY_RETRY_BASE_MS", default_value_t = RETRY_BASE_MS_DEFAULT)]
    pub retry_base_ms: u64,
    /// Longest retry delay.
    #[arg(long, env = "TALLY_RETRY_MAX_MS", default_value_t = RETRY_MAX_MS_DEFAULT)]
    pub retry_max_ms: u64,
    /// The international exchange (default: exchange-sim on its default port).
    #[arg(long, env = "TALLY_EXCHANGE_URL")]
    pub exchange_url: Option<String>,
    /// Bound on one exchange call, end to end.
    #[arg(long, env = "TALLY_EXCHANGE_TIMEOUT_MS", default_value_t = EXCHANGE_TIMEOUT_MS_DEFAULT)]
    pub exchange_timeout_ms: u64,
    /// Bound on connecting to the exchange.
    #[arg(long, env = "TALLY_EXCHANGE_CONNECT_TIMEOUT_MS", default_value_t = EXCHANGE_CONNECT_TIMEOUT_MS_DEFAULT)]
    pub exchange_connect_timeout_ms: u64,
    /// Where accounting events are POSTed; unset, they are logged instead.
    #[arg(long, env = "TALLY_ACCOUNTING_WEBHOOK_URL")]
    pub accounting_webhook_url: Option<String>,
    /// Signs each webhook body (X-Tally-Signature: sha256=HMAC).
    #[arg(long, env = "TALLY_WEBHOOK_SECRET", default_value = WEBHOOK_SECRET_DEFAULT, hide_default_value = true)]
    pub webhook_secret: String,
    /// Deliveries per event before it is dead-lettered.
    #[arg(long, env = "TALLY_WEBHOOK_ATTEMPTS_MAX", default_value_t = WEBHOOK_ATTEMPTS_MAX_DEFAULT)]
    pub webhook_attempts_max: u32,
    /// Bound on one webhook call.
    #[arg(long, env = "TALLY_WEBHOOK_TIMEOUT_MS", default_value_t = WEBHOOK_TIMEOUT_MS_DEFAULT)]
    pub webhook_timeout_ms: u64,
    /// Backoff between webhook deliveries of one event: doubles from this...
    #[arg(long, env = "TALLY_WEBHOOK_RETRY_BASE_MS", default_value_t = WEBHOOK_RETRY_BASE_MS_DEFAULT)]
    pub webhook_retry_base_ms: u64,
    /// ...up to this, with jitter. An accounting system can be down longer
    /// than an exchange call is worth waiting for, so it has its own bounds.
    #[arg(long, env = "TALLY_WEBHOOK_RETRY_MAX_MS", default_value_t = WEBHOOK_RETRY_MAX_MS_DEFAULT)]
    pub webhook_retry_max_ms: u64,
    /// How long a job or event stays in its stream once every consumer
    /// group has acknowledged it (for people looking with redis-cli); an
    /// entry not yet acknowledged is never trimmed.
    #[arg(long, env = "TALLY_STREAM_RETENTION_MS", default_value_t = STREAM_RETENTION_MS_DEFAULT)]
    pub stream_retention_ms: u64,
    /// Most installments an advance grows to (12, plus one for each failed
    /// last one); past it a failed last installment is due again a period
    /// later instead. At most 1000.
    #[arg(long, env = "TALLY_INSTALLMENTS_MAX", default_value_t = INSTALLMENTS_MAX_DEFAULT)]
    pub installments_max: u32,
    /// How often the ledger is audited and the result kept for the console
    /// (one worker process at a time audits). At least 1000 ms.
    #[arg(long, env = "TALLY_AUDIT_INTERVAL_MS", default_value_t = AUDIT_INTERVAL_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub audit_interval_ms: u64,
    /// Where what leaves Redis is archived (gzip JSON Lines, one file per
    /// shard per UTC day; README "The archive"). One directory per dataset:
    /// worker processes on several machines share it, or only one of them
    /// runs with a dataset's records past their window.
    #[arg(long, env = "TALLY_ARCHIVE_DIR", default_value = ARCHIVE_DIR_DEFAULT)]
    pub archive_dir: PathBuf,
    /// How often retention runs a round (archive, then remove, what is past
    /// its window). At least 100 ms.
    #[arg(long, env = "TALLY_RETENTION_INTERVAL_MS", default_value_t = RETENTION_INTERVAL_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(100..))]
    pub retention_interval_ms: u64,
    /// How long a retention step may hold its shard (a lock the step's
    /// script checks): after a worker dies holding it, the shard waits this
    /// long. At least 1000 ms.
    #[arg(long, env = "TALLY_ARCHIVE_LEASE_MS", default_value_t = ARCHIVE_LEASE_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub archive_lease_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            worker_name: None,
            consumers: WORKER_CONSUMERS_DEFAULT,
            read_count: WORKER_READ_COUNT_DEFAULT,
            block_ms: WORKER_BLOCK_MS_DEFAULT,
            gather_ms: WORKER_GATHER_MS_DEFAULT,
            claim_idle_ms: CLAIM_IDLE_MS_DEFAULT,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            retry_base_ms: RETRY_BASE_MS_DEFAULT,
            retry_max_ms: RETRY_MAX_MS_DEFAULT,
            exchange_url: None,
            exchange_timeout_ms: EXCHANGE_TIMEOUT_MS_DEFAULT,
            exchange_connect_timeout_ms: EXCHANGE_CONNECT_TIMEOUT_MS_DEFAULT,
            accounting_webhook_url: None,
            webhook_secret: WEBHOOK_SECRET_DEFAULT.to_owned(),
            webhook_attempts_max: WEBHOOK_ATTEMPTS_MAX_DEFAULT,
            webhook_timeout_ms: WEBHOOK_TIMEOUT_MS_DEFAULT,
            webhook_retry_base_ms: WEBHOOK_RETRY_BASE_MS_DEFAULT,
            webhook_retry_max_ms: WEBHOOK_RETRY_MAX_MS_DEFAULT,
            stream_retention_ms: STREAM_RETENTION_MS_DEFAULT,
            installments_max: INSTALLMENTS_MAX_DEFAULT,
            audit_interval_ms: AUDIT_INTERVAL_MS_DEFAULT,
            archive_dir: PathBuf::from(ARCHIVE_DIR_DEFAULT),
            retention_interval_ms: RETENTION_INTERVAL_MS_DEFAULT,
            archive_lease_ms: ARCHIVE_LEASE_MS_DEFAULT,
        }
    }
}

impl WorkerSettings {
    /// Refuses settings under which workers would step on each other, or
    /// block on Redis longer than Redis is allowed to take to answer.
    pub fn validate_with(&self, redis: &RedisSettings) -> Result<(), String> {
        if self.block_ms >= redis.redis_timeout_ms {
            return Err(format!(
                "block_ms ({}) must be below redis_timeout_ms ({}), or every blocking read times out",
                self.block_ms, redis.redis_timeout_ms
            ));
        }
        self.validate()
    }

    /// Refuses settings under which workers would step on each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.claim_idle_ms <= self.exchange_timeout_ms {
            return Err(format!(
                "claim_idle_ms ({}) must exceed exchange_timeout_ms ({}), or jobs in flight would be taken over",
                self.claim_idle_ms, self.exchange_timeout_ms
            ));
        }
        if self.claim_idle_ms <= self.webhook_timeout_ms {
            return Err(format!(
                "claim_idle_ms ({}) must exceed webhook_timeout_ms ({}), or events in flight would be taken over and delivered twice",
                self.claim_idle_ms, self.webhook_timeout_ms
            ));
        }
        if self.consumers == 0
            || self.read_count == 0
            || self.attempts_max == 0
            || self.webhook_attempts_max == 0
        {
            return Err(
                "consumers, read_count, attempts_max and webhook_attempts_max must be at least 1"
                    .to_owned(),
            );
        }
        let installments = crate::store::advances::INSTALLMENTS;
        let installments_max = crate::store::advances::INSTALLMENTS_MAX;
        if !(installments..=installments_max).contains(&self.installments_max) {
            return Err(format!(
                "installments_max ({}) must be from {installments} to {installments_max}",
                self.installments_max
            ));
        }
        if self.gather_ms > WORKER_GATHER_MS_MAX {
            return Err(format!(
                "gather_ms ({}) must be at most {WORKER_GATHER_MS_MAX}",
                self.gather_ms
            ));
        }
        if self.read_count > WORKER_READ_COUNT_MAX {
            return Err(format!(
                "read_count ({}) must be at most {WORKER_READ_COUNT_MAX}",
                self.read_count
            ));
        }
        Ok(())
    }

    pub fn notifier(&self) -> crate::notifier::NotifierSettings {
        crate::notifier::NotifierSettings {
            webhook_url: self.accounting_webhook_url.clone(),
            secret: self.webhook_secret.clone(),
            attempts_max: self.webhook_attempts_max,
            retry_base: Duration::from_millis(self.webhook_retry_base_ms),
            retry_max: Duration::from_millis(self.webhook_retry_max_ms),
            timeout: Duration::from_millis(self.webhook_timeout_ms),
        }
    }

    pub fn exchange_url(&self) -> &str {
        self.exchange_url.as_deref().unwrap_or(EXCHANGE_URL_DEFAULT)
    }

    pub fn worker_name(&self) -> String {
        self.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|host| host.trim().to_owned())
                .unwrap_or_else(|_| "worker".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ExchangeSimArgs {
    #[arg(long, env = "TALLY_EXCHANGE_SIM_LISTEN", default_value = EXCHANGE_SIM_LISTEN_DEFAULT)]
    pub listen: SocketAddr,
    /// Added to every call.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Fraction of calls answered 503, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of calls answered 422, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub reject_rate: f64,
}

#[derive(Debug, Clone, Args)]
pub struct SchedulerArgs {
    /// How long a worker holds a due installment before another gets it.
    #[arg(long, env = "TALLY_INSTALLMENT_LEASE_MS", default_value_t = INSTALLMENT_LEASE_MS_DEFAULT)]
    pub installment_lease_ms: u64,
    /// How often the scheduler looks for due installments.
    #[arg(long, env = "TALLY_SCHEDULER_INTERVAL_MS", default_value_t = SCHEDULER_INTERVAL_MS_DEFAULT)]
    pub scheduler_interval_ms: u64,
}

impl SchedulerArgs {
    pub fn settings(&self) -> crate::advances::SchedulerSettings {
        crate::advances::SchedulerSettings {
            lease: Duration::from_millis(self.installment_lease_ms),
            interval: Duration::from_millis(self.scheduler_interval_ms),
            batch_max: SCHEDULER_BATCH_MAX,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// Where the in-process exchange-sim listens (unless TALLY_EXCHANGE_URL names a real exchange).
    #[arg(long, env = "TALLY_EXCHANGE_SIM_LISTEN", default_value = EXCHANGE_SIM_LISTEN_DEFAULT)]
    pub exchange_sim_listen: SocketAddr,
    /// Where the private redis-server keeps its append-only file.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = DEV_DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,
    /// Port of the private redis-server (inspect it with `redis-cli -p PORT`).
    #[arg(long, env = "TALLY_DEV_REDIS_PORT", default_value_t = DEV_REDIS_PORT_DEFAULT)]
    pub dev_redis_port: u16,
    /// Start a private Redis Cluster instead (3 masters, 3 replicas, on
    /// loopback ports below 30000, in memory: its data lasts as long as the
    /// process).
    #[arg(long, env = "TALLY_DEV_CLUSTER")]
    pub cluster: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RedisSettings {
    /// Redis to use: one standalone node, or seed nodes of a Redis Cluster
    /// separated by commas (detected). `tally dev` starts its own when unset.
    #[arg(long, env = "TALLY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Connections one process makes at once for its blocking readers (each
    /// reader then keeps its own, outside the pool).
    #[arg(long, env = "TALLY_REDIS_POOL_SIZE_MAX", default_value_t = REDIS_POOL_SIZE_MAX_DEFAULT)]
    pub redis_pool_size_max: usize,
    /// Bound on connecting, waiting for a pooled connection, and each reply.
    #[arg(long, env = "TALLY_REDIS_TIMEOUT_MS", default_value_t = REDIS_TIMEOUT_MS_DEFAULT)]
    pub redis_timeout_ms: u64,
    /// Logical shards the keys are spread over (1 to 1024). Fixed once data
    /// exists: a process started with another count than the data's refuses.
    #[arg(long, env = "TALLY_SHARDS", default_value_t = SHARDS_DEFAULT,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(SHARDS_MAX)))]
    pub shards: u16,
    /// Replicas that must have a write before a client is told of it (0 to
    /// 5): each API request that changed something waits for them, at most
    /// `TALLY_REPLICA_ACK_TIMEOUT_MS`, and answers 503 `replica-ack-timeout`
    /// if they did not confirm. 0 answers once the primary has it.
    #[arg(long, env = "TALLY_REPLICA_ACKS", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=i64::from(REPLICA_ACKS_MAX)))]
    pub replica_acks: u8,
    /// Longest a write waits for `TALLY_REPLICA_ACKS` replicas; below
    /// `TALLY_REDIS_TIMEOUT_MS`.
    #[arg(long, env = "TALLY_REPLICA_ACK_TIMEOUT_MS", default_value_t = REPLICA_ACK_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub replica_ack_timeout_ms: u64,
    /// `auto`: operations over two shards are one atomic script on a
    /// standalone Redis and a saga on a cluster; `always`: a saga everywhere.
    #[arg(long, env = "TALLY_SAGAS", value_enum, default_value_t = Sagas::Auto)]
    pub sagas: Sagas,
}

impl RedisSettings {
    /// Refuses a replica wait the connection's own reply timeout would cut short.
    pub fn validate(&self) -> Result<(), String> {
        if self.replica_acks > 0 && self.replica_ack_timeout_ms >= self.redis_timeout_ms {
            return Err(format!(
                "replica_ack_timeout_ms ({}) must be below redis_timeout_ms ({}), or every wait for replicas times out as a lost reply",
                self.replica_ack_timeout_ms, self.redis_timeout_ms
            ));
        }
        Ok(())
    }

    pub fn url(&self) -> &str {
        self.redis_url.as_deref().unwrap_or(REDIS_URL_DEFAULT)
    }

    /// The nodes `TALLY_REDIS_URL` names, separated by commas: one
    /// standalone Redis, or seeds of a cluster.
    pub fn seeds(&self) -> Vec<&str> {
        self.url()
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .collect()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn for_url(url: &str) -> Self {
        RedisSettings {
            redis_url: Some(url.to_owned()),
            redis_pool_size_max: REDIS_POOL_SIZE_MAX_DEFAULT,
            redis_timeout_ms: REDIS_TIMEOUT_MS_DEFAULT,
            shards: SHARDS_DEFAULT,
            replica_acks: 0,
            replica_ack_timeout_ms: REPLICA_ACK_TIMEOUT_MS_DEFAULT,
            sagas: Sagas::Auto,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct LedgerSettings {
    /// Prices in USD per unit, as SYMBOL=PRICE pairs separated by commas.
    #[arg(long, env = "TALLY_PRICES", default_value = PRICES_DEFAULT, value_parser = PriceList::parse)]
    pub prices: PriceList,
    /// Smallest purchase the exchange accepts, in USD: smaller orders wait in a bucket.
    #[arg(long, env = "TALLY_EXCHANGE_MINIMUM", default_value = EXCHANGE_MINIMUM_DEFAULT, value_parser = parse_positive_amount)]
    pub exchange_minimum: Amount,
    /// Time between two installments of an advance, e.g. `7d` or `2s`.
    #[arg(long, env = "TALLY_ADVANCE_PERIOD", default_value = ADVANCE_PERIOD_DEFAULT, value_parser = humantime::parse_duration)]
    pub advance_period: Duration,
    /// How long journal entries stay in the report (and in Redis), e.g. `5d`.
    #[arg(long, env = "TALLY_JOURNAL_RETENTION", default_value = JOURNAL_RETENTION_DEFAULT, value_parser = humantime::parse_duration)]
    pub journal_retention: Duration,
    /// How long a finished record (a batch settled or refunded, with its
    /// orders; a wallet transaction applied; an advance repaid; a dead
    /// letter resolved; an operator log entry) stays in Redis after it
    /// finished, before it leaves for the archive, e.g. `30d`. A `GET` of
    /// one that left answers 410.
    #[arg(long, env = "TALLY_RECORD_RETENTION", default_value = RECORD_RETENTION_DEFAULT, value_parser = humantime::parse_duration)]
    pub record_retention: Duration,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        LedgerSettings {
            prices: PriceList::parse(PRICES_DEFAULT).expect("default prices parse"),
            exchange_minimum: Amount::parse(EXCHANGE_MINIMUM_DEFAULT).expect("default minimum"),
            journal_retention: humantime::parse_duration(JOURNAL_RETENTION_DEFAULT)
                .expect("default retention"),
            record_retention: humantime::parse_duration(RECORD_RETENTION_DEFAULT)
                .expect("default retention"),
            advance_period: humantime::parse_duration(ADVANCE_PERIOD_DEFAULT)
                .expect("default period"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ApiSettings {
    /// Address the HTTP API listens on.
    #[arg(long, env = "TALLY_LISTEN", default_value = LISTEN_DEFAULT)]
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "TALLY_BODY_SIZE_MAX_BYTES", default_value_t = BODY_SIZE_MAX_BYTES_DEFAULT)]
    pub body_size_max_bytes: usize,
    /// Page size when a listing does not ask for one.
    #[arg(long, env = "TALLY_PAGE_SIZE", default_value_t = PAGE_SIZE_DEFAULT)]
    pub page_size: usize,
    /// Largest page a listing may ask for.
    #[arg(long, env = "TALLY_PAGE_SIZE_MAX", default_value_t = PAGE_SIZE_MAX_DEFAULT)]
    pub page_size_max: usize,
    /// How long an Idempotency-Key is remembered.
    /// At least 1: Redis refuses `EX 0`, and a script that stops part way
    /// would leave what it wrote so far.
    #[arg(long, env = "TALLY_IDEMPOTENCY_TTL_SECS", default_value_t = IDEMPOTENCY_TTL_SECS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_ttl_secs: u64,
    /// Bound on handling one request, end to end.
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_MS", default_value_t = REQUEST_TIMEOUT_MS_DEFAULT)]
    pub request_timeout_ms: u64,
    /// Most wallet transactions one account may have waiting; past it a new one gets 429.
    #[arg(long, env = "TALLY_WALLET_QUEUE_MAX", default_value_t = WALLET_QUEUE_MAX_DEFAULT, value_parser = parse_at_least_one)]
    pub wallet_queue_max: usize,
    /// Signs report cursors so they cannot be forged. Set the same secret on every API process.
    #[arg(long, env = "TALLY_CURSOR_SECRET", default_value = CURSOR_SECRET_DEFAULT, hide_default_value = true)]
    pub cursor_secret: String,
    /// A request's headers must all arrive within this, counted from when the
    /// server starts waiting for them (also between two requests of a
    /// keep-alive connection); past it the connection is closed unanswered.
    #[arg(long, env = "TALLY_HEADER_READ_TIMEOUT_MS", default_value_t = HEADER_READ_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed. The
    /// header-read timeout also applies while a connection waits for its next
    /// request, so idle connections last at most the smaller of the two.
    #[arg(long, env = "TALLY_KEEP_ALIVE_TIMEOUT_MS", default_value_t = KEEP_ALIVE_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_alive_timeout_ms: u64,
    /// Most open connections. At the bound, the connections idle longest are
    /// closed to make room; when every one has a request in flight, a new
    /// connection is closed at once.
    #[arg(long, env = "TALLY_CONNECTIONS_MAX", default_value_t = CONNECTIONS_MAX_DEFAULT, value_parser = parse_at_least_one)]
    pub connections_max: usize,
    /// Origins that get CORS answers (preflight included), as exact origins
    /// separated by commas, e.g. `https://app.example.com`. Empty: no CORS
    /// headers at all, so browsers keep other sites' pages from reading answers.
    #[arg(long, env = "TALLY_CORS_ALLOWED_ORIGINS", default_value = CORS_ALLOWED_ORIGINS_DEFAULT, value_parser = OriginList::parse)]
    pub cors_allowed_origins: OriginList,
    #[command(flatten)]
    pub console: ConsoleSettings,
}

/// A console session lapses after this long without a request: 30 minutes.
pub const CONSOLE_SESSION_IDLE_MS_DEFAULT: u64 = 30 * 60 * 1000;
/// A console session ends after this long however active: 12 hours.
pub const CONSOLE_SESSION_MAX_MS_DEFAULT: u64 = 12 * 60 * 60 * 1000;
/// How old the overview's shared snapshot may be: 1 s.
pub const CONSOLE_SNAPSHOT_MS_DEFAULT: u64 = 1_000;
/// Rows on a console list page.
pub const CONSOLE_PAGE_SIZE_DEFAULT: usize = 50;
/// The most rows a console list page may be asked for.
pub const CONSOLE_PAGE_SIZE_MAX: usize = 500;

/// The operator's console at `/ops`.
#[derive(Debug, Clone, Args)]
pub struct ConsoleSettings {
    /// A console session lapses after this long without a request.
    #[arg(id = "console_session_idle_ms", long = "console-session-idle-ms", env = "TALLY_CONSOLE_SESSION_IDLE_MS", default_value_t = CONSOLE_SESSION_IDLE_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub session_idle_ms: u64,
    /// A console session ends after this long, however active.
    #[arg(id = "console_session_max_ms", long = "console-session-max-ms", env = "TALLY_CONSOLE_SESSION_MAX_MS", default_value_t = CONSOLE_SESSION_MAX_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub session_max_ms: u64,
    /// Mark the session cookie `Secure` (set it when browsers reach tally
    /// over HTTPS, through a proxy that terminates TLS).
    #[arg(
        id = "console_cookie_secure",
        long = "console-cookie-secure",
        env = "TALLY_CONSOLE_COOKIE_SECURE"
    )]
    pub cookie_secure: bool,
    /// How old the overview's figures may be: one read of Redis serves every
    /// browser for this long.
    #[arg(id = "console_snapshot_ms", long = "console-snapshot-ms", env = "TALLY_CONSOLE_SNAPSHOT_MS", default_value_t = CONSOLE_SNAPSHOT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub snapshot_ms: u64,
    /// Rows on a console list page (at most 500).
    #[arg(id = "console_page_size", long = "console-page-size", env = "TALLY_CONSOLE_PAGE_SIZE", default_value_t = CONSOLE_PAGE_SIZE_DEFAULT, value_parser = parse_console_page_size)]
    pub page_size: usize,
}

fn parse_console_page_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(size) if (1..=CONSOLE_PAGE_SIZE_MAX).contains(&size) => Ok(size),
        _ => Err(format!("a number from 1 to {CONSOLE_PAGE_SIZE_MAX}")),
    }
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            session_idle_ms: CONSOLE_SESSION_IDLE_MS_DEFAULT,
            session_max_ms: CONSOLE_SESSION_MAX_MS_DEFAULT,
            cookie_secure: false,
            snapshot_ms: CONSOLE_SNAPSHOT_MS_DEFAULT,
            page_size: CONSOLE_PAGE_SIZE_DEFAULT,
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            listen: LISTEN_DEFAULT
                .parse()
                .expect("default listen address parses"),
            body_size_max_bytes: BODY_SIZE_MAX_BYTES_DEFAULT,
            page_size: PAGE_SIZE_DEFAULT,
            page_size_max: PAGE_SIZE_MAX_DEFAULT,
            idempotency_ttl_secs: IDEMPOTENCY_TTL_SECS_DEFAULT,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            wallet_queue_max: WALLET_QUEUE_MAX_DEFAULT,
            cursor_secret: CURSOR_SECRET_DEFAULT.to_owned(),
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            keep_alive_timeout_ms: KEEP_ALIVE_TIMEOUT_MS_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            cors_allowed_origins: OriginList::parse(CORS_ALLOWED_ORIGINS_DEFAULT)
                .expect("the default origin list parses"),
            console: ConsoleSettings::default(),
        }
    }
}

/// Origins allowed cross-origin requests, each exactly as a browser sends it
/// in `Origin` (scheme, host and port only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginList(Vec<String>);

impl OriginList {
    /// Most origins one process allows: a list longer than this is a
    /// configuration mistake, not a set of front ends.
    pub const ORIGINS_MAX: usize = 64;

    /// Parses `https://app.example.com,http://localhost:3000`; empty is none.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut origins: Vec<String> = Vec::new();
        for origin in text
            .split(',')
            .map(str::trim)
            .filter(|origin| !origin.is_empty())
        {
            let Some((scheme, authority)) = origin.split_once("://") else {
                return Err(format!(
                    "`{origin}` is not an origin like https://host:port"
                ));
            };
            let well_formed = matches!(scheme, "http" | "https")
                && !authority.is_empty()
                && authority
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b".-:[]".contains(&byte));
            if !well_formed {
                // No wildcards and no paths: a browser's Origin never has a
                // path, and `*` would let every site read the answers.
                return Err(format!(
                    "`{origin}` is not an exact origin (scheme://host[:port], no path, no wildcard)"
                ));
            }
            if !origins.iter().any(|known| known == origin) {
                origins.push(origin.to_owned());
            }
        }
        if origins.len() > Self::ORIGINS_MAX {
            return Err(format!("at most {} origins", Self::ORIGINS_MAX));
        }
        Ok(OriginList(origins))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{text}` is not a whole number of at least 1")),
    }
}

fn parse_positive_amount(text: &str) -> Result<Amount, String> {
    Amount::parse_positive(text).map_err(|err| format!("amount {err}"))
}

/// Prices per symbol, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceList(BTreeMap<Symbol, Amount>);

impl PriceList {
    /// Most symbols one process will quote.
    pub const SYMBOLS_MAX: usize = 64;

    /// Parses `ABAN=4.00,BTC=65000`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut prices = BTreeMap::new();
        for pair in text
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
        {
            let (symbol, price) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not SYMBOL=PRICE"))?;
            let symbol = Symbol::parse(symbol.trim()).map_err(|err| err.to_string())?;
            let price = parse_positive_amount(price.trim())?;
            if prices.insert(symbol.clone(), price).is_some() {
                return Err(format!("{symbol} is priced twice"));
            }
        }
        if prices.is_empty() || prices.len() > Self::SYMBOLS_MAX {
            return Err(format!(
                "between 1 and {} prices are needed",
                Self::SYMBOLS_MAX
            ));
        }
        Ok(PriceList(prices))
    }

    pub fn price(&self, symbol: &Symbol) -> Option<Amount> {
        self.0.get(symbol).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Symbol, Amount)> {
        self.0.iter().map(|(symbol, price)| (symbol, *price))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_lists_parse_and_refuse_nonsense() {
        let prices = PriceList::parse("ABAN=4.00, BTC=65000").unwrap();
        let aban = Symbol::parse("ABAN").unwrap();
        assert_eq!(prices.price(&aban).unwrap().cents(), 400);
        for bad in [
            "",
            "ABAN",
            "ABAN=0",
            "ABAN=-1",
            "aban=4",
            "ABAN=4,ABAN=5",
            "ABAN=4.001",
        ] {
            assert!(PriceList::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn worker_settings_refuse_reads_that_outlast_the_redis_timeout() {
        let redis = RedisSettings::for_url("redis://127.0.0.1:1");
        assert!(WorkerSettings::default().validate_with(&redis).is_ok());
        let slow = WorkerSettings {
            block_ms: redis.redis_timeout_ms,
            ..WorkerSettings::default()
        };
        assert!(slow.validate_with(&redis).unwrap_err().contains("block_ms"));
        let eager = WorkerSettings {
            claim_idle_ms: 1_000,
            ..WorkerSettings::default()
        };
        assert!(eager.validate().unwrap_err().contains("claim_idle_ms"));
    }

    #[test]
    fn cli_parses_with_defaults() {
        Cli::try_parse_from(["tally", "serve"]).unwrap();
        Cli::try_parse_from(["tally", "dev", "--dev-redis-port", "7000"]).unwrap();
    }

    #[test]
    fn cors_origins_must_be_exact() {
        assert!(OriginList::parse("").unwrap().is_empty());
        let origins = OriginList::parse("https://app.example.com, http://localhost:3000").unwrap();
        let listed: Vec<&str> = origins.iter().collect();
        assert_eq!(listed, ["https://app.example.com", "http://localhost:3000"]);
        for bad in [
            "*",
            "https://*.example.com",
            "app.example.com",
            "https://app.example.com/",
            "ftp://example.com",
            "https://",
        ] {
            assert!(OriginList::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_idempotency_key_is_remembered_at_least_a_second() {
        let zero = Cli::try_parse_from(["tally", "serve", "--idempotency-ttl-secs", "0"]);
        assert!(zero.is_err());
        Cli::try_parse_from(["tally", "serve", "--idempotency-ttl-secs", "1"]).unwrap();
    }

    #[test]
    fn webhook_deliveries_back_off_on_their_own_bounds() {
        let settings = WorkerSettings {
            retry_base_ms: 10,
            retry_max_ms: 20,
            webhook_retry_base_ms: 30,
            webhook_retry_max_ms: 40,
            ..WorkerSettings::default()
        };
        let notifier = settings.notifier();
        assert_eq!(notifier.retry_base, Duration::from_millis(30));
        assert_eq!(notifier.retry_max, Duration::from_millis(40));
    }

    #[test]
    fn claim_idle_must_outlast_a_webhook_call() {
        let settings = WorkerSettings {
            claim_idle_ms: 6_000,
            exchange_timeout_ms: 1_000,
            webhook_timeout_ms: 6_000,
            ..WorkerSettings::default()
        };
        assert!(
            settings
                .validate()
                .unwrap_err()
                .contains("webhook_timeout_ms")
        );
    }
}
