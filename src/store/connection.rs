//! The shared connection: one multiplexed connection to a standalone Redis,
//! made and made again when it breaks, or a Redis Cluster connection (which
//! keeps one per master itself, follows `MOVED`/`ASK` and re-sends a request
//! whose connection dropped: every writing script is safe to run twice).
//!
//! redis-rs's `ConnectionManager` does this too, but it connects inside the
//! command call and reports a connect timeout as the same `TimedOut` I/O
//! error as a lost reply: a caller could not tell "never sent" (nothing
//! happened) from "sent, reply lost" (it may have been applied). Here
//! connecting is its own step, [`SharedConnection::get`], whose failure is a
//! [`StoreError::Connect`]; only a command on a connection that was up can
//! have an unknown outcome.
//!
//! One connection attempt at a time: every caller waiting for a connection
//! awaits the same attempt, bounded by the connect timeout; the first caller
//! to see it fail (or to see an established connection break) starts the
//! next one, so a Redis that is down costs one attempt per timeout, not one
//! per request.

use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value};

use super::slots::SlotRecorder;
use super::{StoreError, StoreResult};

type Attempt = Shared<BoxFuture<'static, RedisResult<MultiplexedConnection>>>;

/// The current connection attempt (pending, made, or failed), and its number.
struct Current {
    generation: u64,
    attempt: Attempt,
}

/// Hands out the one shared connection; cheap to clone.
#[derive(Clone)]
pub struct SharedConnection {
    client: redis::Client,
    config: AsyncConnectionConfig,
    current: Arc<Mutex<Current>>,
    /// Set by tests that measure how the scripts' keys fall on slots.
    recorder: Arc<std::sync::OnceLock<Arc<SlotRecorder>>>,
}

impl SharedConnection {
    /// Connects lazily: nothing happens until the first [`SharedConnection::get`].
    pub fn new(client: redis::Client, config: AsyncConnectionConfig) -> Self {
        let attempt = connect(&client, &config);
        SharedConnection {
            client,
            config,
            current: Arc::new(Mutex::new(Current {
                generation: 0,
                attempt,
            })),
            recorder: Arc::default(),
        }
    }

    /// Has every later script call, on every clone, noted in `recorder`.
    pub fn record_script_slots(&self, recorder: Arc<SlotRecorder>) {
        let _ = self.recorder.set(recorder);
    }

    /// The connection, once it is up. A failure here means no command was
    /// sent: [`StoreError::Connect`].
    pub async fn get(&self) -> StoreResult<NodeConn> {
        let (generation, attempt) = {
            let current = self.lock();
            (current.generation, current.attempt.clone())
        };
        match attempt.await {
            Ok(inner) => Ok(NodeConn {
                inner,
                generation,
                owner: self.clone(),
            }),
            Err(err) => {
                self.replace(generation);
                Err(StoreError::Connect(err))
            }
        }
    }

