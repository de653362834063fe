//! `TALLY_REPLICA_ACKS`: a write is answered only once a replica has it; a
//! replica that does not confirm in time makes the answer a 503 that says
//! the change is on the primary, and a retry with the same Idempotency-Key
//! answers once the replica has caught up.

use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::config::RedisSettings;
use tally::redis_server::RedisServer;
use tally::store::keys::Keys;

use crate::helpers::{PROBLEM_JSON, TestApp, spawn_app_on};

/// How long the tests let a write wait for its replica.
const ACK_TIMEOUT_MS: u64 = 300;

async fn app_with_replica(acks: u8) -> (TestApp, RedisServer) {
    app_with_replica_waiting(acks, ACK_TIMEOUT_MS).await
}

async fn app_with_replica_waiting(acks: u8, timeout_ms: u64) -> (TestApp, RedisServer) {
    let primary = RedisServer::start_ephemeral().await.unwrap();
    let replica = RedisServer::start_replica_of(&primary).await.unwrap();
    let app = spawn_app_on(primary, |settings| {
        settings.redis.replica_acks = acks;
        settings.redis.replica_ack_timeout_ms = timeout_ms;
        settings.redis.redis_timeout_ms = timeout_ms + 2_000;
    })
    .await;
    (app, replica)
}

/// Whether `replica` holds the account record of `id`, read from it directly.
async fn replica_has_account(replica: &RedisServer, keys: &Keys, id: &str) -> bool {
    let client = redis::Client::open(replica.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let account = tally::domain::AccountId::parse(id).unwrap();
    conn.exists(keys.account(&account)).await.unwrap()
}

fn signal(server: &RedisServer, signal: libc::c_int) {
    let pid = server.pid().expect("the replica runs") as libc::pid_t;
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answered_write_is_already_on_the_replica() {
    let (app, replica) = app_with_replica(1).await;
    // Read from the replica the moment each answer arrives: with WAIT
    // before the answer, it is there every time.
    for i in 0..50 {
        let id = app.create_account(&format!("r{i}"), "5.00").await;
        assert!(
            replica_has_account(&replica, app.keys(), &id).await,
            "account {i} was answered before the replica had it"
        );
    }
    // Concurrent writes share waits, and each is still on the replica when answered.
    let writes = (0..40).map(|i| {
        let app = &app;
        let replica = &replica;
        async move {
            let id = app.create_account(&format!("c{i}"), "1.00").await;
            assert!(replica_has_account(replica, app.keys(), &id).await);
        }
    });
    futures::future::join_all(writes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_is_answered_only_when_the_replica_has_it() {
    let (app, replica) = app_with_replica_waiting(1, 10_000).await;
    signal(&replica, libc::SIGSTOP);
    let body = json!({"name": "held", "balance": "3.00"});
    let write = tokio::spawn({
        let client = app.client.clone();
        let url = format!("{}/api/v1/accounts", app.address);
        async move { client.post(url).json(&body).send().await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "answered while the replica could not have it"
    );
    signal(&replica, libc::SIGCONT);
    let response = write.await.unwrap();
    assert_eq!(response.status(), 201);
    let account: Value = response.json().await.unwrap();
    assert!(replica_has_account(&replica, app.keys(), account["id"].as_str().unwrap()).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_does_not_confirm_makes_the_answer_a_503_and_a_retry_answers_once_it_has() {
    let (app, replica) = app_with_replica(1).await;
    signal(&replica, libc::SIGSTOP);
    let body = json!({"name": "late", "balance": "7.00"});
    let started = std::time::Instant::now();
    let response = app.post_with_key("/api/v1/accounts", "ack-1", &body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], PROBLEM_JSON);
    assert!(started.elapsed().as_millis() >= u128::from(ACK_TIMEOUT_MS));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/replica-ack-timeout");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("0 of 1 replicas confirmed"),
        "{problem}"
    );
    // Reads do not wait for replicas.
    assert_eq!(app.get("/api/v1/accounts").await.status(), 200);

    signal(&replica, libc::SIGCONT);
    let retry = app.post_with_key("/api/v1/accounts", "ack-1", &body).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let account: Value = retry.json().await.unwrap();
    let id = account["id"].as_str().unwrap();
    assert!(replica_has_account(&replica, app.keys(), id).await);
    assert_eq!(app.balance(id).await, "7.00", "applied once");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_replica_acks_a_stopped_replica_does_not_hold_up_writes() {
    let (app, replica) = app_with_replica(0).await;
    signal(&replica, libc::SIGSTOP);
    let response = app
        .post(
            "/api/v1/accounts",
            &json!({"name": "fast", "balance": "1.00"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    signal(&replica, libc::SIGCONT);
}

#[tokio::test]
async fn a_replica_wait_longer_than_the_redis_timeout_is_refused() {
    let settings = RedisSettings {
        replica_acks: 1,
        replica_ack_timeout_ms: 5_000,
        redis_timeout_ms: 2_000,
        ..RedisSettings::for_url("redis://127.0.0.1:1")
    };
    let refused = settings.validate().unwrap_err();
    assert!(
        refused.contains("replica_ack_timeout_ms (5000) must be below redis_timeout_ms (2000)")
    );
    let fine = RedisSettings {
        replica_acks: 0,
        ..settings
    };
    assert!(fine.validate().is_ok(), "no wait, no bound");
}
