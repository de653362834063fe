//! `tally migrate`: a dataset of the single-node key layout, written with raw
//! commands as that layout's scripts wrote it (git `db0bc5f`, `lua/`), moves
//! to the sharded layout and is served by the API as it was; a move cut
//! short finishes when run again; and each kind of refusal writes nothing.

use std::collections::BTreeMap;
use std::process::Output;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use serde_json::{Value, json};
use tally::access::{GeneratedKey, Pepper, Role};
use tally::domain::{AccountId, Idempotency, IdempotencyKey, SystemAccount};
use tally::redis_server::RedisServer;
use tally::store::keys::Keys;
use uuid::Uuid;

use crate::helpers::{TEST_PEPPER, redis_snapshot, spawn_app_on};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
/// The shard count every test here migrates to (and the API runs with).
const SHARDS: u16 = 16;
/// The idempotency ttl the old API ran with, seconds.
const TTL_SECS: u64 = 24 * 60 * 60;
/// One ABAN in units of 1e-8, and its price in cents.
const ABAN_UNITS: i64 = 100_000_000;
const ABAN_CENTS: i64 = 400;

/// Runs `tally migrate` against `url`.
fn migrate(url: &str) -> Output {
    std::process::Command::new(TALLY)
        .args(["migrate", "--redis-url", url])
        .env("TALLY_SHARDS", SHARDS.to_string())
        .output()
        .expect("tally runs")
}