    /// Starts a new attempt, unless another caller already replaced attempt
    /// `generation`.
    fn replace(&self, generation: u64) {
        let mut current = self.lock();
        if current.generation == generation {
            current.generation += 1;
            current.attempt = connect(&self.client, &self.config);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Each change under the lock is one assignment: consistent after a panic.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Connects when first polled; the config's connection timeout bounds it
/// (handshake included).
fn connect(client: &redis::Client, config: &AsyncConnectionConfig) -> Attempt {
    let client = client.clone();
    let config = config.clone();
    async move {
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
    .boxed()
    .shared()
}

/// The shared connection to a standalone Redis as one caller holds it. A
/// command that finds it broken has the next caller connect again.
#[derive(Clone)]
pub struct NodeConn {
    inner: MultiplexedConnection,
    generation: u64,
    owner: SharedConnection,
}

impl NodeConn {
    fn note<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        // The same test as ConnectionManager's: a broken connection (I/O
        // error, dropped) is made again; an error reply leaves it be.
        if let Err(err) = &result
            && err.is_unrecoverable_error()
        {
            self.owner.replace(self.generation);
        }
        result
    }
}

impl ConnectionLike for NodeConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Some(recorder) = self.owner.recorder.get() {
            recorder.record(cmd);
        }
        async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.note(result)
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if let Some(recorder) = self.owner.recorder.get() {
            pipeline.cmd_iter().for_each(|cmd| recorder.record(cmd));
        }
        async move {
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.note(result)
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// The shared connection to a cluster: redis-rs's, which routes each
/// command by its key's slot.
#[derive(Clone)]
pub struct ClusterConn {
    inner: ClusterConnection,
    recorder: Arc<std::sync::OnceLock<Arc<SlotRecorder>>>,
}

impl ClusterConn {
    pub fn new(inner: ClusterConnection) -> Self {
        ClusterConn {
            inner,
            recorder: Arc::default(),
        }
    }

    pub fn record_script_slots(&self, recorder: Arc<SlotRecorder>) {
        let _ = self.recorder.set(recorder);
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Some(recorder) = self.recorder.get() {
            recorder.record(cmd);
        }
        self.inner.req_packed_command(cmd)
    }

    /// A cluster takes a pipeline on one slot only; tally's reads across
    /// shards (the audit, lists, the report) pipeline commands for several.
    /// Such a pipeline (never a `MULTI`) goes as one pipeline per slot, all
    /// at once, and its replies are put back in order.
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if let Some(recorder) = self.recorder.get() {
            pipeline.cmd_iter().for_each(|cmd| recorder.record(cmd));
        }
        let by_slot = split_by_slot(pipeline);
        if pipeline.is_transaction() || by_slot.len() < 2 {
            return self.inner.req_packed_commands(pipeline, offset, count);
        }
        async move {
            let parts = by_slot.into_iter().map(|(_, commands)| {
                let mut conn = self.inner.clone();
                async move {
                    let mut part = redis::pipe();
                    for (_, cmd) in &commands {
                        part.add_command((*cmd).clone());
                    }
                    let replies = conn.req_packed_commands(&part, 0, commands.len()).await?;
                    Ok::<_, redis::RedisError>(
                        commands
                            .into_iter()
                            .map(|(at, _)| at)
                            .zip(replies)
                            .collect::<Vec<_>>(),
                    )
                }
            });
            let mut replies: Vec<(usize, Value)> = futures::future::try_join_all(parts)
                .await?
                .into_iter()
                .flatten()
                .collect();
            replies.sort_unstable_by_key(|(at, _)| *at);
            Ok(replies.into_iter().map(|(_, reply)| reply).collect())
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A slot (if any) and the commands of a pipeline bound there, with their places.
type SlotCommands<'a> = (Option<u16>, Vec<(usize, &'a Cmd)>);

/// A pipeline's commands by the slot of the first hash-tagged argument of
/// each (every key tally spells carries its shard's tag), with each
/// command's place; commands with no such argument go with the first slot.
fn split_by_slot(pipeline: &Pipeline) -> Vec<SlotCommands<'_>> {
    let mut by_slot: Vec<SlotCommands<'_>> = Vec::new();
    for (at, cmd) in pipeline.cmd_iter().enumerate() {
        let slot = cmd.args_iter().skip(1).find_map(|arg| match arg {
            redis::Arg::Simple(bytes) if bytes.contains(&b'{') && bytes.contains(&b'}') => {
                Some(super::slots::hash_slot(bytes))
            }
            _ => None,
        });
        let slot = slot.or_else(|| by_slot.first().and_then(|(slot, _)| *slot));
        match by_slot.iter_mut().find(|(of, _)| *of == slot) {
            Some((_, commands)) => commands.push((at, cmd)),
            None => by_slot.push((slot, vec![(at, cmd)])),
        }
    }
    by_slot
}

/// The connection every command but a blocking read goes on, to a
/// standalone Redis or to a cluster.
// The node variant is the common one, taken per request: boxing it would
// allocate every time.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Conn {
    Node(NodeConn),
    Cluster(ClusterConn),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
