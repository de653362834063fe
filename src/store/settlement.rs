//! Settlement: the scripts that end a settle job (settled, retried later,
//! dead-lettered), move due retries back onto the stream, and the operator's
//! requeue and refund of failed batches.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::{Keys, StreamKind};
use super::slots::Shard;
use super::{Conn, StoreError, StoreResult, flag, now_ms, verdict};
use crate::domain::{AccountId, BatchId, OrderId, SystemAccount};

/// The consumer group of the settlement workers.
pub const SETTLE_GROUP: &str = "settlers";
/// The settle jobs, and where the unreadable ones go.
pub const SETTLE_JOBS: super::streams::JobStream = super::streams::JobStream {
    kind: StreamKind::Settle,
    group: SETTLE_GROUP,
};

/// A batch's home shard (its symbol's), where its job, journal entries and
/// events are written.
pub fn batch_shard(keys: &Keys, batch_id: &BatchId) -> Shard {
    keys.shard_of_id(&batch_id.uuid())
}
static BEGIN_ATTEMPTS: LazyLock<Script> = lua_script!("begin_attempts.lua");
static FINISH_BATCHES: LazyLock<Script> = lua_script!("finish_batches.lua");
static RETRY_BATCH: LazyLock<Script> = lua_script!("retry_batch.lua");
static DEAD_LETTER_BATCH: LazyLock<Script> = lua_script!("dead_letter_batch.lua");
static PROMOTE_DUE_JOBS: LazyLock<Script> = lua_script!("promote_due_jobs.lua");
static REQUEUE_FAILED_BATCH: LazyLock<Script> = lua_script!("requeue_failed_batch.lua");
static REFUND_BATCH: LazyLock<Script> = lua_script!("refund_batch.lua");

pub fn scripts() -> [&'static Script; 7] {
    [
        &BEGIN_ATTEMPTS,
        &FINISH_BATCHES,
        &RETRY_BATCH,
        &DEAD_LETTER_BATCH,
        &PROMOTE_DUE_JOBS,
        &REQUEUE_FAILED_BATCH,
        &REFUND_BATCH,
    ]
}

/// How a settle job ended, as the script saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The script did what was asked.
    Done,
    /// The batch had moved on (settled or refunded by another delivery): only acknowledged.
    Skipped(String),
    /// `finish_batches` only: settling the batch would take this account
    /// (@exchange or @bank) past the balance limit. Nothing was written, not
    /// even the acknowledgement: the job is still pending, for the worker to
    /// dead-letter.
    BalanceLimit(AccountId),
}

fn job_end(reply: Vec<String>, done: &str) -> StoreResult<JobEnd> {
    match verdict(&reply) {
        word if word == done => Ok(JobEnd::Done),
        "already" | "skipped" | "missing" => Ok(JobEnd::Skipped(
            reply
                .get(1)
                .cloned()
                .unwrap_or_else(|| "missing".to_owned()),
        )),
        _ => Err(StoreError::UnexpectedReply(reply)),
    }
}

/// The settle job being ended: its stream id and who holds it.
#[derive(Debug, Clone, Copy)]
pub struct JobRef<'a> {
    pub stream_id: &'a str,
    pub batch_id: &'a BatchId,
    pub worker: &'a str,
}

/// What `begin_attempts` decided for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Call the exchange: this is the batch's `attempts`-th call, counted in
    /// the batch itself, so a job delivered again after a crash counts too.
    Call { attempts: u32 },
    /// The batch had moved on (its status, or "missing"): only acknowledged.
    Skipped(String),
}

