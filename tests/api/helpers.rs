//! Test helpers: every test gets its own redis-server (a child process on a
//! port of its own, killed on drop) and its own API bound on port 0.

use std::collections::BTreeMap;

use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::access::{KeyRequest, Role, issue_key};
use tally::app::Application;
use tally::config::{
    AccessSettings, ApiSettings, LedgerSettings, RedisSettings, Sagas, ServeArgs, WorkerSettings,
};
use tally::domain::{AccountId, Symbol};
use tally::exchange::sim::{ExchangeSim, Faults, SimOrder};
use tally::redis_server::{RedisCluster, RedisServer};
use tally::store::Store;
use tally::store::keys::Keys;
use tally::store::slots::Shard;
use tokio::sync::{oneshot, watch};

use crate::shared_cluster::SharedCluster;

pub const PROBLEM_JSON: &str = "application/problem+json";
/// The largest balance the scripts keep exact, 2^53 - 1 cents (`BALANCE_LIMIT`
/// in lua/lib.lua).
pub const BALANCE_LIMIT_CENTS: i64 = 9_007_199_254_740_991;

/// The pepper every test app hashes its keys with.
pub const TEST_PEPPER: &str = "tally-test-pepper-0123456789abcdef0123456789";

pub struct TestApp {
    pub address: String,
    /// Sends [`TestApp::admin_key`] with every request.
    pub client: reqwest::Client,
    /// An admin key, made when the app started.
    pub admin_key: String,
    pub store: Store,
    pub redis: TestRedis,
    /// Where this app's workers archive what leaves Redis.
    pub archive_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

/// The Redis a test app runs on: its own redis-server, or a Redis Cluster
/// on loopback.
pub enum TestRedis {
    Node(RedisServer),
    Cluster(RedisCluster),
    /// One of the cluster suite's clusters, handed back when the app drops.
    Shared(SharedCluster),
}

impl TestRedis {
    /// The node's URL, or the cluster's seed list.
    pub fn url(&self) -> String {
        match self {
            TestRedis::Node(server) => server.url(),
            TestRedis::Cluster(cluster) => cluster.urls(),
            TestRedis::Shared(shared) => shared.cluster().urls(),
        }
    }

    /// The URL of every master: the node, or each master of the cluster
    /// (for commands a cluster client would send to one node only).
    pub fn master_urls(&self) -> Vec<String> {
        let masters = match self {
            TestRedis::Node(server) => return vec![server.url()],
            TestRedis::Cluster(cluster) => cluster.masters(),
            TestRedis::Shared(shared) => shared.cluster().masters(),
        };
        masters.iter().map(RedisServer::url).collect()
    }

    /// Kills the redis-server, or every node of the cluster (SIGKILL).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        match self {
            TestRedis::Node(server) => server.kill().await,
            TestRedis::Cluster(cluster) => cluster.kill().await,
            TestRedis::Shared(shared) => shared.kill().await,
        }
    }
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

/// `TALLY_SAGAS` from the environment, as the product reads it (`auto` by default).
pub fn test_sagas() -> Sagas {
    match std::env::var("TALLY_SAGAS").as_deref() {
        Ok("always") => Sagas::Always,
        Ok("auto") | Err(_) => Sagas::Auto,
        Ok(other) => panic!("TALLY_SAGAS={other}: auto or always"),
    }
}

/// Starts redis-server and the API with the sagas on, as on a cluster,
/// whatever `TALLY_SAGAS` says.
pub async fn spawn_app_with_sagas() -> TestApp {
    spawn_app_with(|settings| settings.redis.sagas = Sagas::Always).await
}

/// Whether this run of the suite puts every app on a Redis Cluster
/// (`TALLY_TEST_REDIS=cluster`) rather than a redis-server of its own.
pub fn cluster_suite() -> bool {
    match std::env::var("TALLY_TEST_REDIS").as_deref() {
        Ok("cluster") => true,
        Ok("node") | Err(_) => false,
        Ok(other) => panic!("TALLY_TEST_REDIS={other}: node or cluster"),
    }
}

/// Starts Redis (a redis-server, or a cluster in the cluster suite) and the
/// API, letting the test adjust the settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    if cluster_suite() {
        let shared = TestRedis::Shared(SharedCluster::take().await);
        return spawn_app_on_redis(shared, adjust).await;
    }
    spawn_app_on_node(adjust).await
}

