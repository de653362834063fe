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
//!
//! On a cluster a request may have written to any master (an order writes
//! two), so a round waits on every master at once, each on a connection of
//! its own, with a counter on a shard that master serves.

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
/// waits on the round's own connections (one per master), answers them all.
/// A request's writes were answered before it asked, so the round that takes
/// it covers them.
async fn run_rounds(
    store: Store,
    wanted: u8,
    timeout: Duration,
    mut waiting: mpsc::Receiver<Waiter>,
) {
    let mut conns: Vec<(String, redis::aio::MultiplexedConnection)> = Vec::new();
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    while let Some(first) = waiting.recv().await {
        let mut round = vec![first];
        while let Ok(more) = waiting.try_recv() {
            round.push(more);
        }
        if conns.is_empty() {
            match connect_masters(&store).await {
                Ok(made) => conns = made,
                Err(err) => {
                    tracing::warn!(error = %err, "connecting to wait for replicas failed");
                    answer(round, Round::Failed(err.to_string()));
                    continue;
                }
            }
        }
        let outcome = wait_round(&mut conns, wanted, timeout_ms).await;
        if let Round::Failed(err) = &outcome {
            // A broken connection, or masters that changed (a failover, a
            // slot moved): made again, from the cluster's map, next round.
            conns.clear();
            tracing::warn!(error = %err, "waiting for replicas failed");
        }
        answer(round, outcome);
    }
}

fn answer(round: Vec<Waiter>, outcome: Round) {
    for waiter in round {
        let _ = waiter.send(outcome.clone());
    }
}

/// A connection of the rounds' own to every master, with the counter key
/// it writes there.
async fn connect_masters(
    store: &Store,
) -> Result<Vec<(String, redis::aio::MultiplexedConnection)>, StoreError> {
    let mut conns = Vec::new();
    for key in store.one_key_per_master().await? {
        let conn = store.dedicated_conn(&key).await?;
        conns.push((key, conn));
    }
    Ok(conns)
}

/// Every master waits for its replicas at once; the round is confirmed when
/// each has `wanted` (a write may have gone to any of them).
async fn wait_round(
    conns: &mut [(String, redis::aio::MultiplexedConnection)],
    wanted: u8,
    timeout_ms: u64,
) -> Round {
    let waits = conns.iter_mut().map(|(key, conn)| async move {
        redis::pipe()
            .cmd("INCR")
            .arg(&*key)
            .ignore()
            .cmd("WAIT")
            .arg(wanted)
            .arg(timeout_ms)
            .query_async::<(u64,)>(conn)
            .await
    });
    let mut fewest = u64::MAX;
    for acknowledged in futures::future::join_all(waits).await {
        match acknowledged {
            Ok((acknowledged,)) => fewest = fewest.min(acknowledged),
            Err(err) => return Round::Failed(err.to_string()),
        }
    }
    if fewest >= u64::from(wanted) {
        Round::Confirmed
    } else {
        Round::TooFew(fewest)
    }
}