/// Counts the exchange calls about to be made for `jobs` (one read), each
/// only if its batch is still settling; the others are acknowledged. One
/// outcome per job, in order.
pub async fn begin_attempts(
    conn: &mut impl Conn,
    keys: &Keys,
    jobs: &[JobRef<'_>],
) -> StoreResult<Vec<Begun>> {
    let token = format!("{:016x}", fastrand::u64(..));
    begin_attempts_as(conn, keys, jobs, &token).await
}

/// [`begin_attempts`] under the attempt token `token`: the same call run
/// twice (as a cluster client re-sends one whose reply was lost) counts once.
/// The jobs come from one shard's settle stream (one read).
pub async fn begin_attempts_as(
    conn: &mut impl Conn,
    keys: &Keys,
    jobs: &[JobRef<'_>],
    token: &str,
) -> StoreResult<Vec<Begun>> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    let shard = batch_shard(keys, first.batch_id);
    let mut invocation = BEGIN_ATTEMPTS.key(keys.settle(shard));
    invocation.arg(SETTLE_GROUP).arg(token);
    for job in jobs {
        invocation.key(keys.batch(job.batch_id)).arg(job.stream_id);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    if reply.len() != 2 * jobs.len() {
        return Err(StoreError::UnexpectedReply(reply));
    }
    reply
        .chunks(2)
        .map(|pair| match (pair[0].as_str(), pair[1].parse::<u32>()) {
            ("go", Ok(attempts)) => Ok(Begun::Call { attempts }),
            ("skipped", _) => Ok(Begun::Skipped(pair[1].clone())),
            _ => Err(StoreError::UnexpectedReply(pair.to_vec())),
        })
        .collect()
}

/// A batch the exchange filled: its job, and the exchange's fill id.
pub struct Filled<'a> {
    pub job: JobRef<'a>,
    pub fill_id: &'a str,
}

/// Settles the batches the exchange filled, in one atomic step, and
/// acknowledges every job. One outcome per batch, in order: `Done` for
/// settled now, `Skipped` for one another delivery had already ended.
/// The batches come from one shard's settle stream (one read): settling
/// pays the home shard's `@exchange` sub-account out to its `@bank` one.
pub async fn finish_batches(
    conn: &mut impl Conn,
    keys: &Keys,
    worker: &str,
    filled: &[Filled<'_>],
) -> StoreResult<Vec<JobEnd>> {
    let Some(first) = filled.first() else {
        return Ok(Vec::new());
    };
    let shard = batch_shard(keys, first.job.batch_id);
    let mut invocation = FINISH_BATCHES.key(keys.settle(shard));
    invocation
        .key(keys.system_account(SystemAccount::Exchange, shard))
        .key(keys.system_account(SystemAccount::Bank, shard))
        .key(keys.journal(shard))
        .key(keys.failed_batches(shard))
        .key(keys.events(shard))
        .key(keys.journal_index(shard))
        .key(keys.stats(shard))
        .arg(SETTLE_GROUP)
        .arg(now_ms())
        .arg(worker)
        .arg(SystemAccount::Exchange.id().as_str())
        .arg(SystemAccount::Bank.id().as_str());
    for fill in filled {
        invocation
            .key(keys.batch(fill.job.batch_id))
            .arg(fill.job.stream_id)
            .arg(fill.job.batch_id.to_string())
            .arg(fill.fill_id);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    if reply.len() != 2 * filled.len() {
        return Err(StoreError::UnexpectedReply(reply));
    }
    reply
        .chunks(2)
        .map(|pair| match pair[0].as_str() {
            "balance_limit" => super::balance_limit_account(pair.get(1))
                .map(JobEnd::BalanceLimit)
                .ok_or_else(|| StoreError::UnexpectedReply(pair.to_vec())),
            _ => job_end(pair.to_vec(), "settled"),
        })
        .collect()
}

/// Schedules `next_job` (JSON of its stream fields) for `due_ms` and acknowledges this job.
pub async fn retry_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    job: &JobRef<'_>,
    due_ms: i64,
    next_job: &str,
    error: &str,
    may_have_filled: bool,
) -> StoreResult<JobEnd> {
    let shard = batch_shard(keys, job.batch_id);
    let reply: Vec<String> = RETRY_BATCH
        .key(keys.batch(job.batch_id))
        .key(keys.settle(shard))
        .key(keys.settle_retries(shard))
        .arg(SETTLE_GROUP)
        .arg(job.stream_id)
        .arg(due_ms)
        .arg(next_job)
        .arg(error)
        .arg(flag(may_have_filled))
        .invoke_async(conn)
        .await?;
    job_end(reply, "scheduled")
}

pub async fn dead_letter_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    job: &JobRef<'_>,
    error: &str,
    attempts: u32,
    may_have_filled: bool,
) -> StoreResult<JobEnd> {
    dead_letter_batch_at(conn, keys, job, error, attempts, may_have_filled, now_ms()).await
}

/// [`dead_letter_batch`] at the moment `now_ms`: the same call run twice
/// (as a cluster client re-sends one whose reply was lost) answers as it did
/// and writes nothing more.
pub async fn dead_letter_batch_at(
    conn: &mut impl Conn,
    keys: &Keys,
    job: &JobRef<'_>,
    error: &str,
    attempts: u32,
    may_have_filled: bool,
    now_ms: i64,
) -> StoreResult<JobEnd> {
    let shard = batch_shard(keys, job.batch_id);
    let reply: Vec<String> = DEAD_LETTER_BATCH
        .key(keys.batch(job.batch_id))
        .key(keys.settle(shard))
        .key(keys.settle_dead(shard))
        .key(keys.failed_batches(shard))
        .key(keys.events(shard))
        .arg(SETTLE_GROUP)
        .arg(job.stream_id)
        .arg(job.batch_id.to_string())
        .arg(error)
        .arg(attempts)
        .arg(now_ms)
        .arg(job.worker)
        .arg(flag(may_have_filled))
        .invoke_async(conn)
        .await?;
    job_end(reply, "failed")
}

/// Moves at most `limit` due jobs from `schedule` onto `stream`; returns how many.
pub async fn promote_due_jobs(
    conn: &mut impl Conn,
    schedule: &str,
    stream: &str,
    now_ms: i64,
    limit: usize,
) -> StoreResult<usize> {
    // Most calls find nothing due: a plain read says so for less than a script.
    let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(schedule)
        .arg("-inf")
        .arg(now_ms)
        .arg("LIMIT")
        .arg(0)
        .arg(1)
        .query_async(conn)
        .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let moved: usize = PROMOTE_DUE_JOBS
        .key(schedule)
        .key(stream)
        .arg(now_ms)
        .arg(limit)
        .invoke_async(conn)
        .await?;
    Ok(moved)
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("batch {0} is {1}, not failed")]
    NotFailed(BatchId, String),
    #[error("batch {0} changed while it was being refunded; try again")]
    StaleOrders(BatchId),
    #[error(
        "batch {0} may have been filled: an exchange call got no answer. Retry it to find out (the exchange fills each batch once), or refund it confirming the exchange did not fill it"
    )]
    MayBeFilled(BatchId),
    /// Refunding would take this account (a customer, or @exchange) past the
    /// balance limit; nothing was refunded.
    #[error(
        "refunding batch {0} would take the balance of account {1} past the largest amount held"
    )]
    BalanceLimit(BatchId, AccountId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn operator_refusal(reply: &[String], batch_id: &BatchId) -> OperatorError {
    match reply.get(1).map(String::as_str) {
        Some("not_failed") => {
            OperatorError::NotFailed(*batch_id, reply.get(2).cloned().unwrap_or_default())
        }
        Some("stale_orders") => OperatorError::StaleOrders(*batch_id),
        Some("fill_unknown") => OperatorError::MayBeFilled(*batch_id),
        Some("balance_limit") if reply.len() == 3 => {
            match super::balance_limit_account(reply.get(2)) {
                Some(account) => OperatorError::BalanceLimit(*batch_id, account),
                None => StoreError::UnexpectedReply(reply.to_vec()).into(),
            }
        }
        _ => StoreError::UnexpectedReply(reply.to_vec()).into(),
    }
}

/// Puts a failed batch back on the settle stream.
pub async fn requeue_failed_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
) -> Result<(), OperatorError> {
    requeue_failed_batch_at(conn, keys, batch_id, now_ms()).await
}

