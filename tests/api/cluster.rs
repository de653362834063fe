//! Redis Cluster, the ground the sharded layout stands on (issue 17, first
//! step): a real 3-master, 3-replica cluster on loopback agrees with
//! `store::slots` on every slot, and spreads the 16 shards' tags evenly over
//! its masters.

use std::collections::BTreeMap;

use tally::redis_server::RedisCluster;
use tally::store::slots::{ShardLayout, hash_slot};

/// Each master's slot ranges, by its port, from `CLUSTER SLOTS`.
pub(crate) async fn slot_owners(
    conn: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<u16, Vec<(u16, u16)>> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .unwrap();
    let mut owners: BTreeMap<u16, Vec<(u16, u16)>> = BTreeMap::new();
    for range in slots {
        let redis::Value::Array(range) = range else {
            panic!("a slot range is an array: {range:?}")
        };
        let low: u16 = redis::from_redis_value(range[0].clone()).unwrap();
        let high: u16 = redis::from_redis_value(range[1].clone()).unwrap();
        let redis::Value::Array(master) = &range[2] else {
            panic!("a master is an array")
        };
        let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
        owners.entry(port).or_default().push((low, high));
    }
    owners
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_cluster_agrees_on_every_slot_and_holds_the_shards_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start(3, 1, dir.path()).await.unwrap();
    let first = &cluster.masters()[0];
    let mut conn = redis::Client::open(first.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // Our slots are Redis's: for tagged, untagged and odd keys alike.
    let layout = ShardLayout::new(16);
    let mut keys: Vec<String> = layout
        .shards()
        .map(|shard| format!("tally:{{{}}}:account:x", layout.tag(shard)))
        .collect();
    keys.extend(
        (0..200).map(|n| format!("tally:order:{}", uuid::Uuid::now_v7()) + &"x".repeat(n % 7)),
    );
    keys.extend(["", "{}", "{}{a}", "a{", "}{b}", "{{c}}", "é{ß}"].map(String::from));
    for key in &keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, hash_slot(key.as_bytes()), "{key:?}");
    }

    // Three masters made by `--cluster create` hold 5, 5 and 6 of the 16
    // shards: no slot placed by hand.
    let owners = slot_owners(&mut conn).await;
    assert_eq!(owners.len(), 3, "{owners:?}");
    let mut held: Vec<usize> = owners
        .values()
        .map(|ranges| {
            layout
                .shards()
                .filter(|&shard| {
                    let slot = hash_slot(format!("{{{}}}", layout.tag(shard)).as_bytes());
                    ranges
                        .iter()
                        .any(|&(low, high)| (low..=high).contains(&slot))
                })
                .count()
        })
        .collect();
    held.sort();
    assert_eq!(held, vec![5, 5, 6], "{owners:?}");

    // And a script over two shards is refused, as every script that crosses
    // shards is today: what the sagas of the next steps are for.
    let crossing: Result<redis::Value, _> = redis::cmd("EVAL")
        .arg("return 1")
        .arg(2)
        .arg(format!(
            "{{{}}}:a",
            layout.tag(layout.shards().next().unwrap())
        ))
        .arg(format!(
            "{{{}}}:b",
            layout.tag(layout.shards().nth(1).unwrap())
        ))
        .query_async(&mut conn)
        .await;
    let err = crossing.expect_err("two slots in one script");
    assert!(
        err.to_string().to_uppercase().contains("CROSSSLOT"),
        "{err}"
    );
}

/// Every script in `lua/` by the SHA1 Redis knows it by (`lib.lua` comes
/// first in each, as `lua_script!` builds them).
fn scripts_by_sha() -> BTreeMap<String, String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua");
    let lib = std::fs::read_to_string(format!("{dir}/lib.lua")).unwrap();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".lua") && name != "lib.lua")
        .map(|name| {
            let body = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            let sha = redis::Script::new(&format!("{lib}{body}"))
                .get_hash()
                .to_owned();
            (sha, name)
        })
        .collect()
}

/// Scripts whose keys span several slots with the sagas on, so that a
/// cluster would refuse them (`CROSSSLOT`): none of the 34, down from 20
/// before the sharded key layout. The three that moved money between two
/// shards in one step (an order, a transfer, a refund) run as sagas there.
const CROSSING_TODAY: [&str; 0] = [];

/// Scripts the scenario below does not reach: with the sagas on, the
/// one-script placement and refund over several shards, which only a
/// standalone Redis runs.
const NOT_REACHED: [&str; 2] = ["place_orders.lua", "refund_batch.lua"];

