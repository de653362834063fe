//! A private `redis-server` child process: `tally dev` runs one with AOF on,
//! and every test runs its own, with persistence off, on a port of its own.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// How long a new redis-server has to answer PING.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping redis-server has to flush its AOF and exit.
pub const REDIS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried before giving up when another process takes the one picked.
const PORT_ATTEMPTS_MAX: usize = 5;

pub const INSTALL_HINT: &str = "redis-server is not installed. On Debian or Ubuntu: \
     sudo apt-get install -y redis-server (or set TALLY_REDIS_URL to a Redis you run)";

pub struct RedisServer {
    child: Child,
    port: u16,
    /// The RDB a replica sync may write for a server with no data directory.
    scratch_rdb: Option<PathBuf>,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(file) = &self.scratch_rdb {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl RedisServer {
    /// Starts redis-server with the append-only file under `data_dir`
    /// (fsync every second), on `port`.
    pub async fn start_durable(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::spawn(port, &durable_args(&prepare_data_dir(data_dir)?)).await
    }

    /// Starts a throwaway redis-server (no persistence) on a free port.
    pub async fn start_ephemeral() -> anyhow::Result<Self> {
        let args = ["--save", "", "--appendonly", "no"].map(String::from);
        Self::spawn_on_free_port(&args).await
    }

    /// Starts redis-server as `start_durable` does (AOF, fsync every
    /// second), on a free port: the bench measures what production runs.
    pub async fn start_durable_on_free_port(data_dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_on_free_port(&durable_args(&prepare_data_dir(data_dir)?)).await
    }

    /// An in-memory replica of `primary`, once its link to it is up.
    pub async fn start_replica_of(primary: &RedisServer) -> anyhow::Result<Self> {
        let primary_port = primary.port().to_string();
        let args = [
            "--save",
            "",
            "--appendonly",
            "no",
            "--replicaof",
            "127.0.0.1",
            &primary_port,
        ]
        .map(String::from);
        let replica = Self::spawn_on_free_port(&args).await?;
        let client = redis::Client::open(replica.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let deadline = tokio::time::Instant::now() + REDIS_START_TIMEOUT;
        loop {
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await?;
            if replication.contains("master_link_status:up") {
                return Ok(replica);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the replica's link to its primary was not up within {REDIS_START_TIMEOUT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn_on_free_port(args: &[String]) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS_MAX {
            match Self::spawn(free_port()?, args).await {
                Ok(server) => return Ok(server),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    async fn spawn(port: u16, extra_args: &[String]) -> anyhow::Result<Self> {
        if which("redis-server").is_none() {
            bail!(INSTALL_HINT);
        }
        // A server with no data directory of its own still writes an RDB
        // when a replica syncs from it (or as a replica): into the temporary
        // directory, named by its port, never the working directory.
        let scratch_rdb = (!extra_args.iter().any(|arg| arg == "--dir"))
            .then(|| std::env::temp_dir().join(format!("tally-redis-{port}.rdb")));
        let scratch = match &scratch_rdb {
            Some(file) => vec![
                "--dir".to_owned(),
                std::env::temp_dir().display().to_string(),
                "--dbfilename".to_owned(),
                file.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            ],
            None => Vec::new(),
        };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(&scratch)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        let server = RedisServer {
            child,
            port,
            scratch_rdb,
        };
        server.wait_until_ready().await?;
        Ok(server)
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.url())?;
        let deadline = tokio::time::Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer within {REDIS_START_TIMEOUT:?}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills redis-server at once (SIGKILL: no flush, no goodbye), as a crash
    /// would, and waits until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Asks redis-server to exit (SIGTERM makes it flush the AOF), waiting a
    /// bounded time before killing it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if tokio::time::timeout(REDIS_STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// How long a new cluster has to agree it is whole (`cluster_state:ok` on
/// every node, every replica linked to its master).
pub const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Below the ephemeral range, with room for each node's cluster bus at port
/// + 10,000 (CLUSTER.md).
const CLUSTER_PORTS: std::ops::Range<u16> = 20_000..29_000;

/// A private Redis Cluster on loopback: its masters split the slots evenly,
/// each with its replicas; persistence off. Every node is a child process,
/// killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each,
    /// every node keeping its `nodes.conf` under `data_dir`, and waits until
    /// the cluster is whole.
    pub async fn start(
        masters: usize,
        replicas_per_master: usize,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        if which("redis-cli").is_none() {
            bail!(INSTALL_HINT);
        }
        let count = masters * (1 + replicas_per_master);
        let data_dir = prepare_data_dir(data_dir)?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS_MAX {
            let base = free_cluster_ports(count)?;
            match Self::start_on(base, masters, replicas_per_master, count, &data_dir).await {
                Ok(cluster) => return Ok(cluster),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    async fn start_on(
        base: u16,
        masters: usize,
        replicas_per_master: usize,
        count: usize,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut nodes = Vec::with_capacity(count);
        for port in (base..).take(count) {
            let dir = prepare_data_dir(&data_dir.join(port.to_string()))?;
            let dir = dir.display().to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("{dir}/nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--dir",
                &dir,
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from);
            nodes.push(RedisServer::spawn(port, &args).await?);
        }
        // `--cluster create` makes the first `masters` nodes masters, with
        // equal runs of slots, and the rest their replicas.
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running redis-cli --cluster create")?;
        if !created.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stdout)
            );
        }
        let cluster = RedisCluster { nodes, masters };
        cluster.wait_until_whole().await?;
        Ok(cluster)
    }

    async fn wait_until_whole(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + CLUSTER_START_TIMEOUT;
        for (index, node) in self.nodes.iter().enumerate() {
            let client = redis::Client::open(node.url())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await?;
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await?;
                let whole = info.contains("cluster_state:ok")
                    && (index < self.masters || replication.contains("master_link_status:up"));
                if whole {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("the cluster was not whole within {CLUSTER_START_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Every node, masters first, as `redis-cli --cluster create` was given them.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The masters as the cluster was made (a failover may change that).
    pub fn masters(&self) -> &[RedisServer] {
        &self.nodes[..self.masters]
    }

    /// Kills every node at once (SIGKILL), as the loss of the whole cluster
    /// would.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.kill().await?;
        }
        Ok(())
    }

    /// Every node's URL, comma-separated: a seed list for a cluster client.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The first of `count` consecutive ports in [`CLUSTER_PORTS`], starting at
/// a random place, that are free, each with its bus port (+10,000) free too.
fn free_cluster_ports(count: usize) -> anyhow::Result<u16> {
    let span = CLUSTER_PORTS.end - CLUSTER_PORTS.start - count as u16;
    for _ in 0..100 {
        let base = CLUSTER_PORTS.start + fastrand::u16(..span);
        let free = (base..).take(count).all(|port| {
            [port, port + 10_000]
                .iter()
                .all(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        });
        if free {
            return Ok(base);
        }
    }
    bail!("no {count} free ports below {}", CLUSTER_PORTS.end)
}

/// Creates `data_dir` if needed and returns its absolute path.
fn prepare_data_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data folder {}", data_dir.display()))?;
    Ok(std::fs::canonicalize(data_dir)?)
}

fn durable_args(data_dir: &Path) -> Vec<String> {
    let dir = data_dir.display().to_string();
    [
        "--dir",
        &dir,
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
    ]
    .map(String::from)
    .to_vec()
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The path of `program` on PATH, if any.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
