//! The failure model: real `tally worker` processes killed, stopped, or
//! refused writes by a full Redis, and redis-server itself killed and started
//! again. Jobs are taken over, each batch is bought exactly once, and nothing
//! acknowledged is lost.

use std::collections::HashSet;
use std::time::Duration;
use tally::store::keys::Keys;

use serde_json::{Value, json};
use tally::exchange::sim::Faults;
use tally::redis_server::RedisServer;

use crate::helpers::{
    EVENTUALLY_MAX, TestApp, assert_problem, eventually, free_port, read_settle_job, set_maxmemory,
    spawn_app, spawn_app_on, spawn_app_with, spawn_exchange, worker_process,
};

async fn place_batches(app: &TestApp, count: usize) -> Vec<String> {
    let customer = app.create_account("many", "100000.00").await;
    let mut batches = Vec::new();
    for _ in 0..count {
        batches.push(app.place_batch(&customer, "3").await);
    }
    batches
}

async fn all_settled(app: &TestApp, batches: &[String]) -> bool {
    for batch in batches {
        if app.batch_status(batch).await != "settled" {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_call_is_taken_over_and_each_batch_is_bought_once() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults {
        latency_ms: 1000,
        ..Faults::default()
    })
    .await;
    let batches = place_batches(&app, 5).await;

    let mut doomed = worker_process(&app, &exchange, "doomed");
    eventually("every batch's call is in flight", || async {
        exchange.orders().await.len() == batches.len()
    })
    .await;
    doomed.kill().await.unwrap(); // SIGKILL, mid-call
    doomed.wait().await.unwrap();
    assert!(
        exchange
            .orders()
            .await
            .iter()
            .all(|order| order.fill.is_none()),
        "killed before any answer"
    );

    let _survivor = worker_process(&app, &exchange, "survivor");
    eventually("every batch is settled", || all_settled(&app, &batches)).await;
    let orders = exchange.orders().await;
    assert_eq!(orders.len(), batches.len());
    for order in &orders {
        assert!(batches.contains(&order.client_order_id));
        assert!(order.fill.is_some(), "filled: {order:?}");
        assert!(order.calls >= 2, "called by both workers: {order:?}");
    }
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_jobs_in_hand_before_exiting() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults {
        latency_ms: 1000,
        ..Faults::default()
    })
    .await;
    let batches = place_batches(&app, 3).await;
    let mut worker = worker_process(&app, &exchange, "polite");
    eventually("the calls are in flight", || async {
        exchange.orders().await.len() == batches.len()
    })
    .await;

    // SAFETY: signalling our own child.
    unsafe { libc::kill(worker.id().unwrap() as libc::pid_t, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exits cleanly: {status}");
    assert!(
        all_settled(&app, &batches).await,
        "the jobs in hand were finished"
    );
    assert!(
        exchange
            .orders()
            .await
            .iter()
            .all(|order| order.calls == 1 && order.fill.is_some())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_settle_300_batches_each_exactly_once() {
    const BATCHES: usize = 300;
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults {
        latency_ms: 5,
        ..Faults::default()
    })
    .await;
    let _workers: Vec<_> = ["one", "two", "three"]
        .into_iter()
        .map(|name| worker_process(&app, &exchange, name))
        .collect();
    let batches = place_batches(&app, BATCHES).await;

    eventually("every batch is settled", || async {
        let report = tally::audit::run(&app.store).await.unwrap();
        report.open_batches_value_cents == 0
    })
    .await;
    assert!(all_settled(&app, &batches).await);
    let orders = exchange.orders().await;
    let filled: HashSet<&str> = orders
        .iter()
        .filter(|order| order.fill.is_some())
        .map(|order| order.client_order_id.as_str())
        .collect();
    assert_eq!(
        orders.len(),
        BATCHES,
        "no call for anything but our batches"
    );
    assert_eq!(filled.len(), BATCHES, "none lost");
    assert!(batches.iter().all(|batch| filled.contains(batch.as_str())));
    let calls: u64 = orders.iter().map(|order| order.calls).sum();
    assert_eq!(calls, BATCHES as u64, "none called twice");
    let events = app.all_entries(Keys::events).await;
    let settled: Vec<_> = events
        .iter()
        .filter(|event| event["type"] == "batch.settled")
        .collect();
    assert_eq!(settled.len(), BATCHES, "one settlement event per batch");
    let workers: HashSet<&str> = settled
        .iter()
        .map(|event| event["worker"].as_str())
        .collect();
    assert!(workers.len() >= 2, "the work was shared: {workers:?}");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// The exchange fills every batch, then Redis refuses to record the fills
/// (`maxmemory` reached). The jobs stay pending; once Redis takes writes
/// again they are taken over, the exchange is called again (it answers with
/// the fill it already made), and each batch is settled and journaled once.
#[tokio::test(flavor = "multi_thread")]
async fn fills_redis_refused_to_record_are_recorded_once_when_writes_are_back() {
    let app = spawn_app().await;
    // Long enough to set the limit while every call is in flight, and
    // inside the worker's exchange timeout (1,500 ms).
    let exchange = spawn_exchange(Faults {
        latency_ms: 1200,
        ..Faults::default()
    })
    .await;
    let batches = place_batches(&app, 5).await;
    let _worker = worker_process(&app, &exchange, "w");
    eventually("every batch's call is in flight", || async {
        exchange.orders().await.len() == batches.len()
    })
    .await;
    set_maxmemory(&app, 1).await;
    eventually("the exchange has filled every batch", || async {
        exchange
            .orders()
            .await
            .iter()
            .all(|order| order.fill.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for batch in &batches {
        assert_eq!(
            app.batch_status(batch).await,
            "settling",
            "not recorded yet"
        );
    }

    set_maxmemory(&app, 0).await;
    eventually("every batch is settled", || all_settled(&app, &batches)).await;
    for order in exchange.orders().await {
        assert!(
            order.calls >= 2,
            "called again after the refusal: {order:?}"
        );
    }
    let journal = app.journal().await;
    for batch in &batches {
        let settlements = journal
            .iter()
            .filter(|entry| entry["kind"] == "settlement" && &entry["ref"] == batch)
            .count();
        assert_eq!(settlements, 1, "batch {batch} settled once");
    }
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// Requests a test makes while the API reconnects to a restarted Redis.
const RECONNECT_ATTEMPTS_MAX: usize = 20;

/// How long a test re-sends a request that answers 503: bounded by time, not
/// by count, since on a loaded machine each answer may itself take the
/// API's whole Redis timeout.
const RESEND_WITHIN: Duration = Duration::from_secs(15);

/// Sends `body` with `key` until the answer is not 503, for at most
/// [`RESEND_WITHIN`]; fails naming the last 503's problem.
async fn resend_while_unavailable(
    app: &TestApp,
    path: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    let deadline = tokio::time::Instant::now() + RESEND_WITHIN;
    loop {
        let response = app.post_with_key(path, key, body).await;
        if response.status() != 503 {
            return response;
        }
        let problem: Value = response.json().await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "still 503 after {RESEND_WITHIN:?}: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// redis-server killed (SIGKILL) and started again on its append-only file:
/// every acknowledged write is there, key for key, and the API goes on
/// without a restart of its own (it reconnects and loads its scripts again).
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_a_redis_crash_and_restart() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = RedisServer::start_durable(data.path(), port).await.unwrap();
    let mut app = spawn_app_on(redis, |_| {}).await;
    let alice = app.create_account("alice", "500.00").await;
    let bob = app.create_account("bob", "0").await;
    for quantity in ["1", "3", "0.5", "2"] {
        assert_eq!(
            app.place_order(&alice, "ABAN", quantity).await.status(),
            201
        );
    }
    let transfer = json!({"src_account_id": alice, "dst_account_id": bob, "amount": "25.00", "direction": "debit"});
    assert_eq!(app.post("/api/v1/transfers", &transfer).await.status(), 201);
    let deposit = json!({"kind": "deposit", "amount": "7.00"});
    let path = format!("/api/v1/accounts/{bob}/transactions");
    assert_eq!(app.post(&path, &deposit).await.status(), 202);
    let order = json!({"account_id": alice, "symbol": "ABAN", "quantity": "1.25"});
    let placed = app
        .post_with_key("/api/v1/orders", "restart-1", &order)
        .await;
    assert_eq!(placed.status(), 201);
    let placed: Value = placed.json().await.unwrap();
    let before = app.snapshot().await;

    // Under everysec Redis may hold writes back while an fsync runs (see the
    // README); the contract this checks is for writes handed to the file.
    kill_redis_once_its_aof_is_written(&mut app).await;
    app.redis = crate::helpers::TestRedis::Node(
        RedisServer::start_durable(data.path(), port).await.unwrap(),
    );
    assert_eq!(
        app.snapshot().await,
        before,
        "every key as it was acknowledged"
    );

    // The API's connection broke with the server: a request may meet that
    // (503, retry with the same key) before the connection is made again.
    let mut replayed = app
        .post_with_key("/api/v1/orders", "restart-1", &order)
        .await;
    for _ in 0..RECONNECT_ATTEMPTS_MAX {
        if replayed.status() != 503 {
            break;
        }
        assert_problem(replayed, 503, "retry with the same Idempotency-Key").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        replayed = app
            .post_with_key("/api/v1/orders", "restart-1", &order)
            .await;
    }
    assert_eq!(replayed.status(), 201);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    let replayed: Value = replayed.json().await.unwrap();
    assert_eq!(
        replayed["id"], placed["id"],
        "the key still answers the first order"
    );
    assert_eq!(app.place_order(&bob, "ABAN", "1").await.status(), 201);
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_lost_with_its_worker_counts_toward_attempts_max() {
    use tally::store::settlement;

    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults {
        fail_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let batch_id = place_batches(&app, 1).await.remove(0);

    // A worker reads the job, counts its call, and dies during it: the job
    // stays pending with the batch's count at 1.
    let mut conn = app.redis().await;
    let stream_id = read_settle_job(&mut conn, app.keys(), "doomed").await;
    let batch = tally::domain::BatchId::parse(&batch_id).unwrap();
    let job = settlement::JobRef {
        stream_id: &stream_id,
        batch_id: &batch,
        worker: "doomed",
    };
    assert_eq!(
        settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
            .await
            .unwrap(),
        [settlement::Begun::Call { attempts: 1 }]
    );

    // The survivor takes the job over (after claim_idle_ms) still marked as
    // attempt 1, but the batch counts this as its 2nd call: with
    // attempts_max 2, one failed call dead-letters it, with no retry.
    let _workers = crate::helpers::spawn_workers(
        &app,
        tally::config::WorkerSettings {
            attempts_max: 2,
            ..crate::helpers::test_worker_settings(&exchange)
        },
    );
    eventually("the batch is dead-lettered", || async {
        app.batch_status(&batch_id).await == "failed"
    })
    .await;
    let batch = app.batch(&batch_id).await;
    assert_eq!(batch["attempts"], json!(2), "{batch}");
    let order = exchange.order(&batch_id).await.expect("called");
    assert_eq!(order.calls, 1, "one call after the take-over: {order:?}");
    tokio::time::sleep(Duration::from_millis(300)).await; // no retry comes later
    assert_eq!(exchange.order(&batch_id).await.unwrap().calls, 1);
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// How long Redis holds every command in the lost-reply test; the API gives
/// up on a reply after `LOST_REPLY_TIMEOUT_MS`.
const LOST_REPLY_PAUSE_MS: u64 = 1_500;
const LOST_REPLY_TIMEOUT_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_redis_reply_is_outcome_unknown_and_the_retry_with_the_key_charges_once() {
    let app = spawn_app_with(|settings| {
        settings.redis.redis_timeout_ms = LOST_REPLY_TIMEOUT_MS;
        // The key check and the rate limit would make Redis calls of their
        // own before the order's under the pause (the cache and the lease run
        // out on a slow machine): this test is about the order's lost reply.
        settings.access.authentication = false;
    })
    .await;
    let customer = app.create_account("alice", "100.00").await;
    let order = json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    // Redis holds the order's script past the API's reply timeout and runs it
    // when the pause ends: the request reached Redis, its reply was lost.
    // Every master, each told directly: a cluster client sends CLIENT PAUSE
    // to one node at random, maybe not one the order's saga writes to.
    for url in app.redis.master_urls() {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(LOST_REPLY_PAUSE_MS)
            .arg("ALL")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let response = app.post_with_key("/api/v1/orders", "lost-1", &order).await;
    let problem = assert_problem(response, 503, "may have been applied").await;
    assert_eq!(problem["type"], "/problems/outcome-unknown");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("retry with the same Idempotency-Key")
    );

    let retried = resend_while_unavailable(&app, "/api/v1/orders", "lost-1", &order).await;
    assert_eq!(retried.status(), 201, "{:?}", retried.text().await);
    assert_eq!(app.balance(&customer).await, "88.00", "debited once");
    let orders = app.journal_count("order").await;
    assert_eq!(orders, 1, "one order, however many answers were lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_refuses_a_write_is_unavailable_not_outcome_unknown() {
    let app = spawn_app().await;
    let customer = app.create_account("alice", "100.00").await;
    let before = app.snapshot().await;
    set_maxmemory(&app, 1).await;
    let order = json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    let response = app.post_with_key("/api/v1/orders", "full-1", &order).await;
    let problem = assert_problem(response, 503, "unavailable").await;
    assert_eq!(problem["type"], "/problems/unavailable");
    set_maxmemory(&app, 0).await;
    assert_eq!(app.snapshot().await, before, "nothing written");
}

/// Redis down: every request (reads, writes, orders) answers `unavailable`
/// once the API's connection is gone and new ones are refused, since a
/// command that never left the API did nothing; and nothing was written.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_refuses_connections_answers_unavailable_and_nothing_is_written() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let redis = RedisServer::start_durable(data.path(), port).await.unwrap();
    let mut app = spawn_app_on(redis, |_| {}).await;
    let alice = app.create_account("alice", "100.00").await;
    let before = app.snapshot().await;
    kill_redis_once_its_aof_is_written(&mut app).await;

    let order = json!({"account_id": alice, "symbol": "ABAN", "quantity": "1"});
    let deposit = json!({"kind": "deposit", "amount": "1.00"});
    let requests = [
        ("POST", "/api/v1/orders".to_owned(), Some(order)),
        (
            "POST",
            format!("/api/v1/accounts/{alice}/transactions"),
            Some(deposit),
        ),
        ("GET", format!("/api/v1/accounts/{alice}"), None),
    ];
    for (method, path, body) in &requests {
        // The first request may still meet the old connection breaking (a
        // reply that may be lost: outcome-unknown); once it is gone, every
        // new connection is refused.
        let mut problem = Value::Null;
        for _ in 0..RECONNECT_ATTEMPTS_MAX {
            let request = app.client.request(method.parse().unwrap(), app.url(path));
            let request = match body {
                Some(body) => request.json(body),
                None => request,
            };
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 503, "{method} {path}");
            problem = response.json().await.unwrap();
            if problem["type"] == "/problems/unavailable" {
                break;
            }
        }
        assert_eq!(
            problem["type"], "/problems/unavailable",
            "{method} {path}: {problem}"
        );
    }

    app.redis = crate::helpers::TestRedis::Node(
        RedisServer::start_durable(data.path(), port).await.unwrap(),
    );
    assert_eq!(app.snapshot().await, before, "nothing was written");
}

/// Kills the app's (durable) redis-server once everything it acknowledged
/// is in the AOF: under everysec Redis may hold writes back while an fsync
/// runs (see the README), and the contract is for writes handed to the file.
async fn kill_redis_once_its_aof_is_written(app: &mut crate::helpers::TestApp) {
    eventually("the AOF buffer is written", || async {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut app.redis().await)
            .await
            .unwrap();
        info.contains("aof_buffer_length:0")
    })
    .await;
    app.redis.kill().await.unwrap();
}

/// What [`RedisProxy`] does with the API's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    /// Both ways, untouched.
    Forward,
    /// Forwards the next request that runs a script (`EVALSHA`, or `EVAL`
    /// after a NOSCRIPT) to Redis, then closes the API's side instead of
    /// passing the reply back; forwards again after that.
    LoseNextScriptReply,
    /// Closes every connection, and accepts new ones without ever answering
    /// (the API's connect, handshake included, times out).
    Blackhole,
}

/// A loopback TCP proxy between the API and a real redis-server.
struct RedisProxy {
    port: u16,
    mode: std::sync::Arc<tokio::sync::watch::Sender<ProxyMode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connection tasks end when they see the mode channel close.
        self.mode.send_replace(ProxyMode::Blackhole);
    }
}

/// How long the proxy keeps Redis's side of a connection whose reply it
/// lost open, so that Redis reads the script before it sees the close.
const PROXY_LINGER: Duration = Duration::from_secs(2);

impl RedisProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(tokio::sync::watch::channel(ProxyMode::Forward).0);
        let task = tokio::spawn({
            let mode = mode.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(proxy_connection(client, redis_port, mode.clone()));
                }
            }
        });
        RedisProxy { port, mode, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    redis_port: u16,
    mode: std::sync::Arc<tokio::sync::watch::Sender<ProxyMode>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut changes = mode.subscribe();
    if *changes.borrow_and_update() == ProxyMode::Blackhole {
        // Accepted, never answered: hold it until the test ends.
        let _ = tokio::time::timeout(EVENTUALLY_MAX, changes.wait_for(|_| false)).await;
        return;
    }
    let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
        .await
        .unwrap();
    let (mut from_client, mut to_client) = client.split();
    let (mut from_redis, mut to_redis) = redis.split();
    let mut request = vec![0u8; 64 * 1024];
    let mut reply = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from_client.read(&mut request) => {
                let Ok(read @ 1..) = read else { return };
                let chunk = &request[..read];
                let runs_script = chunk.windows(4).any(|window| window.eq_ignore_ascii_case(b"EVAL"));
                to_redis.write_all(chunk).await.unwrap();
                if runs_script && *mode.borrow() == ProxyMode::LoseNextScriptReply {
                    mode.send_replace(ProxyMode::Forward);
                    drop(client);
                    tokio::time::sleep(PROXY_LINGER).await;
                    return;
                }
            }
            read = from_redis.read(&mut reply) => {
                let Ok(read @ 1..) = read else { return };
                if to_client.write_all(&reply[..read]).await.is_err() {
                    return;
                }
            }
            changed = changes.changed() => {
                if changed.is_err() || *changes.borrow_and_update() == ProxyMode::Blackhole {
                    return;
                }
            }
        }
    }
}

/// The API's bound on connecting to Redis and on each reply, in the proxy tests.
const PROXY_REDIS_TIMEOUT_MS: u64 = 300;

/// An app whose Redis connections go through `proxy`, with authentication
/// off: the key check would make Redis calls of its own.
async fn spawn_app_behind(proxy: &RedisProxy, redis: RedisServer) -> TestApp {
    let proxy_url = proxy.url();
    spawn_app_on(redis, |settings| {
        settings.redis = tally::config::RedisSettings::for_url(&proxy_url);
        settings.redis.redis_timeout_ms = PROXY_REDIS_TIMEOUT_MS;
        settings.access.authentication = false;
    })
    .await
}

/// Redis reachable but never answering a new connection: the connect times
/// out, no command was sent, so the answer is `unavailable`, not
/// `outcome-unknown`; and nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_connect_that_times_out_answers_unavailable_and_nothing_is_written() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let proxy = RedisProxy::start(redis.port()).await;
    let app = spawn_app_behind(&proxy, redis).await;
    let alice = app.create_account("alice", "100.00").await;
    let before = app.snapshot().await;
    proxy.set(ProxyMode::Blackhole);

    let order = json!({"account_id": alice, "symbol": "ABAN", "quantity": "1"});
    let (app, order) = (&app, &order);
    let send = |attempt: usize| {
        let key = format!("blackhole-{attempt}");
        async move {
            let started = std::time::Instant::now();
            let response = app.post_with_key("/api/v1/orders", &key, order).await;
            assert!(started.elapsed() < Duration::from_secs(5), "bounded");
            let problem = assert_problem(response, 503, "").await;
            problem["type"].as_str().unwrap().to_owned()
        }
    };
    // The first request may meet the old connection, which the proxy
    // closed, breaking (a command sent on it may be lost: outcome-unknown).
    let mut attempt = 0;
    while send(attempt).await != "/problems/unavailable" {
        attempt += 1;
        assert!(attempt < RECONNECT_ATTEMPTS_MAX, "never unavailable");
    }
    // From then on every request must connect, and every connect times out.
    for attempt in 100..103 {
        assert_eq!(send(attempt).await, "/problems/unavailable");
    }
    let read = app.get(&format!("/api/v1/accounts/{alice}")).await;
    let problem = assert_problem(read, 503, "unavailable").await;
    assert_eq!(problem["type"], "/problems/unavailable");
    assert_eq!(app.snapshot().await, before, "nothing was written");
}

/// The order's script reaches Redis and runs, and the connection is cut
/// before its reply comes back: `outcome-unknown`, and the retry with the
/// same Idempotency-Key answers the first order without charging again.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_after_the_script_was_sent_is_outcome_unknown_and_charges_once() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let proxy = RedisProxy::start(redis.port()).await;
    let app = spawn_app_behind(&proxy, redis).await;
    let customer = app.create_account("alice", "100.00").await;
    let order = json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    // Loads the order script into Redis's cache: otherwise the EVALSHA the
    // proxy cuts after would only have met NOSCRIPT, and nothing would run.
    let warm = json!({"account_id": customer, "symbol": "ABAN", "quantity": "1"});
    assert_eq!(app.post("/api/v1/orders", &warm).await.status(), 201);
    // Its saga's last step runs after the answer: let it end before the cut.
    eventually("the warm order's saga is finished", || async {
        app.order_intents().await == 0
    })
    .await;

    proxy.set(ProxyMode::LoseNextScriptReply);
    let response = app.post_with_key("/api/v1/orders", "cut-1", &order).await;
    let problem = assert_problem(response, 503, "may have been applied").await;
    assert_eq!(problem["type"], "/problems/outcome-unknown");
    assert_eq!(*proxy.mode.borrow(), ProxyMode::Forward, "the cut happened");
    eventually("Redis ran the order", || async {
        app.journal_count("order").await == 2
    })
    .await;

    let mut retried = app.post_with_key("/api/v1/orders", "cut-1", &order).await;
    for _ in 0..RECONNECT_ATTEMPTS_MAX {
        if retried.status() != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retried = app.post_with_key("/api/v1/orders", "cut-1", &order).await;
    }
    assert_eq!(retried.status(), 201);
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    assert_eq!(app.balance(&customer).await, "84.00", "debited once");
    assert_eq!(
        app.journal_count("order").await,
        2,
        "one order besides the first"
    );
}

/// On a Redis Cluster, through a proxy in front of every master (each
/// master announces its proxy's port, so the cluster client only ever
/// reaches it through the proxy): the proxy forwards the debit of an order
/// to the customer's master and drops the connection instead of passing the
/// reply back. The cluster client sends the script again on a new
/// connection; the step, safe to run twice, answers as the first run did,
/// and the customer is charged once.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_cluster_a_script_whose_reply_is_lost_is_sent_again_and_charges_once() {
    use redis::AsyncCommands;

    let dir = tempfile::tempdir().unwrap();
    let cluster = tally::redis_server::RedisCluster::start(3, 0, dir.path())
        .await
        .unwrap();
    let mut proxies = Vec::new();
    for master in cluster.masters() {
        let proxy = RedisProxy::start(master.port()).await;
        let mut conn = redis::Client::open(master.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-announce-port")
            .arg(proxy.port)
            .query_async(&mut conn)
            .await
            .unwrap();
        proxies.push(proxy);
    }
    // Every node must know every master by its proxy before the app asks.
    let proxy_ports: HashSet<u16> = proxies.iter().map(|proxy| proxy.port).collect();
    for master in cluster.masters() {
        let url = master.url();
        let expected = proxy_ports.clone();
        eventually("every node knows the masters by their proxies", || {
            let (url, expected) = (url.clone(), expected.clone());
            async move {
                let mut conn = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let ports: HashSet<u16> = nodes
                    .lines()
                    .filter_map(|line| {
                        line.split(' ')
                            .nth(1)?
                            .split([':', '@'])
                            .nth(1)?
                            .parse()
                            .ok()
                    })
                    .collect();
                ports == expected
            }
        })
        .await;
    }
    let seeds: Vec<String> = proxies.iter().map(RedisProxy::url).collect();
    let app = crate::helpers::spawn_app_on_redis(
        crate::helpers::TestRedis::Cluster(cluster),
        |settings| {
            settings.redis.redis_url = Some(seeds.join(","));
            settings.access.authentication = false;
        },
    )
    .await;
    assert!(app.store.is_cluster());
    let customer = app.create_account("alice", "100.00").await;
    // Loads the scripts on the masters the order touches: a cut after an
    // EVALSHA that met NOSCRIPT would run nothing.
    let warm = json!({"account_id": customer, "symbol": "ABAN", "quantity": "1"});
    assert_eq!(app.post("/api/v1/orders", &warm).await.status(), 201);
    eventually("the warm order's saga is finished", || async {
        app.order_intents().await == 0
    })
    .await;

    // The proxy of the customer's master: the one where her account is.
    let account_key = app
        .keys()
        .account(&tally::domain::AccountId::parse(&customer).unwrap());
    let mut at = None;
    for (index, proxy) in proxies.iter().enumerate() {
        let mut conn = redis::Client::open(proxy.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let here: redis::RedisResult<bool> = conn.exists(&account_key).await;
        if here == Ok(true) {
            at = Some(index);
        }
    }
    let proxy = &proxies[at.expect("a master holds the account")];

    proxy.set(ProxyMode::LoseNextScriptReply);
    let order = json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    let response = app.post_with_key("/api/v1/orders", "cut-1", &order).await;
    assert_eq!(*proxy.mode.borrow(), ProxyMode::Forward, "the cut happened");
    assert_eq!(
        response.status(),
        201,
        "sent again, answered as the first run"
    );
    assert_eq!(app.balance(&customer).await, "84.00", "debited once");
    assert_eq!(
        app.journal_count("order").await,
        2,
        "one order besides the first"
    );
    let replay = app.post_with_key("/api/v1/orders", "cut-1", &order).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(app.balance(&customer).await, "84.00");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}