fn text(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn now_ms() -> i64 {
    tally::store::now_ms()
}

/// Writes the old layout's keys as its scripts did, one operation at a time.
struct Old {
    conn: MultiplexedConnection,
}

impl Old {
    async fn connect(redis: &RedisServer) -> Self {
        let client = redis::Client::open(redis.url()).unwrap();
        Old {
            conn: client.get_multiplexed_async_connection().await.unwrap(),
        }
    }

    /// What every old process did at start: the system accounts, at 0.
    async fn system_accounts(&mut self) {
        for system in SystemAccount::ALL {
            let id = system.id();
            let key = format!("tally:account:{id}");
            for (field, value) in [
                ("id", id.as_str().to_owned()),
                ("name", id.as_str().to_owned()),
                ("balance", "0".to_owned()),
                ("created_at", now_ms().to_string()),
            ] {
                let _: () = self.conn.hset_nx(&key, field, value).await.unwrap();
            }
        }
    }

    /// `journal()` of lua/lib.lua: the entry, and its index member.
    async fn journal(&mut self, fields: &[(&str, String)]) {
        let id: String = self.conn.xadd("tally:journal", "*", fields).await.unwrap();
        let member = tally::store::journal::stream_id_member(&id);
        let _: () = self
            .conn
            .zadd("tally:journal:index", member, 0)
            .await
            .unwrap();
    }

    async fn event(&mut self, fields: &[(&str, String)]) {
        let _: String = self.conn.xadd("tally:events", "*", fields).await.unwrap();
    }

    async fn add_balance(&mut self, account: &str, cents: i64) {
        let _: i64 = self
            .conn
            .hincr(format!("tally:account:{account}"), "balance", cents)
            .await
            .unwrap();
    }

    /// An entry moving `cents` from `debit` to `credit`, completed.
    async fn moved(&mut self, kind: &str, debit: &str, credit: &str, cents: i64, reference: &str) {
        self.add_balance(debit, -cents).await;
        self.add_balance(credit, cents).await;
        self.journal(&[
            ("at", now_ms().to_string()),
            ("kind", kind.to_owned()),
            ("debit", debit.to_owned()),
            ("credit", credit.to_owned()),
            ("amount", cents.to_string()),
            ("ref", reference.to_owned()),
            ("status", "completed".to_owned()),
            ("reason", String::new()),
        ])
        .await;
    }

    /// create_account.lua, with an opening balance from @bank.
    async fn open_account(
        &mut self,
        name: &str,
        cents: i64,
        key: Option<IdempotencyKey>,
    ) -> String {
        let id = Uuid::now_v7().to_string();
        let at = now_ms().to_string();
        let _: () = self
            .conn
            .hset_multiple(
                format!("tally:account:{id}"),
                &[
                    ("id", id.as_str()),
                    ("name", name),
                    ("balance", "0"),
                    ("created_at", &at),
                ],
            )
            .await
            .unwrap();
        let _: () = self.conn.zadd("tally:accounts", &id, 0).await.unwrap();
        self.moved("opening_balance", "@bank", &id, cents, &id)
            .await;
        self.event(&[
            ("type", "account.opened".to_owned()),
            ("ref", id.clone()),
            ("account_id", id.clone()),
            ("amount", cents.to_string()),
            ("at", at),
        ])
        .await;
        if let Some(key) = key {
            let idem = Idempotency::new(key, &[name, &cents.to_string()]);
            self.idempotency("accounts", &idem, &id).await;
        }
        id
    }

    async fn idempotency(&mut self, scope: &str, idem: &Idempotency, id: &str) {
        let _: () = self
            .conn
            .set_ex(
                format!("tally:idempotency:{scope}:{}", idem.key.as_str()),
                format!("{id} {}", idem.fingerprint),
                TTL_SECS,
            )
            .await
            .unwrap();
    }

    /// transfer.lua, a completed transfer (direction debit: src pays).
    async fn transfer(&mut self, src: &str, dst: &str, cents: i64, key: IdempotencyKey) -> String {
        let id = Uuid::now_v7().to_string();
        let at = now_ms().to_string();
        self.add_balance(src, -cents).await;
        self.add_balance(dst, cents).await;
        self.journal(&[
            ("at", at.clone()),
            ("kind", "transfer".to_owned()),
            ("debit", src.to_owned()),
            ("credit", dst.to_owned()),
            ("amount", cents.to_string()),
            ("requested", cents.to_string()),
            ("ref", id.clone()),
            ("status", "completed".to_owned()),
            ("reason", String::new()),
            ("memo", String::new()),
        ])
        .await;
        let request = format!("{src} {dst} {cents} Debit");
        let record = format!("tally:transaction:{id}");
        let _: () = self
            .conn
            .hset_multiple(
                &record,
                &[
                    ("id", id.as_str()),
                    ("at", &at),
                    ("status", "completed"),
                    ("reason", ""),
                    ("code", ""),
                    ("request", &request),
                ],
            )
            .await
            .unwrap();
        let _: () = self.conn.expire(&record, TTL_SECS as i64).await.unwrap();
        let idem = Idempotency::new(key, &["transfer", &request]);
        self.idempotency("transfer", &idem, &id).await;
        self.event(&[
            ("type", "transfer.completed".to_owned()),
            ("ref", id.clone()),
            ("debit", src.to_owned()),
            ("credit", dst.to_owned()),
            ("amount", cents.to_string()),
            ("at", at),
        ])
        .await;
        id
    }

    /// place_orders.lua: one ABAN for `account`; the bucket's orders so far
    /// are in `waiting`. Returns the order id.
    async fn place_order(&mut self, account: &str, key: Option<IdempotencyKey>) -> String {
        let id = Uuid::now_v7().to_string();
        let at = now_ms().to_string();
        self.moved("order", account, "@exchange", ABAN_CENTS, &id)
            .await;
        self.event(&[
            ("type", "order.placed".to_owned()),
            ("ref", id.clone()),
            ("account_id", account.to_owned()),
            ("symbol", "ABAN".to_owned()),
            ("amount", ABAN_CENTS.to_string()),
            ("at", at.clone()),
        ])
        .await;
        let _: () = self.conn.sadd("tally:symbols", "ABAN").await.unwrap();
        let epoch: Option<String> = self.conn.hget("tally:bucket:ABAN", "epoch").await.unwrap();
        let _: () = self
            .conn
            .hset_multiple(
                format!("tally:order:{id}"),
                &[
                    ("id", id.clone()),
                    ("account_id", account.to_owned()),
                    ("symbol", "ABAN".to_owned()),
                    ("quantity", ABAN_UNITS.to_string()),
                    ("price", ABAN_CENTS.to_string()),
                    ("cost", ABAN_CENTS.to_string()),
                    ("epoch", epoch.clone().unwrap_or_else(|| "0".to_owned())),
                    ("created_at", at),
                ],
            )
            .await
            .unwrap();
        if let Some(key) = key {
            let units = ABAN_UNITS.to_string();
            let idem = Idempotency::new(key, &[account, "ABAN", &units]);
            self.idempotency("orders", &idem, &id).await;
        }
        let _: () = self
            .conn
            .rpush("tally:bucket:ABAN:orders", &id)
            .await
            .unwrap();
        for (field, by) in [
            ("value", ABAN_CENTS),
            ("quantity", ABAN_UNITS),
            ("count", 1),
        ] {
            let _: i64 = self
                .conn
                .hincr("tally:bucket:ABAN", field, by)
                .await
                .unwrap();
        }
        let _: bool = self
            .conn
            .hset_nx(
                "tally:bucket:ABAN",
                "epoch",
                epoch.unwrap_or_else(|| "0".to_owned()),
            )
            .await
            .unwrap();
        id
    }

    /// place_orders.lua closing the bucket into a batch with its settle job.
    async fn close_batch(&mut self) -> String {
        let batch = Uuid::now_v7().to_string();
        let at = now_ms().to_string();
        let orders: Vec<String> = self
            .conn
            .lrange("tally:bucket:ABAN:orders", 0, -1)
            .await
            .unwrap();
        let bucket: BTreeMap<String, String> =
            self.conn.hgetall("tally:bucket:ABAN").await.unwrap();
        let _: () = self.conn.del("tally:bucket:ABAN:orders").await.unwrap();
        let _: () = self
            .conn
            .rpush(format!("tally:batch:{batch}:orders"), &orders)
            .await
            .unwrap();
        let epoch = bucket["epoch"].clone();
        let _: () = self
            .conn
            .hset_multiple(
                format!("tally:batch:{batch}"),
                &[
                    ("id", batch.clone()),
                    ("symbol", "ABAN".to_owned()),
                    ("quantity", bucket["quantity"].clone()),
                    ("value", bucket["value"].clone()),
                    ("order_count", bucket["count"].clone()),
                    ("epoch", epoch.clone()),
                    ("status", "settling".to_owned()),
                    ("attempts", "0".to_owned()),
                    ("created_at", at.clone()),
                ],
            )
            .await
            .unwrap();
        let _: () = self
            .conn
            .hset("tally:bucket:ABAN:batches", &epoch, &batch)
            .await
            .unwrap();
        let next_epoch = (epoch.parse::<i64>().unwrap() + 1).to_string();
        let _: () = self
            .conn
            .hset_multiple(
                "tally:bucket:ABAN",
                &[
                    ("value", "0"),
                    ("quantity", "0"),
                    ("count", "0"),
                    ("epoch", &next_epoch),
                ],
            )
            .await
            .unwrap();
        let _: () = self.conn.zadd("tally:batches", &batch, &at).await.unwrap();
        let units: i64 = bucket["quantity"].parse().unwrap();
        let _: String = self
            .conn
            .xadd(
                "tally:settle",
                "*",
                &[
                    ("batch_id", batch.clone()),
                    ("symbol", "ABAN".to_owned()),
                    (
                        "quantity",
                        format!("{}.{:08}", units / ABAN_UNITS, units % ABAN_UNITS),
                    ),
                    ("quantity_units", units.to_string()),
                    ("value_cents", bucket["value"].clone()),
                    ("order_count", bucket["count"].clone()),
                    ("orders", orders.join(",")),
                    ("created_at", at),
                ],
            )
            .await
            .unwrap();
        batch
    }

    /// A settlement worker's read, begin_attempts.lua and finish_batches.lua.
    async fn settle(&mut self, batch: &str) {
        let jobs = self.read_group("tally:settle", "settlers").await;
        let key = format!("tally:batch:{batch}");
        let _: () = self
            .conn
            .hset(&key, "attempt_token", "token-1")
            .await
            .unwrap();
        let _: i64 = self.conn.hincr(&key, "attempts", 1).await.unwrap();
        let value: i64 = self.conn.hget(&key, "value").await.unwrap();
        self.moved("settlement", "@exchange", "@bank", value, batch)
            .await;
        let _: () = self
            .conn
            .hset_multiple(
                &key,
                &[
                    ("status", "settled"),
                    ("fill_id", "fill-1"),
                    ("settled_at", &now_ms().to_string()),
                    ("last_error", ""),
                    ("settled_job", &jobs[0]),
                ],
            )
            .await
            .unwrap();
        self.event(&[
            ("type", "batch.settled".to_owned()),
            ("ref", batch.to_owned()),
            ("amount", value.to_string()),
            ("at", now_ms().to_string()),
        ])
        .await;
        let _: i64 = self
            .conn
            .hincr("tally:stats", "batches_settled", 1)
            .await
            .unwrap();
        self.ack("tally:settle", "settlers", &jobs).await;
    }

    /// enqueue_wallet_transaction.lua, then a worker's apply and release:
    /// a completed deposit from @bank.
    async fn deposit(&mut self, account: &str, cents: i64) -> String {
        let id = Uuid::now_v7().to_string();
        let key = format!("tally:wallet:transaction:{id}");
        let accepted: i64 = self
            .conn
            .hincr(format!("tally:account:{account}"), "wallet_accepted", 1)
            .await
            .unwrap();
        let _: () = self
            .conn
            .hset_multiple(
                &key,
                &[
                    ("id", id.clone()),
                    ("account_id", account.to_owned()),
                    ("kind", "deposit".to_owned()),
                    ("amount", cents.to_string()),
                    ("description", "salary".to_owned()),
                    ("merchant", String::new()),
                    ("status", "queued".to_owned()),
                    ("created_at", now_ms().to_string()),
                    ("accepted_seq", accepted.to_string()),
                ],
            )
            .await
            .unwrap();
        let queue = format!("tally:wallet:queue:{account}");
        let scheduled = format!("tally:wallet:scheduled:{account}");
        let _: () = self.conn.rpush(&queue, &id).await.unwrap();
        let _: () = self
            .conn
            .zadd(format!("tally:wallet:history:{account}"), &id, 0)
            .await
            .unwrap();
        let _: () = self.conn.set(&scheduled, "1").await.unwrap();
        let _: String = self
            .conn
            .xadd("tally:wallet", "*", &[("account_id", account)])
            .await
            .unwrap();

        let jobs = self.read_group("tally:wallet", "wallet").await;
        let _: Option<String> = self.conn.lpop(&queue, None).await.unwrap();
        self.moved("deposit", "@bank", account, cents, &id).await;
        let applied: i64 = self
            .conn
            .hincr(format!("tally:account:{account}"), "wallet_applied", 1)
            .await
            .unwrap();
        let _: () = self
            .conn
            .hset_multiple(
                &key,
                &[
                    ("status", "completed".to_owned()),
                    ("reason", String::new()),
                    ("applied_at", now_ms().to_string()),
                    ("applied_seq", applied.to_string()),
                    ("worker", "old-worker".to_owned()),
                ],
            )
            .await
            .unwrap();
        self.event(&[
            ("type", "deposit.completed".to_owned()),
            ("ref", id.clone()),
            ("account_id", account.to_owned()),
            ("amount", cents.to_string()),
            ("at", now_ms().to_string()),
        ])
        .await;
        self.ack("tally:wallet", "wallet", &jobs).await;
        let _: () = self.conn.del(&scheduled).await.unwrap();
        id
    }

    /// create_advance.lua (12 installments), then the scheduler's lease and
    /// a collector's collect_installment.lua for each: fully repaid.
    async fn repaid_advance(&mut self, account: &str, cents: i64) -> String {
        const INSTALLMENTS: i64 = 12;
        const PERIOD_MS: i64 = 7 * 24 * 60 * 60 * 1000;
        let id = Uuid::now_v7().to_string();
        let key = format!("tally:advance:{id}");
        let now = now_ms();
        let _: () = self
            .conn
            .hset_multiple(
                &key,
                &[
                    ("id", id.clone()),
                    ("account_id", account.to_owned()),
                    ("amount", cents.to_string()),
                    ("count", INSTALLMENTS.to_string()),
                    ("period_ms", PERIOD_MS.to_string()),
                    ("created_at", now.to_string()),
                    ("paid", "0".to_owned()),
                ],
            )
            .await
            .unwrap();
        let base = cents / INSTALLMENTS;
        let share = |n: i64| {
            if n == INSTALLMENTS {
                cents - base * (INSTALLMENTS - 1)
            } else {
                base
            }
        };
        for n in 1..=INSTALLMENTS {
            let due = now + n * PERIOD_MS;
            let _: () = self
                .conn
                .hset_multiple(
                    &key,
                    &[
                        (format!("i{n}:amount"), share(n).to_string()),
                        (format!("i{n}:due"), due.to_string()),
                        (format!("i{n}:status"), "scheduled".to_owned()),
                    ],
                )
                .await
                .unwrap();
            let _: () = self
                .conn
                .zadd("tally:installments:due", format!("{id}:{n}"), due)
                .await
                .unwrap();
        }
        self.moved("advance", "@bank", account, cents, &id).await;
        let _: () = self.conn.zadd("tally:advances", &id, now).await.unwrap();
        let _: () = self
            .conn
            .zadd(format!("tally:account:{account}:advances"), &id, now)
            .await
            .unwrap();
        self.event(&[
            ("type", "advance.created".to_owned()),
            ("ref", id.clone()),
            ("account_id", account.to_owned()),
            ("amount", cents.to_string()),
            ("at", now.to_string()),
        ])
        .await;
        for n in 1..=INSTALLMENTS {
            let member = format!("{id}:{n}");
            // lease_due_installments.lua, then collect_installment.lua.
            let _: () = self
                .conn
                .zrem("tally:installments:due", &member)
                .await
                .unwrap();
            let _: () = self
                .conn
                .zadd("tally:installments:leased", &member, now_ms() + 30_000)
                .await
                .unwrap();
            let _: String = self
                .conn
                .xadd("tally:installments", "*", &[("installment", &member)])
                .await
                .unwrap();
            let jobs = self.read_group("tally:installments", "collectors").await;
            let _: () = self
                .conn
                .zrem("tally:installments:leased", &member)
                .await
                .unwrap();
            self.ack("tally:installments", "collectors", &jobs).await;
            self.moved("installment", account, "@bank", share(n), &member)
                .await;
            let _: () = self
                .conn
                .hset_multiple(
                    &key,
                    &[
                        (format!("i{n}:status"), "paid".to_owned()),
                        (format!("i{n}:paid_at"), now_ms().to_string()),
                    ],
                )
                .await
                .unwrap();
            let _: i64 = self.conn.hincr(&key, "paid", share(n)).await.unwrap();
            self.event(&[
                ("type", "installment.paid".to_owned()),
                ("ref", member),
                ("account_id", account.to_owned()),
                ("amount", share(n).to_string()),
                ("at", now_ms().to_string()),
            ])
            .await;
        }
        id
    }

    /// create_api_key.lua: a key whose plaintext the test keeps.
    async fn api_key(&mut self, role: Role) -> GeneratedKey {
        let generated = GeneratedKey::new(role, &Pepper::new(TEST_PEPPER).unwrap());
        let at = now_ms().to_string();
        let _: () = self
            .conn
            .hset_multiple(
                format!("tally:api_key:{}", generated.id),
                &[
                    ("id", generated.id.as_str()),
                    ("role", role.as_str()),
                    ("account", ""),
                    ("secret_hash", &generated.secret_hash),
                    ("created_at", &at),
                    ("expires_at", "0"),
                    ("revoked_at", "0"),
                    ("label", "old"),
                    ("reads_per_s", "0"),
                    ("writes_per_s", "0"),
                ],
            )
            .await
            .unwrap();
        let _: () = self
            .conn
            .zadd("tally:api_keys", generated.id.as_str(), &at)
            .await
            .unwrap();
        generated
    }

    /// A consumer group's read of every new entry (made at 0 if new).
    async fn read_group(&mut self, stream: &str, group: &str) -> Vec<String> {
        let _: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("old-worker")
            .arg("COUNT")
            .arg(1_000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .unwrap();
        reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .map(|entry| entry.id)
            .collect()
    }

    async fn ack(&mut self, stream: &str, group: &str, ids: &[String]) {
        let _: i64 = self.conn.xack(stream, group, ids).await.unwrap();
    }

    /// The notifier's read and acknowledgement of every event so far.
    async fn deliver_events(&mut self) {
        let events = self.read_group("tally:events", "notifiers").await;
        self.ack("tally:events", "notifiers", &events).await;
    }

    /// The smallest dataset the refusals start from: the system accounts
    /// and one customer with an opening balance, every event delivered.
    async fn with_a_customer(redis: &RedisServer) -> (Old, String) {
        let mut old = Old::connect(redis).await;
        old.system_accounts().await;
        let customer = old.open_account("customer", 10_000, None).await;
        old.deliver_events().await;
        (old, customer)
    }
}

fn scoped(key: &GeneratedKey, client_key: &str) -> IdempotencyKey {
    IdempotencyKey::parse(client_key)
        .unwrap()
        .scoped(key.id.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_single_node_dataset_moves_to_the_shards_and_is_served_as_it_was() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let mut old = Old::connect(&redis).await;
    old.system_accounts().await;
    let key = old.api_key(Role::Admin).await;
    let alice = old
        .open_account("alice", 5_000, Some(scoped(&key, "open-alice")))
        .await;
    let bob = old.open_account("bob", 2_200, None).await;
    let carol = old.open_account("carol", 900, None).await;
    let mut orders = vec![
        old.place_order(&alice, Some(scoped(&key, "order-alice")))
            .await,
    ];
    for customer in [&bob, &carol] {
        orders.push(old.place_order(customer, None).await);
    }
    let batch = old.close_batch().await;
    old.settle(&batch).await;
    let transfer = old
        .transfer(&alice, &bob, 1_500, scoped(&key, "transfer-1"))
        .await;
    let deposit = old.deposit(&carol, 2_500).await;
    let advance = old.repaid_advance(&bob, 1_000).await;
    old.deliver_events().await;
    // Transient state, and a note of `tally dev`'s that stays as it is.
    let rate_limit = format!("tally:rate_limit:{}:reads", key.id);
    let _: () = old.conn.set_ex(&rate_limit, "1", 60).await.unwrap();
    let _: () = old
        .conn
        .set("tally:dev:demo_account", &alice)
        .await
        .unwrap();
    let _: () = old.conn.set("tally:api_keys:epoch", 2).await.unwrap();

    let output = migrate(&redis.url());
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("balances sum to 0.00"), "{said}");
    assert!(said.contains("audit clean"), "{said}");

    // Nothing of the old layout is left, and nothing was lost on the way.
    let keys = Keys::new(SHARDS);
    let all: Vec<String> = old.conn.keys("*").await.unwrap();
    let left: Vec<&String> = all
        .iter()
        .filter(|name| !name.contains('{'))
        .filter(|name| !matches!(name.as_str(), "tally:shards" | "tally:dev:demo_account"))
        .collect();
    assert!(left.is_empty(), "old keys left: {left:?}");
    let stamped: String = old.conn.get("tally:shards").await.unwrap();
    assert_eq!(stamped, SHARDS.to_string());
    let alice_id = AccountId::parse(&alice).unwrap();
    let record = keys.idempotency(
        keys.account_shard(&alice_id),
        "transfer",
        scoped(&key, "transfer-1").as_str(),
    );
    let ttl_ms: i64 = old.conn.pttl(&record).await.unwrap();
    assert!(
        (1..=(TTL_SECS as i64) * 1_000).contains(&ttl_ms),
        "{record} keeps its ttl: {ttl_ms}"
    );
    let groups: redis::streams::StreamInfoGroupsReply = old
        .conn
        .xinfo_groups(keys.settle(keys.layout().first()))
        .await
        .unwrap();
    assert_eq!(groups.groups.len(), 1);
    assert_eq!(
        (groups.groups[0].name.as_str(), groups.groups[0].pending),
        ("settlers", 0)
    );

    let app = spawn_app_on(redis, |_| {}).await;
    for (account, balance) in [
        (&alice, "31.00"),
        (&bob, "33.00"),
        (&carol, "30.00"),
        (&"@bank".to_owned(), "-94.00"),
        (&"@exchange".to_owned(), "0.00"),
        (&"@card".to_owned(), "0.00"),
    ] {
        assert_eq!(app.balance(account).await, balance, "{account}");
    }
    let order = app.get_json(&format!("/api/v1/orders/{}", orders[0])).await;
    assert_eq!(
        (order["status"].as_str(), order["batch_id"].as_str()),
        (Some("settled"), Some(batch.as_str()))
    );
    let settled = app.get_json(&format!("/api/v1/batches/{batch}")).await;
    assert_eq!(settled["status"], "settled");
    assert_eq!(settled["order_ids"], json!(orders));
    let applied = app
        .get_json(&format!("/api/v1/accounts/{carol}/transactions/{deposit}"))
        .await;
    assert_eq!(
        (applied["status"].as_str(), applied["amount"].as_str()),
        (Some("completed"), Some("25.00"))
    );
    let repaid = app.get_json(&format!("/api/v1/advances/{advance}")).await;
    assert_eq!(repaid["paid"], "10.00");
    assert_eq!(repaid["reconciled"], true);
    let installments = repaid["installments"].as_array().unwrap();
    assert_eq!(installments.len(), 12);
    assert!(installments.iter().all(|i| i["status"] == "paid"));
    assert_eq!(
        installments[11]["amount"], "0.87",
        "the remainder on the last"
    );

    // The report: 3 openings, 3 orders, a settlement, a transfer, a deposit,
    // an advance and its 12 installments.
    let report = app.get_json("/api/v1/transactions?limit=100").await;
    assert_eq!(report["total_count"], 22, "{report}");
    let moved = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["reference"] == transfer.as_str())
        .expect("the transfer is in the report");
    assert_eq!(
        (moved["kind"].as_str(), moved["amount"].as_str()),
        (Some("transfer"), Some("15.00"))
    );
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);

    // The old key still works, and its Idempotency-Keys replay what they made.
    let client = app.client_with(&key.plaintext);
    let replay = |path: &'static str, idempotency_key: &'static str, body: Value| {
        let client = client.clone();
        let url = app.url(path);
        async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", idempotency_key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201, "{path}");
            let replayed = response.headers().get("Idempotent-Replayed").cloned();
            assert_eq!(replayed.unwrap(), "true", "{path}");
            response.json::<Value>().await.unwrap()
        }
    };
    let body = json!({"src_account_id": alice, "dst_account_id": bob, "amount": "15.00", "direction": "debit"});
    let answered = replay("/api/v1/transfers", "transfer-1", body).await;
    assert_eq!(answered["transaction_id"], transfer.as_str());
    let answered = replay(
        "/api/v1/accounts",
        "open-alice",
        json!({"name": "alice", "balance": "50.00"}),
    )
    .await;
    assert_eq!(answered["id"], alice.as_str());
    let body = json!({"account_id": alice, "symbol": "ABAN", "quantity": "1"});
    let answered = replay("/api/v1/orders", "order-alice", body).await;
    assert_eq!(answered["id"], orders[0].as_str());
    assert_eq!(app.balance(&alice).await, "31.00", "replays move nothing");

    // The bucket carried on from its epoch: a new batch, the old one kept.
    let response = app.place_order(&carol, "ABAN", "3").await;
    assert_eq!(response.status(), 201);
    let placed: Value = response.json().await.unwrap();
    assert_eq!(placed["status"], "settling");
    assert_ne!(placed["batch_id"], batch.as_str());
    let order = app.get_json(&format!("/api/v1/orders/{}", orders[2])).await;
    assert_eq!(order["batch_id"], batch.as_str());
    let audit = tally::audit::run(&app.store).await.unwrap();
    assert!(audit.is_clean(), "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_cut_short_finishes_when_run_again() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let (mut old, customer) = Old::with_a_customer(&redis).await;
    let other = old.open_account("other", 3_000, None).await;
    old.deliver_events().await;
    // What a run that crashed part way leaves: its mark, some keys moved,
    // an index half split (its members added, the old one not yet deleted).
    let keys = Keys::new(SHARDS);
    let first = keys.layout().first();
    let other_id = AccountId::parse(&other).unwrap();
    let _: () = old.conn.set("tally:migration", SHARDS).await.unwrap();
    let _: () = old
        .conn
        .rename("tally:journal", keys.journal(first))
        .await
        .unwrap();
    let _: () = old
        .conn
        .rename(format!("tally:account:{other}"), keys.account(&other_id))
        .await
        .unwrap();
    let _: () = old
        .conn
        .rename(
            "tally:account:@exchange",
            keys.system_account(SystemAccount::Exchange, first),
        )
        .await
        .unwrap();
    let _: () = old
        .conn
        .zadd(keys.accounts(keys.account_shard(&other_id)), &other, 0)
        .await
        .unwrap();

    let output = migrate(&redis.url());
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("resuming"), "{said}");
    assert!(said.contains("audit clean"), "{said}");
    let output = migrate(&redis.url());
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("nothing to migrate"), "{said}");

    let app = spawn_app_on(redis, |_| {}).await;
    assert_eq!(app.balance(&customer).await, "100.00");
    assert_eq!(app.balance(&other).await, "30.00");
    assert_eq!(app.balance("@bank").await, "-130.00");
    let listed = app.get_json("/api/v1/accounts?limit=10").await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
}

