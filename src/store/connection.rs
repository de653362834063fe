//! The shared multiplexed connection, made and made again when it breaks.
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
    pub async fn get(&self) -> StoreResult<Conn> {
        let (generation, attempt) = {
            let current = self.lock();
            (current.generation, current.attempt.clone())
        };
        match attempt.await {
            Ok(inner) => Ok(Conn {
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

/// The shared connection as one caller holds it. A command that finds it
/// broken has the next caller connect again.
#[derive(Clone)]
pub struct Conn {
    inner: MultiplexedConnection,
    generation: u64,
    owner: SharedConnection,
}

impl Conn {
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

impl ConnectionLike for Conn {
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
