//! `TALLY_REPLICA_ACKS`: a write a client is told about is on that many
//! replicas first, so a primary lost right after the answer loses nothing
//! that was answered (CLUSTER.md, "Replicas and `WAIT`").
//!
//! `WAIT n timeout` waits for what the connection it is sent on wrote, and
//! blocks that connection meanwhile. So the wait has a connection of its
//! own, which first writes a counter: the replication stream is in order,
//! and every write a waiting request made was answered before that counter
//! was written, so replicas that have the counter have those writes too.
//!
//! The waits are grouped as commits are in a database's log: requests that
//! ask while a wait is under way share the next one, so one `WAIT` per round
//! trip serves any number of concurrent requests.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

/// Requests waiting for the next round; past this, a request waits for room.
const WAITING_MAX: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaAckError {
    /// Fewer replicas than asked confirmed within the timeout.
    #[error("{acknowledged} of {wanted} replicas confirmed the write within {timeout:?}")]
    TooFew {
        acknowledged: u64,
        wanted: u8,
        timeout: Duration,
    },
    /// The wait itself failed (Redis unreachable or the reply lost).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How one round ended for every request in it.
#[derive(Debug, Clone)]
enum Round {
    Confirmed,
    TooFew(u64),
    Failed(String),
}

type Waiter = oneshot::Sender<Round>;

/// Waits for replicas on behalf of any number of concurrent requests; cheap
/// to share behind an `Arc`.
pub struct ReplicaAcks {
    wanted: u8,
    timeout: Duration,
    sender: mpsc::Sender<Waiter>,
}

impl ReplicaAcks {
    /// `None` when no replica is asked for. Starts its task, so it must be
    /// called inside the runtime.
    pub fn start(store: &Store, wanted: u8, timeout: Duration) -> Option<Self> {
        if wanted == 0 {
            return None;
        }
        let (sender, receiver) = mpsc::channel(WAITING_MAX);
        tokio::spawn(run_rounds(store.clone(), wanted, timeout, receiver));
        Some(ReplicaAcks {
            wanted,
            timeout,
            sender,
        })
    }

    /// Returns once `wanted` replicas have every write this process was
    /// answered before the call, or fails after the timeout.
    pub async fn wait(&self) -> Result<(), ReplicaAckError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::UnexpectedReply(vec!["replica waiter stopped".to_owned()]);
        self.sender.send(reply).await.map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Round::Confirmed => Ok(()),
            Round::TooFew(acknowledged) => Err(ReplicaAckError::TooFew {
                acknowledged,
                wanted: self.wanted,
                timeout: self.timeout,
            }),
            Round::Failed(message) => Err(StoreError::GroupFailed {
                message,
                outcome_unknown: false,
            }
            .into()),
        }
    }
}

/// One round at a time: takes every request waiting, writes the counter and
/// waits on the round's own connection, answers them all. A request's
/// writes were answered before it asked, so the round that takes it covers them.
async fn run_rounds(
    store: Store,
    wanted: u8,
    timeout: Duration,
    mut waiting: mpsc::Receiver<Waiter>,
) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    while let Some(first) = waiting.recv().await {
        let mut round = vec![first];
        while let Ok(more) = waiting.try_recv() {
            round.push(more);
        }
        let outcome = match &mut conn {
            Some(conn) => wait_round(conn, &store, wanted, timeout_ms).await,
            None => match store.dedicated_conn(&store.keys().replica_ack()).await {
                Ok(mut made) => {
                    let outcome = wait_round(&mut made, &store, wanted, timeout_ms).await;
                    conn = Some(made);
                    outcome
                }
                Err(err) => Round::Failed(err.to_string()),
            },
        };
        if let Round::Failed(err) = &outcome {
            // A broken connection is made again for the next round.
            conn = None;
            tracing::warn!(error = %err, "waiting for replicas failed");
        }
        for waiter in round {
            let _ = waiter.send(outcome.clone());
        }
    }
}

async fn wait_round(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &Store,
    wanted: u8,
    timeout_ms: u64,
) -> Round {
    let acknowledged: redis::RedisResult<(u64,)> = redis::pipe()
        .cmd("INCR")
        .arg(store.keys().replica_ack())
        .ignore()
        .cmd("WAIT")
        .arg(wanted)
        .arg(timeout_ms)
        .query_async(conn)
        .await;
    match acknowledged {
        Ok((acknowledged,)) if acknowledged >= u64::from(wanted) => Round::Confirmed,
        Ok((acknowledged,)) => Round::TooFew(acknowledged),
        Err(err) => Round::Failed(err.to_string()),
    }
}