/// Runs `tally migrate` on a dataset that must be refused: it exits
/// non-zero, says `expected`, and writes nothing.
async fn assert_refused(redis: &RedisServer, old: &mut Old, expected: &[&str]) {
    let before = redis_snapshot(&mut old.conn).await;
    let output = migrate(&redis.url());
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    for part in expected {
        assert!(said.contains(part), "`{part}` in {said}");
    }
    assert_eq!(
        redis_snapshot(&mut old.conn).await,
        before,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_holding_orders_is_refused_with_the_way_and_nothing_is_written() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let (mut old, customer) = Old::with_a_customer(&redis).await;
    old.place_order(&customer, None).await;
    old.deliver_events().await;
    assert_refused(
        &redis,
        &mut old,
        &[
            "the ABAN bucket holds 1 order(s)",
            "stop the API",
            "advances still being repaid cannot be migrated",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_is_refused_and_nothing_is_written() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let (mut old, customer) = Old::with_a_customer(&redis).await;
    for _ in 0..3 {
        old.place_order(&customer, None).await;
    }
    let batch = old.close_batch().await;
    // dead_letter_batch.lua: the job to the dead letters, acknowledged; the
    // batch failed, for an operator to retry or refund.
    let jobs = old.read_group("tally:settle", "settlers").await;
    let _: String = old
        .conn
        .xadd("tally:settle:dead", "*", &[("batch_id", &batch)])
        .await
        .unwrap();
    old.ack("tally:settle", "settlers", &jobs).await;
    let _: () = old
        .conn
        .hset(format!("tally:batch:{batch}"), "status", "failed")
        .await
        .unwrap();
    let _: () = old
        .conn
        .zadd("tally:batches:failed", &batch, now_ms())
        .await
        .unwrap();
    old.deliver_events().await;
    assert_refused(
        &redis,
        &mut old,
        &[&format!("batch {batch} is failed"), "tally batches refund"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_tally_does_not_write_is_refused_and_nothing_is_written() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let (mut old, _) = Old::with_a_customer(&redis).await;
    let _: () = old.conn.set("tally:mystery", "1").await.unwrap();
    let _: () = old.conn.set("another:app", "1").await.unwrap();
    assert_refused(
        &redis,
        &mut old,
        &["tally:mystery", "never leaves data behind"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn data_of_both_layouts_is_refused_and_nothing_is_written() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let (mut old, _) = Old::with_a_customer(&redis).await;
    let keys = Keys::new(SHARDS);
    let journal = keys.journal(keys.layout().first());
    let _: String = old
        .conn
        .xadd(&journal, "*", &[("kind", "x")])
        .await
        .unwrap();
    assert_refused(
        &redis,
        &mut old,
        &["already holds data of the sharded layout", &journal],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tally::redis_server::RedisCluster::start(3, 0, dir.path())
        .await
        .unwrap();
    let output = migrate(&cluster.masters()[0].url());
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("cluster_enabled:1"), "{said}");
}

/// The way from one node to a cluster, as README gives it: the sharded
/// layout's keys are the same on both, so `redis-cli --cluster import
/// --cluster-copy` copies a standalone dataset (stream ids, consumer groups
/// and pending entries kept by `MIGRATE`) onto a fresh cluster, each key to
/// its shard's master. Afterwards the cluster serves it as the node did: the
/// same balances and report, a clean audit, and the bucket left waiting below
/// the minimum closes with the next order (now the order saga) and settles.
#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_dataset_moves_onto_a_cluster_with_redis_cli_import() {
    use crate::helpers::{
        TestRedis, eventually, spawn_app_on_node, spawn_app_on_redis, spawn_exchange,
        spawn_workers, test_worker_settings,
    };
    let node = spawn_app_on_node(|_| {}).await;
    let exchange = spawn_exchange(Default::default()).await;
    let workers = spawn_workers(&node, test_worker_settings(&exchange));
    let a = node.create_account("a", "50.00").await;
    let b = node.create_account_off("b", "20.00", &[&a]).await;
    let batch = node.place_batch(&a, "3").await;
    eventually("the batch settles", || async {
        node.batch_status(&batch).await == "settled"
    })
    .await;
    assert_eq!(node.place_order(&b, "ABAN", "1").await.status(), 201);
    let transfer = json!({"src_account_id": a, "dst_account_id": b, "amount": "5.00",
        "direction": "debit"});
    assert_eq!(
        node.post("/api/v1/transfers", &transfer).await.status(),
        201
    );
    workers.stop().await;
    let before = (
        report_page(&node).await,
        node.balance(&a).await,
        node.balance(&b).await,
    );

    let dir = tempfile::tempdir().unwrap();
    let cluster = tally::redis_server::RedisCluster::start(3, 0, dir.path())
        .await
        .unwrap();
    let node_address = node.redis.url().replace("redis://", "");
    let cluster_address = cluster.masters()[0].url().replace("redis://", "");
    let imported = std::process::Command::new("redis-cli")
        .args(["--cluster", "import", &cluster_address])
        .args(["--cluster-from", &node_address, "--cluster-copy"])
        .output()
        .unwrap();
    assert!(imported.status.success(), "{}", text(&imported));
    drop(node);

    let app = spawn_app_on_redis(TestRedis::Cluster(cluster), |_| {}).await;
    let after = (
        report_page(&app).await,
        app.balance(&a).await,
        app.balance(&b).await,
    );
    assert_eq!(after, before, "the same ledger");
    let audit = tally::audit::run(&app.store).await.unwrap();
    assert!(audit.is_clean(), "{audit}");

    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let closing = app.place_batch(&b, "2").await;
    eventually("the imported bucket's batch settles", || async {
        app.batch_status(&closing).await == "settled"
    })
    .await;
    let calls = exchange.orders().await;
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|call| call.quantity == "3"), "{calls:?}");
    assert_eq!(app.balance(&b).await, "13.00", "20.00 - 4.00 + 5.00 - 8.00");
    let audit = tally::audit::run(&app.store).await.unwrap();
    assert!(audit.is_clean(), "{audit}");
    workers.stop().await;
}

/// The report's first page, without its `as_of` moment.
async fn report_page(app: &crate::helpers::TestApp) -> Value {
    let mut page = app.get_json("/api/v1/transactions?limit=100").await;
    page.as_object_mut().unwrap().remove("as_of");
    page
}
