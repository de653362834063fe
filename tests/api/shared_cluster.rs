//! The cluster suite's clusters (`TALLY_TEST_REDIS=cluster`): making a
//! 3-master cluster takes about two seconds, emptying one a millisecond, so
//! the suite's tests take turns on a few, each emptied before its next test.
//! A test that panics or kills its cluster's nodes never hands it back.

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tally::redis_server::RedisCluster;
use tempfile::TempDir;

/// How long a cluster rests after its test before the next one empties it:
/// time for the finished test's runtime to drop its tasks and connections,
/// so none of them writes into the next test's data.
const REST: Duration = Duration::from_millis(300);

struct Idle {
    cluster: RedisCluster,
    dir: TempDir,
    since: Instant,
}

/// Clusters no test holds. Never dropped: [`kill_idle_at_exit`] ends them.
static IDLE: Mutex<Vec<Idle>> = Mutex::new(Vec::new());

/// A cluster one test holds; handed back, to be emptied, when it drops.
pub struct SharedCluster {
    held: Option<(RedisCluster, TempDir)>,
}

impl SharedCluster {
    /// An idle cluster, emptied (data, clients, `maxmemory`), or a new one.
    pub async fn take() -> SharedCluster {
        static AT_EXIT: Once = Once::new();
        // SAFETY: registers a plain `extern "C" fn` that takes no arguments.
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(kill_idle_at_exit);
        });
        let idle = IDLE.lock().unwrap().pop();
        if let Some(idle) = idle {
            tokio::time::sleep(REST.saturating_sub(idle.since.elapsed())).await;
            if empty(&idle.cluster).await.is_ok() {
                return SharedCluster {
                    held: Some((idle.cluster, idle.dir)),
                };
            }
            // A node its test stopped some other way: this cluster is done.
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cluster = RedisCluster::start(3, 0, dir.path())
            .await
            .expect("the cluster starts");
        SharedCluster {
            held: Some((cluster, dir)),
        }
    }

    pub fn cluster(&self) -> &RedisCluster {
        &self.held.as_ref().expect("held until dropped").0
    }

    /// Kills every node: the cluster is not handed back.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let (mut cluster, _dir) = self.held.take().expect("held until dropped");
        cluster.kill().await
    }
}

impl Drop for SharedCluster {
    fn drop(&mut self) {
        let Some((cluster, dir)) = self.held.take() else {
            return;
        };
        if std::thread::panicking() {
            return; // its state is whatever the failure left: its nodes die with it
        }
        IDLE.lock().unwrap().push(Idle {
            cluster,
            dir,
            since: Instant::now(),
        });
    }
}

/// Cuts every client off, empties every master and lifts `maxmemory`.
async fn empty(cluster: &RedisCluster) -> redis::RedisResult<()> {
    for master in cluster.masters() {
        let client = redis::Client::open(master.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: () = redis::pipe()
            .cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .ignore()
            .cmd("FLUSHALL")
            .ignore()
            .cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(0)
            .ignore()
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// Kills the idle clusters' nodes as the test binary exits (statics are
/// never dropped, and their nodes would outlive it).
extern "C" fn kill_idle_at_exit() {
    let Ok(mut idle) = IDLE.try_lock() else {
        return;
    };
    for Idle { cluster, dir, .. } in idle.drain(..) {
        for node in cluster.nodes() {
            if let Some(pid) = node.pid() {
                // SAFETY: kill(2) on a child's pid has no memory effects.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        // Not dropped: its processes are gone, and no runtime is left to reap them.
        std::mem::forget(cluster);
        drop(dir);
    }
}
