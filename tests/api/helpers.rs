//! Test helpers: every test gets its own redis-server (a child process on a
//! port of its own, killed on drop) and its own API bound on port 0.

use std::collections::BTreeMap;

use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::app::Application;
use tally::config::{ApiSettings, LedgerSettings, RedisSettings, ServeArgs};
use tally::redis_server::RedisServer;
use tally::store::Store;
use tokio::sync::oneshot;

pub const PROBLEM_JSON: &str = "application/problem+json";

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub redis: RedisServer,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts redis-server and the API, letting the test adjust the settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        tally::telemetry::init(tally::config::LogFormat::Text);
    }
    let redis = RedisServer::start_ephemeral()
        .await
        .expect("redis-server starts");
    let mut settings = ServeArgs {
        redis: RedisSettings::for_url(&redis.url()),
        ledger: LedgerSettings::default(),
        api: ApiSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ApiSettings::default()
        },
    };
    adjust(&mut settings);
    let app = Application::build(settings).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let store = app.store();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        store,
        redis,
        stop: Some(stop),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request is sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request is sent")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Opens an account with `balance` and returns its id.
    pub async fn create_account(&self, name: &str, balance: &str) -> String {
        let response = self
            .post(
                "/api/v1/accounts",
                &json!({"name": name, "balance": balance}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn place_order(
        &self,
        account_id: &str,
        symbol: &str,
        quantity: &str,
    ) -> reqwest::Response {
        let body = json!({"account_id": account_id, "symbol": symbol, "quantity": quantity});
        self.post("/api/v1/orders", &body).await
    }

    pub async fn balance(&self, account_id: &str) -> String {
        let account = self
            .get_json(&format!("/api/v1/accounts/{account_id}"))
            .await;
        account["balance"].as_str().unwrap().to_owned()
    }

    pub async fn bucket(&self, symbol: &str) -> Value {
        let buckets = self.get_json("/api/v1/buckets").await;
        buckets
            .as_array()
            .unwrap()
            .iter()
            .find(|bucket| bucket["symbol"] == symbol)
            .cloned()
            .expect("the symbol has a bucket")
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// Every settle job on the stream, as its fields.
    pub async fn settle_jobs(&self) -> Vec<BTreeMap<String, String>> {
        stream_entries(&mut self.redis().await, tally::store::keys::SETTLE_STREAM).await
    }

    pub async fn journal(&self) -> Vec<BTreeMap<String, String>> {
        stream_entries(&mut self.redis().await, tally::store::keys::JOURNAL).await
    }

    /// Everything in Redis, to show that a refused request changed nothing.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        redis_snapshot(&mut self.redis().await).await
    }
}

pub async fn stream_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<BTreeMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    reply
        .ids
        .into_iter()
        .map(|entry| {
            entry
                .map
                .iter()
                .map(|(field, value)| {
                    (
                        field.clone(),
                        redis::from_redis_value_ref::<String>(value).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Every key with its type and full contents, rendered as text.
pub async fn redis_snapshot(
    conn: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<String, String> {
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut snapshot = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let contents = match kind.as_str() {
            "string" => conn.get::<_, String>(&key).await.unwrap(),
            "hash" => format!(
                "{:?}",
                conn.hgetall::<_, BTreeMap<String, String>>(&key)
                    .await
                    .unwrap()
            ),
            "list" => format!(
                "{:?}",
                conn.lrange::<_, Vec<String>>(&key, 0, -1).await.unwrap()
            ),
            "set" => {
                let mut members: Vec<String> = conn.smembers(&key).await.unwrap();
                members.sort();
                format!("{members:?}")
            }
            "zset" => format!(
                "{:?}",
                conn.zrange_withscores::<_, Vec<(String, f64)>>(&key, 0, -1)
                    .await
                    .unwrap()
            ),
            "stream" => format!("{:?}", stream_entries(conn, &key).await),
            other => panic!("unexpected type {other} for {key}"),
        };
        snapshot.insert(key, format!("{kind} {contents}"));
    }
    snapshot
}

/// Asserts a refusal: the status, a problem+json body whose detail says
/// `detail_part`; returns the problem.
pub async fn assert_problem(response: reqwest::Response, status: u16, detail_part: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with(PROBLEM_JSON),
        "content type {content_type}"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], status);
    for field in ["type", "title", "detail"] {
        assert!(problem[field].is_string(), "problem has {field}: {problem}");
    }
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(detail_part),
        "detail `{detail}` should mention `{detail_part}`"
    );
    problem
}