/// Starts a redis-server of its own and the API on it, in either suite: for
/// tests of what only one node shows (a restart, `KEYS`-free snapshots of a
/// single process, a replica of its own).
pub async fn spawn_app_on_node(adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    let redis = RedisServer::start_ephemeral()
        .await
        .expect("redis-server starts");
    spawn_app_on(redis, adjust).await
}

/// Starts the API against `redis`, which the app then owns.
pub async fn spawn_app_on(redis: RedisServer, adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    spawn_app_on_redis(TestRedis::Node(redis), adjust).await
}

/// Starts the API on a 3-master Redis Cluster on loopback (in either suite).
pub async fn spawn_app_on_cluster(adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    spawn_app_on_redis(TestRedis::Shared(SharedCluster::take().await), adjust).await
}

/// Starts the API against `redis`, which the app then owns.
pub async fn spawn_app_on_redis(redis: TestRedis, adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        tally::telemetry::init(tally::config::LogFormat::Text, "info");
    }
    let mut settings = ServeArgs {
        redis: RedisSettings {
            // `TALLY_SAGAS=always cargo test` runs the suite with the sagas
            // on one node, as a cluster would run it.
            sagas: test_sagas(),
            ..RedisSettings::for_url(&redis.url())
        },
        ledger: LedgerSettings::default(),
        api: ApiSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ApiSettings::default()
        },
        access: AccessSettings {
            api_key_pepper: Some(TEST_PEPPER.to_owned()),
            // Tests send bursts far past a client's default limits; the
            // tests of the limits themselves set their own.
            rate_limit_reads_per_s: 1_000_000,
            rate_limit_writes_per_s: 1_000_000,
            ..AccessSettings::default()
        },
    };
    adjust(&mut settings);
    let pepper = settings.access.pepper().unwrap();
    let app = Application::build(settings).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let store = app.store();
    let admin_key = issue_test_key(&store, &pepper, Role::Admin, None).await;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: tally::traffic::authorized_client(&admin_key).unwrap(),
        admin_key,
        store,
        redis,
        archive_dir: tempfile::tempdir().expect("a temporary archive directory"),
        stop: Some(stop),
    }
}

/// Makes a key straight in Redis, as `tally keys create` does.
pub async fn issue_test_key(
    store: &Store,
    pepper: &tally::access::Pepper,
    role: Role,
    account: Option<&str>,
) -> String {
    let request = KeyRequest {
        role,
        account: account.map(|id| tally::domain::AccountId::parse(id).unwrap()),
        expires_in: None,
        label: Some("test".to_owned()),
        reads_per_s: None,
        writes_per_s: None,
    };
    issue_key(store, pepper, request).await.unwrap().0.plaintext
}

impl TestApp {
    /// A new key of `role` (bound to `account` for a customer key).
    pub async fn key(&self, role: Role, account: Option<&str>) -> String {
        let pepper = tally::access::Pepper::new(TEST_PEPPER).unwrap();
        issue_test_key(&self.store, &pepper, role, account).await
    }

    /// The id of [`TestApp::admin_key`] (what idempotency keys are scoped by).
    pub fn admin_key_id(&self) -> String {
        self.admin_key.split('_').nth(2).unwrap().to_owned()
    }

    /// A client that sends `key` as its bearer token.
    pub fn client_with(&self, key: &str) -> reqwest::Client {
        tally::traffic::authorized_client(key).unwrap()
    }

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