/// [`requeue_failed_batch`] at the moment `now_ms`: the same call run twice
/// queues the batch once and answers as it did.
pub async fn requeue_failed_batch_at(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    now_ms: i64,
) -> Result<(), OperatorError> {
    let shard = batch_shard(keys, batch_id);
    let reply: Vec<String> = REQUEUE_FAILED_BATCH
        .key(keys.batch(batch_id))
        .key(keys.settle(shard))
        .key(keys.failed_batches(shard))
        .arg(batch_id.to_string())
        .arg(now_ms)
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match verdict(&reply) {
        "queued" => Ok(()),
        _ => Err(operator_refusal(&reply, batch_id)),
    }
}

/// Refunds every customer of a failed batch; returns (orders, value in cents).
/// A batch an exchange call may have filled is refunded only when
/// `confirmed_unfilled`. One script over every customer's shard where one
/// node holds them; with `sagas` (a cluster), the refund saga.
pub async fn refund_batch(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    note: &str,
    confirmed_unfilled: bool,
    sagas: bool,
) -> Result<(usize, i64), OperatorError> {
    if sagas {
        // The customers' shards may not be the batch's: one step per shard.
        return super::refund_saga::refund_batch(
            conn,
            keys,
            batch_id,
            note,
            confirmed_unfilled,
            now_ms(),
        )
        .await;
    }
    refund_batch_at(conn, keys, batch_id, note, confirmed_unfilled, now_ms()).await
}

