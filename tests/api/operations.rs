//! Running tally: the spec on disk, health, Swagger UI, the audit command and
//! `tally dev` as the README's quick start uses it.

use std::process::{Command, Stdio};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;

use crate::helpers::spawn_app;

const TALLY: &str = env!("CARGO_BIN_EXE_tally");

#[test]
fn openapi_yaml_matches_the_code() {
    let on_disk =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert!(
        on_disk == tally::api::spec_yaml(),
        "openapi.yaml is stale: run `cargo run -- openapi --out openapi.yaml`"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_docs_and_spec_are_served() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.status(), 200);
    assert_eq!(app.get("/ready").await.status(), 200);
    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"));
    let spec = app.get("/openapi.yaml").await.text().await.unwrap();
    assert!(spec.contains("/orders"));
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_when_redis_is_gone() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let _: Result<(), _> = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async(&mut conn)
        .await;
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let response = app
        .place_order("01900000-0000-7000-8000-000000000000", "ABAN", "1")
        .await;
    assert_eq!(response.status(), 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_command_fails_on_a_breach() {
    let app = spawn_app().await;
    let customer = app.create_account("a", "10.00").await;
    app.place_order(&customer, "ABAN", "1").await;
    let audit = || {
        Command::new(TALLY)
            .args(["audit", "--redis-url", &app.redis.url()])
            .output()
            .unwrap()
    };
    let clean = audit();
    assert!(clean.status.success());
    assert!(String::from_utf8_lossy(&clean.stdout).contains("audit clean"));

    // Money out of nowhere: a balance that no journal entry explains.
    let mut conn = app.redis().await;
    let _: i64 = conn
        .hincr(format!("tally:account:{customer}"), "balance", 1)
        .await
        .unwrap();
    let breached = audit();
    assert!(!breached.status.success());
    let report = String::from_utf8_lossy(&breached.stdout);
    assert!(
        report.contains("BREACH") && report.contains(&customer),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_without_redis_server_says_how_to_install_it() {
    let output = Command::new(TALLY)
        .arg("dev")
        .env("PATH", "/nonexistent")
        .env_remove("TALLY_REDIS_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("apt-get install -y redis-server"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_its_own_durable_redis_and_stops_it_on_exit() {
    let data_dir = tempfile::tempdir().unwrap();
    let api_port = free_port();
    let redis_port = free_port();
    let mut dev = Command::new(TALLY)
        .args(["dev", "--listen", &format!("127.0.0.1:{api_port}")])
        .args(["--dev-redis-port", &redis_port.to_string()])
        .arg("--data-dir")
        .arg(data_dir.path())
        .env_remove("TALLY_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{api_port}");
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(response) = client.get(format!("{base}/ready")).send().await {
            ready = response.status() == 200;
            if ready {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "tally dev became ready");
    let response = client
        .post(format!("{base}/api/v1/accounts"))
        .json(&json!({"name": "dev", "balance": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // SAFETY: signalling our own child.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    let status = dev.wait().unwrap();
    assert!(
        status.success(),
        "tally dev exits cleanly on SIGTERM: {status}"
    );
    assert!(
        data_dir.path().join("appendonlydir").is_dir(),
        "the AOF is under the data folder"
    );
    let gone = redis::Client::open(format!("redis://127.0.0.1:{redis_port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(gone.is_err(), "the private redis-server stopped");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
