//! Running tally: the spec on disk, health, Swagger UI, the audit command and
//! `tally dev` as the README's quick start uses it.

use std::process::{Command, Stdio};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;

use crate::helpers::{free_port, spawn_app};

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

/// The README's API section and the spec say the same thing: every
/// operation has a `curl` line, and every status an operation documents is
/// in the README's list of status codes.
#[test]
fn the_readme_shows_every_operation_and_status_of_the_spec() {
    let spec: serde_yaml::Value = serde_yaml::from_str(&tally::api::spec_yaml()).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut statuses = std::collections::BTreeSet::new();
    // `{id}` stands for a placeholder such as ORDER_ID or @exchange.
    let template = regex::Regex::new(r"\\\{[a-z_]+\\\}").unwrap();
    for (path, operations) in spec["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        let escaped = regex::escape(&format!("/api/v1{path}"));
        let pattern = template.replace_all(&escaped, "[A-Za-z0-9_@$.-]+");
        let pattern = regex::Regex::new(&format!("{pattern}([\\s'?]|$)")).unwrap();
        for (method, operation) in operations.as_mapping().unwrap() {
            let method = method.as_str().unwrap().to_uppercase();
            let shown = lines.iter().any(|line| {
                pattern.is_match(line)
                    && if method == "GET" {
                        !line.contains("-X")
                    } else {
                        line.contains(&format!("-X{method}"))
                            || line.contains(&format!("-X {method}"))
                    }
            });
            assert!(shown, "README shows no curl line for {method} {path}");
            for status in operation["responses"].as_mapping().unwrap().keys() {
                statuses.insert(status.as_str().unwrap().to_owned());
            }
        }
    }
    let status_list = &readme[readme.find("- **Status codes**").expect("a status list")..];
    for status in statuses
        .iter()
        .filter(|status| status.starts_with(['4', '5']))
    {
        assert!(
            status_list.contains(&format!("- {status}"))
                || status_list.contains(&format!("/ {status}"))
                || status_list.contains(&format!("; {status}")),
            "README's status codes do not list {status}"
        );
    }
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
    let mut app = spawn_app().await;
    app.redis.kill().await.unwrap();
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let problem: serde_json::Value = response.json().await.unwrap();
    // Open to anyone: it says what, never Redis's own words.
    assert_eq!(problem["detail"], "the ledger store is not ready");
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
        .hincr(
            app.keys()
                .account(&tally::domain::AccountId::parse(&customer).unwrap()),
            "balance",
            1,
        )
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

/// `tally dev` as the README starts it, on ports of its own; ready to serve.
struct Dev {
    process: std::process::Child,
    base: String,
    redis_port: u16,
    data_dir: tempfile::TempDir,
    /// The admin key `tally dev` printed (and wrote to dev-keys.env).
    admin_key: String,
    /// Sends the admin key.
    client: reqwest::Client,
}

/// How long a `tally dev` gets to stop its redis-server before it is killed.
const DEV_STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for Dev {
    /// SIGTERM first, so `tally dev` stops its private redis-server: a SIGKILL
    /// would leave that server running after the test.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.process.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + DEV_STOP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if !matches!(self.process.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
    }
}

async fn spawn_dev() -> Dev {
    spawn_dev_with(&[], Stdio::null()).await
}