/// [`refund_batch`] at the moment `now_ms`: the same call run twice refunds
/// once and answers as it did.
pub async fn refund_batch_at(
    conn: &mut impl Conn,
    keys: &Keys,
    batch_id: &BatchId,
    note: &str,
    confirmed_unfilled: bool,
    now_ms: i64,
) -> Result<(usize, i64), OperatorError> {
    // Read the orders' customers; the script checks them again before writing.
    let order_ids: Vec<String> = conn
        .lrange(keys.batch_orders(batch_id), 0, -1)
        .await
        .map_err(StoreError::from)?;
    let mut pipe = redis::pipe();
    let mut order_keys = Vec::with_capacity(order_ids.len());
    for id in &order_ids {
        let id = OrderId::parse(id).map_err(|err| StoreError::Corrupt {
            key: keys.batch_orders(batch_id),
            problem: err.to_string(),
        })?;
        let key = keys.order(&id);
        pipe.hget(&key, "account_id");
        order_keys.push(key);
    }
    let account_ids: Vec<Option<String>> = if order_ids.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(conn).await.map_err(StoreError::from)?
    };
    // The batch's home shard pays the refunds out of its @exchange
    // sub-account and journals them. (The customers' accounts live on their
    // own shards: until the refund saga, this script spans several slots.)
    let shard = batch_shard(keys, batch_id);
    let mut invocation = REFUND_BATCH.prepare_invoke();
    invocation
        .key(keys.batch(batch_id))
        .key(keys.batch_orders(batch_id))
        .key(keys.system_account(SystemAccount::Exchange, shard))
        .key(keys.journal(shard))
        .key(keys.failed_batches(shard))
        .key(keys.events(shard))
        .key(keys.journal_index(shard))
        .arg(batch_id.to_string())
        .arg(now_ms)
        .arg(SystemAccount::Exchange.id().as_str())
        .arg(note)
        .arg(flag(confirmed_unfilled));
    for (order_key, account_id) in order_keys.iter().zip(&account_ids) {
        let corrupt = |problem: String| StoreError::Corrupt {
            key: order_key.clone(),
            problem,
        };
        let account_id = account_id
            .as_deref()
            .ok_or_else(|| corrupt("the order is missing".to_owned()))?;
        let account_id = AccountId::parse(account_id).map_err(|err| corrupt(err.to_string()))?;
        invocation
            .key(order_key)
            .key(keys.account(&account_id))
            .key(keys.account_entries(&account_id))
            .arg(account_id.as_str());
    }
    let reply: Vec<String> = invocation
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    match verdict(&reply) {
        "refunded" => {
            let count = reply.get(1).and_then(|count| count.parse().ok());
            let value = reply.get(2).and_then(|value| value.parse().ok());
            count
                .zip(value)
                .ok_or_else(|| StoreError::UnexpectedReply(reply.clone()).into())
        }
        _ => Err(operator_refusal(&reply, batch_id)),
    }
}

/// Failed batches, oldest failure first, a page at a time: each shard's
/// first `offset + limit`, merged by failure time (then id).
pub async fn failed_batches(
    conn: &mut impl Conn,
    keys: &Keys,
    offset: usize,
    limit: usize,
) -> StoreResult<Vec<BatchId>> {
    let page = super::merged_page(conn, keys, Keys::failed_batches, offset, limit).await?;
    page.into_iter()
        .map(|(id, shard)| {
            BatchId::parse(&id).map_err(|err| StoreError::Corrupt {
                key: keys.failed_batches(shard),
                problem: err.to_string(),
            })
        })
        .collect()
}

/// Failed batches, oldest failure first, after the cursor `after` (a
/// batch's failure time and id, as the last page ended): O(shards x limit)
/// however deep the page.
pub async fn failed_batches_after(
    conn: &mut impl Conn,
    keys: &Keys,
    after: Option<(i64, &BatchId)>,
    limit: usize,
) -> StoreResult<Vec<(BatchId, i64)>> {
    batches_by_score(
        conn,
        keys,
        Keys::failed_batches,
        super::Order::Oldest,
        after,
        limit,
    )
    .await
}

/// Every batch, newest first, before the cursor `before` (a batch's
/// creation time and id, as the last page ended).
pub async fn batches_before(
    conn: &mut impl Conn,
    keys: &Keys,
    before: Option<(i64, &BatchId)>,
    limit: usize,
) -> StoreResult<Vec<(BatchId, i64)>> {
    batches_by_score(
        conn,
        keys,
        Keys::batches,
        super::Order::Newest,
        before,
        limit,
    )
    .await
}

async fn batches_by_score(
    conn: &mut impl Conn,
    keys: &Keys,
    index: fn(&Keys, Shard) -> String,
    order: super::Order,
    cursor: Option<(i64, &BatchId)>,
    limit: usize,
) -> StoreResult<Vec<(BatchId, i64)>> {
    let cursor = cursor.map(|(score, id)| (score, id.to_string()));
    let page = super::scored_page(conn, keys, index, order, cursor, limit).await?;
    page.into_iter()
        .map(|(id, score)| {
            let id = BatchId::parse(&id).map_err(|err| StoreError::Corrupt {
                key: "a batch index".to_owned(),
                problem: err.to_string(),
            })?;
            Ok((id, score))
        })
        .collect()
}