/// Runs every kind of operation through the API and the workers with every
/// script call's keys recorded, then says which scripts a cluster would
/// refuse: the measure of how far the layout is from Redis Cluster.
#[tokio::test(flavor = "multi_thread")]
async fn which_scripts_name_keys_of_several_slots() {
    use std::sync::Arc;
    use tally::exchange::sim::Faults;

    use crate::helpers::{
        eventually, spawn_app_with_sagas, spawn_exchange, spawn_workers, test_worker_settings,
    };

    // As a cluster runs it: every operation over two shards as a saga.
    let app = spawn_app_with_sagas().await;
    let recorder = Arc::new(tally::store::slots::SlotRecorder::default());
    app.store.record_script_slots(recorder.clone());
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));

    // Keys: made, used cold (authenticated, rate-limited), revoked.
    let made: serde_json::Value = app
        .post("/api/v1/keys", &serde_json::json!({"role": "read"}))
        .await
        .json()
        .await
        .unwrap();
    let reader = app.client_with(made["key"].as_str().unwrap());
    let prices = reader.get(app.url("/api/v1/prices")).send().await.unwrap();
    assert_eq!(prices.status(), 200);
    let revoked = app
        .client
        .delete(app.url(&format!("/api/v1/keys/{}", made["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);

    // Money: accounts, a settled batch, transfers, a wallet transaction. The
    // payer is on another shard than ABAN's home and than the payee, as most
    // customers are: otherwise her orders, refunds and transfers would stay
    // on one shard, and the count below would be chance.
    let a = loop {
        let a = app.create_account("a", "1000.00").await;
        if app.shard_of(&a) != crate::helpers::aban_home() {
            break a;
        }
    };
    let b = app.create_account_off("b", "0", &[&a]).await;
    let settled = app.place_batch(&a, "3").await;
    eventually("the batch settled", || async {
        app.batch_status(&settled).await == "settled"
    })
    .await;
    let transfer = serde_json::json!({"src_account_id": a, "dst_account_id": b, "amount": "5.00", "direction": "debit"});
    assert_eq!(app.post("/api/v1/transfers", &transfer).await.status(), 201);
    // A bank transaction: one script on the customer's shard.
    let bank = serde_json::json!({"account_id": b, "amount": "1.00", "direction": "credit", "reason": "salary"});
    assert_eq!(
        app.post("/api/v1/bank-transactions", &bank).await.status(),
        201
    );
    let deposit = serde_json::json!({"kind": "deposit", "amount": "1.00"});
    let accepted: serde_json::Value = app
        .post(&format!("/api/v1/accounts/{a}/transactions"), &deposit)
        .await
        .json()
        .await
        .unwrap();
    let txn = format!(
        "/api/v1/accounts/{a}/transactions/{}",
        accepted["id"].as_str().unwrap()
    );
    eventually("the deposit is applied", || async {
        app.get_json(&txn).await["status"] == "completed"
    })
    .await;

    // An advance, repaid installment by installment (retention takes it
    // below).
    let advance = crate::advances::create_advance(&app, &b, "120.00").await;
    let advance = advance["id"].as_str().unwrap();
    let clock = tally::advances::ManualClock::starting_at(tally::store::now_ms());
    for n in 1..=12 {
        crate::advances::step(&app, &clock, crate::advances::WEEK, advance, n).await;
    }

    // A batch the exchange keeps failing: retried with backoff, then
    // dead-lettered; retried by an operator, failed again, refunded.
    exchange
        .set_faults(Faults {
            fail_rate: 1.0,
            ..Faults::default()
        })
        .await;
    let failed = app.place_batch(&a, "3").await;
    eventually("the batch failed", || async {
        app.batch_status(&failed).await == "failed"
    })
    .await;
    let retry = format!("/api/v1/batches/{failed}/retry");
    assert_eq!(
        app.client
            .post(app.url(&retry))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    eventually("the batch failed again", || async {
        app.batch_status(&failed).await == "failed"
    })
    .await;
    let refund = format!("/api/v1/batches/{failed}/refund");
    assert_eq!(
        app.post(&refund, &serde_json::json!({})).await.status(),
        200
    );

    // An operator discards a dead accounting event.
    let shard = app.shard_of(&a);
    let dead: String = redis::AsyncCommands::xadd(
        &mut app.store.conn().await.unwrap(),
        app.keys().events_dead(shard),
        "*",
        &[
            ("event", r#"{"type":"account.opened"}"#),
            ("error", "webhook down"),
        ],
    )
    .await
    .unwrap();
    tally::store::dead_letters::resolve(
        &mut app.store.conn().await.unwrap(),
        app.keys(),
        tally::store::keys::StreamKind::Events,
        shard,
        tally::store::streams::StreamId::parse(&dead).unwrap(),
        tally::store::dead_letters::Resolution::Discard,
    )
    .await
    .unwrap();

    // Reading: the report, the audit; and the journal's trim.
    assert_eq!(app.get("/api/v1/transactions?limit=5").await.status(), 200);
    assert_eq!(app.get("/api/v1/audit").await.status(), 200);
    // Every entry so far: the trim takes them off the customers' lists too.
    let everything = u64::try_from(tally::store::now_ms()).unwrap() + 1_000;
    for shard in app.keys().shards() {
        tally::retention::archive_journal(&app.store, &app.archive(), shard, everything, 1)
            .await
            .unwrap();
    }
    assert_eq!(app.assert_account_lists().await, 0, "every list emptied");
    workers.stop().await;
    // And every batch that finished, with its orders, as retention takes them.
    let mut retired = 0;
    for shard in app.keys().shards() {
        retired += tally::retention::retire_batches(
            &app.store,
            &app.archive(),
            shard,
            tally::store::now_ms() + 1_000,
            100,
        )
        .await
        .unwrap();
    }
    assert!(retired > 0, "the scenario settles batches");
    for kind in tally::store::archive::FinishedKind::ALL {
        let mut retired = 0;
        for shard in app.keys().shards() {
            retired += tally::retention::retire_records(
                &app.store,
                &app.archive(),
                kind,
                shard,
                tally::store::now_ms() + 1_000,
                100,
            )
            .await
            .unwrap();
        }
        assert!(retired > 0, "the scenario finishes a {}", kind.name());
    }
    // And the resolved dead letter, as retention takes it.
    let mut archived = 0;
    for shard in app.keys().shards() {
        for stream in tally::retention::archived_streams(&app.store, shard) {
            archived += tally::retention::archive_stream(
                &app.store,
                &app.archive(),
                shard,
                &stream,
                tally::store::now_ms() + 1_000,
                1,
            )
            .await
            .unwrap();
        }
    }
    assert!(archived > 0, "the scenario resolves a dead letter");

    let names = scripts_by_sha();
    let recorded = recorder.scripts();
    let mut crossing = Vec::new();
    for (sha, slots) in &recorded {
        let name = names.get(sha).map_or(sha.as_str(), String::as_str);
        if slots.crossing > 0 {
            println!(
                "{name}: {} of {} calls cross, e.g. {:?}",
                slots.crossing, slots.calls, slots.first_crossing
            );
            crossing.push(name.to_owned());
        }
    }
    let reached: Vec<&String> = names
        .iter()
        .filter(|(sha, _)| recorded.contains_key(*sha))
        .map(|(_, name)| name)
        .collect();
    let mut not_reached: Vec<&str> = names
        .values()
        .filter(|name| !reached.contains(name))
        .map(String::as_str)
        .collect();
    not_reached.sort();
    crossing.sort();
    assert_eq!(
        not_reached, NOT_REACHED,
        "scripts the scenario did not reach"
    );
    assert_eq!(crossing, CROSSING_TODAY, "scripts whose keys span slots");
}

/// tally itself on a real 3-master cluster, through the cluster client: the
/// mission's three $4 orders from customers on three shards (the order
/// saga: debit on each customer's master, admission on ABAN's home shard)
/// make one exchange call for 3, which settles; transfers within a shard and
/// between two (the transfer saga), the report and the audit (reads over
/// every shard, pipelines split by slot) work.
#[tokio::test(flavor = "multi_thread")]
async fn the_mission_example_runs_on_a_real_cluster() {
    use crate::helpers::{
        spawn_app_on_cluster, spawn_exchange, spawn_workers, test_worker_settings,
    };
    use serde_json::{Value, json};

    let app = spawn_app_on_cluster(|_| {}).await;
    assert!(app.store.is_cluster() && app.store.sagas());
    let exchange = spawn_exchange(Default::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let a = app.create_account_off("a", "10.00", &[]).await;
    let b = app.create_account_off("b", "10.00", &[&a]).await;
    let c = app.create_account_off("c", "10.00", &[&a, &b]).await;
    let mut answers = Vec::new();
    for customer in [&a, &b, &c] {
        let response = app.place_order(customer, "ABAN", "1").await;
        assert_eq!(response.status(), 201);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert!(
        answers[..2]
            .iter()
            .all(|answer| answer["status"] == "pending")
    );
    let batch = answers[2]["batch_id"].as_str().unwrap().to_owned();
    crate::helpers::eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let calls = exchange.orders().await;
    assert_eq!(calls.len(), 1, "one exchange call");
    assert_eq!(calls[0].quantity, "3");
    assert_eq!(app.balance(&a).await, "6.00");

    // A transfer between two accounts of one shard: one script, one slot.
    let d = loop {
        let d = app.create_account("d", "0.00").await;
        if app.shard_of(&d) == app.shard_of(&a) {
            break d;
        }
    };
    let transfer =
        json!({"src_account_id": a, "dst_account_id": d, "amount": "1.50", "direction": "debit"});
    assert_eq!(app.post("/api/v1/transfers", &transfer).await.status(), 201);
    assert_eq!(app.balance(&d).await, "1.50");
    // Between two shards: the transfer saga, through @transit.
    let across =
        json!({"src_account_id": a, "dst_account_id": b, "amount": "1.00", "direction": "debit"});
    assert_eq!(app.post("/api/v1/transfers", &across).await.status(), 201);
    assert_eq!(
        (app.balance(&a).await, app.balance(&b).await),
        ("3.50".into(), "7.00".into())
    );
    assert_eq!(app.balance("@transit").await, "0.00");

    let page: Value = app
        .get("/api/v1/transactions?limit=50")
        .await
        .json()
        .await
        .unwrap();
    assert!(page["items"].as_array().unwrap().len() >= 4, "{page}");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
}