async fn spawn_dev_with(env: &[(&str, &str)], stderr: Stdio) -> Dev {
    let data_dir = tempfile::tempdir().unwrap();
    let (api_port, redis_port, sim_port) = (free_port(), free_port(), free_port());
    let process = Command::new(TALLY)
        .args(["dev", "--listen", &format!("127.0.0.1:{api_port}")])
        .args(["--dev-redis-port", &redis_port.to_string()])
        .args(["--exchange-sim-listen", &format!("127.0.0.1:{sim_port}")])
        .arg("--data-dir")
        .arg(data_dir.path())
        .env_remove("TALLY_REDIS_URL")
        .env_remove("TALLY_EXCHANGE_URL")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut dev = Dev {
        process,
        base: format!("http://127.0.0.1:{api_port}"),
        redis_port,
        data_dir,
        admin_key: String::new(),
        client: reqwest::Client::new(),
    };
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(response) = client.get(format!("{}/ready", dev.base)).send().await {
            ready = response.status() == 200;
            if ready {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "tally dev became ready");
    // It writes its keys before it starts answering.
    let keys = std::fs::read_to_string(dev.data_dir.path().join("dev-keys.env")).unwrap();
    dev.admin_key = dev_key(&keys, "TALLY_ADMIN_KEY");
    dev.client = tally::traffic::authorized_client(&dev.admin_key).unwrap();
    dev
}

/// One `NAME=value` of dev-keys.env.
fn dev_key(keys: &str, name: &str) -> String {
    keys.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in {keys}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_its_own_durable_redis_and_stops_it_on_exit() {
    let mut dev = spawn_dev().await;
    let client = dev.client.clone();
    let response = client
        .post(format!("{}/api/v1/accounts", dev.base))
        .json(&json!({"name": "dev", "balance": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // SAFETY: signalling our own child.
    unsafe { libc::kill(dev.process.id() as libc::pid_t, libc::SIGTERM) };
    let status = dev.process.wait().unwrap();
    assert!(
        status.success(),
        "tally dev exits cleanly on SIGTERM: {status}"
    );
    assert!(
        dev.data_dir.path().join("appendonlydir").is_dir(),
        "the AOF is under the data folder"
    );
    let gone = redis::Client::open(format!("redis://127.0.0.1:{}", dev.redis_port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(gone.is_err(), "the private redis-server stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn gen_against_dev_ends_with_a_summary_and_a_clean_audit() {
    let dev = spawn_dev().await;
    let output = tokio::process::Command::new(TALLY)
        .args(["gen", "1000", "--url", &dev.base, "--key", &dev.admin_key])
        .output()
        .await
        .unwrap();
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{summary}");
    assert!(
        summary.contains("summary: 1000 requests") && summary.contains("failed 0"),
        "{summary}"
    );
    for kind in ["deposit", "withdrawal", "card_payment", "order"] {
        assert!(summary.contains(kind), "{summary}");
    }
    let redis_url = format!("redis://127.0.0.1:{}", dev.redis_port);
    let mut clean = false;
    for _ in 0..100 {
        let audit = Command::new(TALLY)
            .args(["audit", "--redis-url", &redis_url])
            .output()
            .unwrap();
        // Workers may still be applying the last transactions: wait for a quiet ledger.
        if audit.status.success() {
            clean = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(clean, "tally audit passes once the workers are done");
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_with_a_two_second_period_logs_a_full_repayment() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let dev = spawn_dev_with(
        &[
            ("TALLY_ADVANCE_PERIOD", "2s"),
            ("TALLY_SCHEDULER_INTERVAL_MS", "100"),
            ("TALLY_LOG_FORMAT", "json"),
        ],
        Stdio::from(log.reopen().unwrap()),
    )
    .await;
    let client = dev.client.clone();
    let account: serde_json::Value = client
        .post(format!("{}/api/v1/accounts", dev.base))
        .json(&json!({"name": "demo", "balance": "10.00"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let response = client
        .post(format!("{}/api/v1/advances", dev.base))
        .json(&json!({"account_id": account["id"], "amount": "120.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let started = std::time::Instant::now();
    // 12 periods of 2 s: about 24 s, bounded at 40.
    while started.elapsed() < Duration::from_secs(40) {
        let logged = std::fs::read_to_string(log.path()).unwrap();
        if logged.contains("advance fully repaid") {
            assert_eq!(
                logged.matches("installment paid").count(),
                12,
                "one log line per collection"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no full repayment in the logs within 40 s");
}

/// Runs a short `tally bench orders` with `extra` arguments; returns what it
/// printed and its JSON figures, once it has exited 0.
async fn run_bench_orders(extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let output = tokio::process::Command::new(TALLY)
        .args(["bench", "orders", "--duration", "1s", "--accounts", "20"])
        .args(["--concurrency", "8"])
        .args(extra)
        .arg("--json")
        .arg(&json_path)
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{printed}");
    let figures = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    (printed, figures)
}

/// The bench the README runs: a short run ends with a clean audit, no errors,
/// and every figure in its JSON; the figures themselves are not judged here.
#[tokio::test(flavor = "multi_thread")]
async fn bench_orders_runs_end_to_end_and_writes_its_figures() {
    let (printed, figures) = run_bench_orders(&[]).await;
    for line in [
        "HTTP ceiling",
        "Redis ceiling",
        "p99.9",
        "all settled",
        "audit clean",
        "targets:",
    ] {
        assert!(printed.contains(line), "`{line}` missing from:\n{printed}");
    }
    assert_eq!(figures["audit_clean"], json!(true), "{figures}");
    assert_eq!(figures["errors"], json!(0), "{figures}");
    assert_eq!(figures["settle_after_load"], json!(false), "{figures}");
    assert_eq!(figures["drain_cpu_us_redis"], json!(null), "{figures}");
    assert!(figures["orders"].as_u64().unwrap() > 0, "{figures}");
    assert!(figures["batches"].as_u64().unwrap() > 0, "{figures}");
    for field in [
        "http_ceiling_per_sec",
        "redis_ceiling_per_sec",
        "orders_per_sec",
        "latency_p99_ms",
        "ratio_to_http_ceiling",
        "orders_cpu_us_workers",
        "settled_after_load_ms",
    ] {
        assert!(figures[field].as_f64().is_some(), "{field} in {figures}");
    }
}

/// `--settle-after-load` keeps the workers off during the load: nothing is
/// settled and no worker CPU is spent until it stops; then every batch is
/// settled and the audit is clean.
#[tokio::test(flavor = "multi_thread")]
async fn bench_orders_can_settle_after_the_load() {
    let (printed, figures) = run_bench_orders(&["--settle-after-load"]).await;
    assert!(printed.contains("started after the load"), "{printed}");
    assert!(printed.contains("(0 settled during the load)"), "{printed}");
    assert_eq!(figures["settle_after_load"], json!(true), "{figures}");
    assert_eq!(figures["audit_clean"], json!(true), "{figures}");
    assert!(
        printed.contains("settling after the load: CPU per order"),
        "{printed}"
    );
    assert!(
        figures["drain_cpu_us_redis"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    // Settlement's rate is taken over the drain alone.
    let batches = figures["batches"].as_f64().unwrap();
    let drain_secs = figures["settled_after_load_ms"].as_f64().unwrap() / 1000.0;
    let rate = figures["batches_settled_per_sec"].as_f64().unwrap();
    assert!(batches > 0.0, "{figures}");
    assert!(
        (rate - batches / drain_secs).abs() <= rate * 0.01,
        "{figures}"
    );
}