    /// `post` with an `Idempotency-Key` header.
    pub async fn post_with_key(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Idempotency-Key", key)
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

    /// A customer's balance in cents, read from Redis (the API answers in
    /// dollars, and rounds nothing, but tests near the limits want integers).
    /// A system account's is the sum of its sub-accounts.
    pub async fn balance_cents(&self, account_id: &str) -> i64 {
        let id = AccountId::parse(account_id).unwrap();
        let mut conn = self.redis().await;
        if id.is_system() {
            return tally::store::accounts::system_balance(&mut conn, self.keys(), &id)
                .await
                .unwrap();
        }
        AsyncCommands::hget(&mut conn, self.keys().account(&id), "balance")
            .await
            .unwrap()
    }

    /// The key names of the app's shard layout (the default's).
    /// The archive this app's workers write.
    pub fn archive(&self) -> tally::archive::Archive {
        tally::archive::Archive::new(self.archive_dir.path())
    }

    pub fn keys(&self) -> &Keys {
        self.store.keys()
    }

    /// A customer account's shard.
    pub fn shard_of(&self, account_id: &str) -> Shard {
        self.keys()
            .account_shard(&AccountId::parse(account_id).unwrap())
    }

    /// Sets a balance by hand, for states no test could reach through the API
    /// in its time (the journal no longer matches: no audit after this).
    /// A system account's only on an app with one shard, where it has one
    /// sub-account (else set the sub-account's hash by hand).
    pub async fn set_balance_cents(&self, account_id: &str, cents: i64) {
        let id = AccountId::parse(account_id).unwrap();
        let shards = self.keys().layout().count();
        assert!(
            !id.is_system() || shards == 1,
            "set a sub-account: {shards} shards"
        );
        let _: () = AsyncCommands::hset(
            &mut self.redis().await,
            self.keys().account_on(self.keys().layout().first(), &id),
            "balance",
            cents,
        )
        .await
        .unwrap();
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

    /// A connection of the test's own to the app's Redis: straight to the
    /// redis-server or the cluster (not through whatever proxy the app may
    /// be given).
    pub async fn redis(&self) -> tally::store::connection::Conn {
        match &self.redis {
            TestRedis::Node(server) => Store::connect_node(&RedisSettings::for_url(&server.url()))
                .unwrap()
                .conn()
                .await
                .unwrap(),
            // A client of its own, not the app's: with the default timeouts,
            // whatever the test set the app's to.
            TestRedis::Cluster(_) | TestRedis::Shared(_) => {
                Store::connect(&RedisSettings::for_url(&self.redis.url()))
                    .await
                    .unwrap()
                    .conn()
                    .await
                    .unwrap()
            }
        }
    }

    /// Every settle job on every shard's stream, as its fields.
    pub async fn settle_jobs(&self) -> Vec<BTreeMap<String, String>> {
        self.all_entries(Keys::settle).await
    }

    /// Every shard's journal, merged in entry-id order.
    pub async fn journal(&self) -> Vec<BTreeMap<String, String>> {
        let mut conn = self.redis().await;
        let mut entries = Vec::new();
        for shard in self.keys().shards() {
            let reply: redis::streams::StreamRangeReply =
                conn.xrange_all(self.keys().journal(shard)).await.unwrap();
            for entry in &reply.ids {
                let id = tally::store::streams::StreamId::parse(&entry.id).unwrap();
                let fields: BTreeMap<String, String> =
                    tally::store::stream_fields(entry).into_iter().collect();
                entries.push(((id, shard), fields));
            }
        }
        entries.sort_by_key(|a| a.0);
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    /// Checks the lists the console's account page reads: each customer's
    /// list of entries names exactly the entries, on every shard's journal,
    /// listed for it (its debit side, and its credit side but for a refused
    /// transfer), each once; and its list of orders exactly the orders its
    /// `order` entries name that are still in Redis (at least those, once
    /// the journal has trimmed some). Returns how many entries were listed.
    pub async fn assert_account_lists(&self) -> usize {
        use tally::store::journal::{JournalEntry, Listed, listed_for, parse_listed};
        let mut conn = self.redis().await;
        let keys = self.keys();
        let mut expected: BTreeMap<String, (Vec<Listed>, Vec<String>)> = BTreeMap::new();
        let mut trimmed = false;
        for shard in keys.shards() {
            let accounts: Vec<String> = conn.zrange(keys.accounts(shard), 0, -1).await.unwrap();
            for account in accounts {
                expected.entry(account).or_default();
            }
            let carried: usize = conn.hlen(keys.journal_carried(shard)).await.unwrap();
            trimmed |= carried > 0;
        }
        for shard in keys.shards() {
            let journal: redis::streams::StreamRangeReply =
                conn.xrange_all(keys.journal(shard)).await.unwrap();
            for entry in &journal.ids {
                let entry = JournalEntry {
                    fields: tally::store::stream_fields(entry),
                    id: entry.id.clone(),
                };
                for account in listed_for(&entry) {
                    let Some((entries, orders)) = expected.get_mut(account.as_str()) else {
                        continue; // an account that does not exist: listed nowhere
                    };
                    entries.push(Listed {
                        entry: entry.id.clone(),
                        shard: shard.index(),
                    });
                    if entry.fields["kind"] == "order" {
                        orders.push(entry.fields["ref"].clone());
                    }
                }
            }
        }
        let mut listed_total = 0;
        for (account, (mut entries, orders)) in expected {
            let id = AccountId::parse(&account).unwrap();
            // Orders retention took out of Redis are off the list too.
            let mut pipe = redis::pipe();
            for order in &orders {
                pipe.exists(keys.order(&tally::domain::OrderId::parse(order).unwrap()));
            }
            let present: Vec<bool> = if orders.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn).await.unwrap()
            };
            let orders: Vec<String> = orders
                .into_iter()
                .zip(present)
                .filter_map(|(order, present)| present.then_some(order))
                .collect();
            let listed: redis::streams::StreamRangeReply =
                conn.xrange_all(keys.account_entries(&id)).await.unwrap();
            let mut listed: Vec<Listed> = parse_listed(listed)
                .into_iter()
                .map(|(id, listed)| {
                    listed.unwrap_or_else(|| panic!("list entry {id} is malformed"))
                })
                .collect();
            // In the order the scripts ran; on a standalone Redis two
            // shards' journals interleave, so compare as sets.
            listed.sort();
            entries.sort();
            assert_eq!(listed, entries, "account {account}'s journal entries");
            let listed_orders: redis::streams::StreamRangeReply =
                conn.xrange_all(keys.account_orders(&id)).await.unwrap();
            let listed_orders: Vec<String> = listed_orders
                .ids
                .iter()
                .map(|item| tally::store::stream_fields(item)["order"].clone())
                .collect();
            if trimmed {
                // Orders outlive their trimmed entries.
                assert!(
                    orders.iter().all(|order| listed_orders.contains(order)),
                    "account {account}'s orders {listed_orders:?} lack some of {orders:?}"
                );
            } else {
                assert_eq!(
                    listed_orders, orders,
                    "account {account}'s orders, in order"
                );
            }
            listed_total += listed.len();
        }
        listed_total
    }

    /// Every journal entry's report id (`ms-seq.shard`), newest first, in
    /// the order the report merges the shards: (entry id, shard) descending.
    pub async fn journal_ids_newest_first(&self) -> Vec<String> {
        let mut conn = self.redis().await;
        let mut ids = Vec::new();
        for shard in self.keys().shards() {
            let reply: redis::streams::StreamRangeReply =
                conn.xrange_all(self.keys().journal(shard)).await.unwrap();
            for entry in reply.ids {
                let id = tally::store::streams::StreamId::parse(&entry.id).unwrap();
                ids.push((id, shard.index()));
            }
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.into_iter()
            .map(|(id, shard)| format!("{id}.{shard}"))
            .collect()
    }

    /// A transfer of `amount` from `payer` to `payee`, prepared as the API
    /// prepares one (its id drawn on the payer's shard), for the sagas' steps.
    pub fn movement(
        &self,
        payer: &str,
        payee: &str,
        amount: &str,
    ) -> tally::store::transfers::Movement {
        let payer = AccountId::parse(payer).unwrap();
        let keys = self.keys();
        tally::store::transfers::Movement {
            id: keys.new_id_in(keys.account_shard(&payer)).to_string(),
            kind: "transfer",
            payee: AccountId::parse(payee).unwrap(),
            payer,
            amount: tally::domain::Amount::parse(amount).unwrap(),
            canonical_request: "test".to_owned(),
            memo: String::new(),
            at_ms: tally::store::now_ms(),
            idempotency: None,
            idempotency_ttl_secs: 60,
        }
    }

    /// An account on `beside`'s shard: a transfer between the two is one
    /// step even with the sagas on (one journal entry, not two legs through
    /// `@transit`), for tests that count entries. Each account made on the
    /// way journals its opening balance: pass 0 where entries are counted.
    pub async fn create_account_beside(&self, name: &str, balance: &str, beside: &str) -> String {
        let shard = self.shard_of(beside);
        loop {
            let id = self.create_account(name, balance).await;
            if self.shard_of(&id) == shard {
                return id;
            }
        }
    }

    /// A new customer account on a shard none of `taken` is on.
    pub async fn create_account_off(&self, name: &str, balance: &str, taken: &[&str]) -> String {
        let shards: Vec<Shard> = taken.iter().map(|id| self.shard_of(id)).collect();
        loop {
            let id = self.create_account(name, balance).await;
            if !shards.contains(&self.shard_of(&id)) {
                return id;
            }
        }
    }

    /// Jobs of one kind of per-shard stream delivered to `group` and not yet
    /// acknowledged, on every shard (a stream with no such group has none).
    pub async fn all_pending(&self, stream: fn(&Keys, Shard) -> String, group: &str) -> usize {
        let mut conn = self.redis().await;
        let mut count = 0;
        for shard in self.keys().shards() {
            let pending: redis::RedisResult<redis::streams::StreamPendingReply> =
                redis::cmd("XPENDING")
                    .arg(stream(self.keys(), shard))
                    .arg(group)
                    .query_async(&mut conn)
                    .await;
            count += pending.map_or(0, |pending| pending.count());
        }
        count
    }

    /// The ids the notifier gives every event as first written on every
    /// shard's stream (`s<shard>-<stream id>`; retries are re-added with an
    /// `event_id` field).
    pub async fn event_ids(&self) -> Vec<String> {
        let mut conn = self.redis().await;
        let mut ids = Vec::new();
        for shard in self.keys().shards() {
            let reply: redis::streams::StreamRangeReply =
                conn.xrange_all(self.keys().events(shard)).await.unwrap();
            ids.extend(
                reply
                    .ids
                    .into_iter()
                    .filter(|entry| !entry.map.contains_key("event_id"))
                    .map(|entry| format!("s{}-{}", shard.index(), entry.id)),
            );
        }
        ids
    }

    /// Orders whose saga is not yet finished, on every shard (their intents).
    pub async fn order_intents(&self) -> usize {
        let mut conn = self.redis().await;
        let mut count = 0;
        for shard in self.keys().shards() {
            let n: usize = conn.zcard(self.keys().order_intents(shard)).await.unwrap();
            count += n;
        }
        count
    }

    /// Members of every shard's journal index.
    pub async fn journal_index_len(&self) -> usize {
        let mut conn = self.redis().await;
        let mut length = 0;
        for shard in self.keys().shards() {
            let count: usize = conn.zcard(self.keys().journal_index(shard)).await.unwrap();
            length += count;
        }
        length
    }

    /// The entries of one kind of per-shard stream (`Keys::events`, ...),
    /// every shard's, in shard order.
    pub async fn all_entries(
        &self,
        stream: fn(&Keys, Shard) -> String,
    ) -> Vec<BTreeMap<String, String>> {
        let mut conn = self.redis().await;
        let mut entries = Vec::new();
        for shard in self.keys().shards() {
            entries.extend(stream_entries(&mut conn, &stream(self.keys(), shard)).await);
        }
        entries
    }

    /// How many entries one kind of per-shard stream holds on every shard.
    pub async fn all_length(&self, stream: fn(&Keys, Shard) -> String) -> usize {
        let mut conn = self.redis().await;
        let mut length = 0;
        for shard in self.keys().shards() {
            let count: usize = conn.xlen(stream(self.keys(), shard)).await.unwrap();
            length += count;
        }
        length
    }

    /// Journal entries of one `kind` (order, refund, deposit, ...).
    pub async fn journal_count(&self, kind: &str) -> usize {
        self.journal()
            .await
            .iter()
            .filter(|entry| entry["kind"] == kind)
            .count()
    }

    /// Everything in Redis, to show that a refused request changed nothing.
    pub async fn snapshot(&self) -> BTreeMap<String, String> {
        redis_snapshot(&mut self.redis().await).await
    }
}

/// Sets Redis's `maxmemory`: 1 makes it refuse every write that could grow
/// memory (a full Redis under `noeviction`), 0 lifts the limit.
pub async fn set_maxmemory(app: &TestApp, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
}

/// Jobs of `stream` delivered to `group` and not yet acknowledged.
pub async fn pending_count(conn: &mut impl tally::store::Conn, stream: &str, group: &str) -> usize {
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    pending.count()
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn stream_entries(
    conn: &mut impl tally::store::Conn,
    key: &str,
) -> Vec<BTreeMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    reply
        .ids
        .iter()
        .map(|entry| tally::store::stream_fields(entry).into_iter().collect())
        .collect()
}

/// The ids of a stream's entries, oldest first.
pub async fn stream_ids(conn: &mut impl tally::store::Conn, key: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    reply.ids.into_iter().map(|entry| entry.id).collect()
}

/// ABAN's home shard (its bucket, batches and settle stream), in the
/// default layout every test app runs with.
pub fn aban_home() -> Shard {
    Keys::default().shard_of_symbol(&Symbol::parse("ABAN").unwrap())
}

/// Reads the next settle job of ABAN's home shard (in `keys`' layout) as
/// `consumer` of the settlers group (made if missing), as a worker would;
/// returns its stream id, now pending.
pub async fn read_settle_job(
    conn: &mut impl tally::store::Conn,
    keys: &Keys,
    consumer: &str,
) -> String {
    use tally::store::settlement;
    let stream = keys.settle(keys.shard_of_symbol(&Symbol::parse("ABAN").unwrap()));
    tally::workers::ensure_group(conn, &stream, settlement::SETTLE_GROUP)
        .await
        .unwrap();
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(settlement::SETTLE_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    read.keys[0].ids[0].id.clone()
}

/// Every key with its type, its expiry and its full contents, rendered as
/// text. A stream also carries its `DUMP` bytes: they hold what its entries
/// alone do not show (entry ids, consumer groups, pending entries), so an
/// acknowledgement or a delivery shows too. The other types are rendered
/// canonically rather than dumped: a dump of a hash table follows its
/// buckets, which a mere read can rehash.
pub async fn redis_snapshot(conn: &mut impl tally::store::Conn) -> BTreeMap<String, String> {
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut snapshot = BTreeMap::new();
    // Rate-limit buckets change with every request, refused ones included,
    // and run out on their own: they are the limiter's state, not the ledger's.
    let rate_limits = tally::store::keys::rate_limit("");
    for key in keys
        .into_iter()
        .filter(|key| !key.starts_with(&rate_limits) && !key.contains("}:rate_limit:"))
    {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        if kind == "none" {
            continue; // expired since KEYS listed it: no longer state
        }
        // Absolute, so that it does not count down between two snapshots.
        let expires_at_ms: i64 = redis::cmd("PEXPIRETIME")
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
            "stream" => {
                let dump: Vec<u8> = redis::cmd("DUMP")
                    .arg(&key)
                    .query_async(conn)
                    .await
                    .unwrap();
                let hex: String = dump.iter().map(|byte| format!("{byte:02x}")).collect();
                format!("{:?} dump {hex}", stream_entries(conn, &key).await)
            }
            other => panic!("unexpected type {other} for {key}"),
        };
        snapshot.insert(key, format!("{kind} expires {expires_at_ms} {contents}"));
    }
    snapshot
}

/// Asserts a refusal: the status, a problem+json body whose detail says
/// `detail_part`; returns the problem.
pub async fn assert_problem(response: reqwest::Response, status: u16, detail_part: &str) -> Value {
    let answered = response.status();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    assert_eq!(answered, status, "status, answered with {text}");
    assert!(
        content_type.starts_with(PROBLEM_JSON),
        "content type {content_type}"
    );
    let problem: Value = serde_json::from_str(&text).unwrap();
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

/// A real exchange-sim on port 0, for the workers to call over HTTP.
pub struct TestExchange {
    pub url: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An exchange-sim that fails every call (503), and one that fails none.
pub const DOWN: Faults = Faults {
    latency_ms: 0,
    fail_rate: 1.0,
    reject_rate: 0.0,
};
pub const UP: Faults = Faults {
    latency_ms: 0,
    fail_rate: 0.0,
    reject_rate: 0.0,
};

pub async fn spawn_exchange(faults: Faults) -> TestExchange {
    let sim = ExchangeSim::bind("127.0.0.1:0".parse().unwrap(), faults)
        .await
        .unwrap();
    let url = sim.url().to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(sim.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestExchange {
        url,
        client: reqwest::Client::new(),
        stop: Some(stop),
    }
}

impl TestExchange {
    /// Every client order id the exchange saw, with its fill and calls.
    pub async fn orders(&self) -> Vec<SimOrder> {
        let response = self
            .client
            .get(format!("{}/v1/orders", self.url))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    pub async fn order(&self, client_order_id: &str) -> Option<SimOrder> {
        self.orders()
            .await
            .into_iter()
            .find(|order| order.client_order_id == client_order_id)
    }

    pub async fn set_faults(&self, faults: Faults) {
        let response = self
            .client
            .put(format!("{}/v1/faults", self.url))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// Worker settings scaled down for tests: quick retries and take-overs.
pub fn test_worker_settings(exchange: &TestExchange) -> WorkerSettings {
    WorkerSettings {
        worker_name: Some("test-worker".to_owned()),
        block_ms: 100,
        claim_idle_ms: 2_000,
        exchange_timeout_ms: 1_500,
        webhook_timeout_ms: 1_500,
        retry_base_ms: 50,
        retry_max_ms: 800,
        webhook_retry_base_ms: 50,
        webhook_retry_max_ms: 800,
        exchange_url: Some(exchange.url.clone()),
        ..WorkerSettings::default()
    }
}

/// Settlement workers running in this process until dropped.
pub struct TestWorkers {
    stop: watch::Sender<bool>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestWorkers {
    /// Signals shutdown and waits for the jobs in hand to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        self.handle.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestWorkers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub fn spawn_workers(app: &TestApp, mut settings: WorkerSettings) -> TestWorkers {
    settings.archive_dir = app.archive_dir.path().to_owned();
    let (stop, stopped) = watch::channel(false);
    let store = app.store.clone();
    let handle = tokio::spawn(async move {
        tally::workers::run_workers(
            store,
            &settings,
            tally::retention::Windows::of(&LedgerSettings::default()),
            stopped,
        )
        .await
    });
    TestWorkers {
        stop,
        handle: Some(handle),
    }
}

/// A `tally worker` process against this app's Redis and `exchange`, with
/// test-sized bounds (a job is taken over after 2 s idle), killed when dropped.
pub fn worker_process(app: &TestApp, exchange: &TestExchange, name: &str) -> tokio::process::Child {
    worker_process_with(app, &exchange.url, name, &[])
}

/// [`worker_process`] against the exchange at `exchange_url`, with `more`
/// arguments (settings it does not set).
pub fn worker_process_with(
    app: &TestApp,
    exchange_url: &str,
    name: &str,
    more: &[&str],
) -> tokio::process::Child {
    let redis_url = app.redis.url();
    let mut args = vec![
        "worker",
        "--redis-url",
        &redis_url,
        "--exchange-url",
        exchange_url,
        "--worker-name",
        name,
        "--claim-idle-ms",
        "2000",
        "--exchange-timeout-ms",
        "1500",
        "--webhook-timeout-ms",
        "1500",
        "--block-ms",
        "100",
        "--retry-base-ms",
        "50",
        "--archive-dir",
        app.archive_dir.path().to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    tally_process(&args)
}

/// A `tally` child process, killed when dropped.
pub fn tally_process(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tally starts")
}

/// Waits, polling, until `condition` holds; fails the test after `EVENTUALLY_MAX`.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY_MAX;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Bound on waiting for workers in tests: generous, since CI machines are shared.
pub const EVENTUALLY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl TestApp {
    pub async fn batch(&self, batch_id: &str) -> Value {
        self.get_json(&format!("/api/v1/batches/{batch_id}")).await
    }

    pub async fn batch_status(&self, batch_id: &str) -> String {
        self.batch(batch_id).await["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Places an order at or above the minimum and returns its batch id.
    pub async fn place_batch(&self, account_id: &str, quantity: &str) -> String {
        let response = self.place_order(account_id, "ABAN", quantity).await;
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        order["batch_id"]
            .as_str()
            .expect("the order closed a batch")
            .to_owned()
    }
}
