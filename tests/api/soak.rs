//! The retention soak: a steady mix of orders, transfers and wallet
//! transactions with windows of two seconds. Run steadily, Redis memory
//! levels off; run while the worker process that archives is killed
//! (SIGKILL) at random moments and started again, every record and journal
//! entry that left Redis is in the archive exactly once. The audit is clean
//! after both.
//!
//! Bounded: `SOAK` of load, then a drain. It runs in the standalone suite
//! only (the other two runs of the suite repeat it without telling more).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tally::archive::Line;
use tally::domain::OrderId;

use crate::helpers::{TestApp, cluster_suite, spawn_app_with, spawn_exchange, test_sagas};

/// How long the load runs.
const SOAK: Duration = Duration::from_secs(20);
/// The journal's and the records' window.
const WINDOW: Duration = Duration::from_secs(2);
/// Customers the load moves money between.
const CUSTOMERS: usize = 8;

/// Redis's `used_memory` and `used_memory_dataset`, in bytes.
async fn memory(app: &TestApp) -> (i64, i64) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let field = |name: &str| -> i64 {
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO memory has {name}"))
    };
    (field("used_memory"), field("used_memory_dataset"))
}

/// A `tally worker` archiving into the app's directory, with windows of
/// [`WINDOW`] and a retention round every 200 ms.
fn archiving_worker(app: &TestApp, exchange_url: &str) -> tokio::process::Child {
    let window = format!("{}ms", WINDOW.as_millis());
    // A name of its own, as each restarted process has in production.
    let name = format!("archiver-{}", uuid::Uuid::now_v7());
    crate::helpers::worker_process_with(
        app,
        exchange_url,
        &name,
        &[
            "--journal-retention",
            &window,
            "--record-retention",
            &window,
            "--retention-interval-ms",
            "200",
            "--stream-retention-ms",
            "500",
            "--archive-lease-ms",
            "1000",
        ],
    )
}

/// What the load did: ids of the orders and wallet transactions accepted.
#[derive(Default)]
struct Done {
    orders: Vec<String>,
    wallet: Vec<String>,
    transfers: usize,
}

async fn load(app: &TestApp, customers: &[String], until: Instant) -> Done {
    let mut done = Done::default();
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    let mut n = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let customer = &customers[n % customers.len()];
        let order = app.place_order(customer, "ABAN", "1").await;
        if order.status() == 201 {
            let order: serde_json::Value = order.json().await.unwrap();
            done.orders.push(order["id"].as_str().unwrap().to_owned());
        }
        let payee = &customers[(n + 3) % customers.len()];
        let transfer = json!({"src_account_id": customer, "dst_account_id": payee, "amount": "1.00", "direction": "debit"});
        if app.post("/api/v1/transfers", &transfer).await.status() == 201 {
            done.transfers += 1;
        }
        let (kind, amount) = if n.is_multiple_of(2) {
            ("deposit", "6.00")
        } else {
            ("withdrawal", "1.00")
        };
        let wallet = app
            .post(
                &format!("/api/v1/accounts/{customer}/transactions"),
                &json!({"kind": kind, "amount": amount}),
            )
            .await;
        if wallet.status() == 202 {
            let wallet: serde_json::Value = wallet.json().await.unwrap();
            done.wallet.push(wallet["id"].as_str().unwrap().to_owned());
        }
    }
    done
}

/// Every line in the archive, from every day and shard.
fn archived(app: &TestApp) -> Vec<Line> {
    let archive = app.archive();
    let shards: Vec<_> = app.keys().shards().collect();
    let mut lines = Vec::new();
    for day in archive.days().unwrap() {
        for &shard in &shards {
            lines.extend(archive.read(&day, shard).unwrap());
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_steady_mix_redis_memory_levels_off() {
    soak(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_archiver_at_random_moments_loses_nothing_and_archives_nothing_twice() {
    soak(true).await;
}

async fn soak(kill: bool) {
    if cluster_suite() || test_sagas() != tally::config::Sagas::Auto {
        return; // the standalone run covers it
    }
    let app = spawn_app_with(|settings| {
        settings.ledger.journal_retention = WINDOW;
        settings.ledger.record_retention = WINDOW;
        settings.api.idempotency_ttl_secs = 2;
    })
    .await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults::default()).await;
    let mut customers = Vec::new();
    for i in 0..CUSTOMERS {
        customers.push(app.create_account(&format!("soak{i}"), "1000.00").await);
    }
    let mut worker = archiving_worker(&app, &exchange.url);
    let start = Instant::now();
    let until = start + SOAK;

    // Kill the archiving worker at random moments, and start it again.
    let killer = {
        let app_url = exchange.url.clone();
        let app = &app;
        async move {
            let mut kills = 0;
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            while kill && Instant::now() + Duration::from_secs(2) < until {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                tokio::time::sleep(Duration::from_millis(300 + seed % 1_700)).await;
                worker.start_kill().unwrap();
                worker.wait().await.unwrap();
                kills += 1;
                worker = archiving_worker(app, &app_url);
            }
            (worker, kills)
        }
    };
    let sampler = async {
        let mut samples = BTreeMap::new();
        while Instant::now() < until {
            samples.insert(start.elapsed().as_millis() as u64, memory(&app).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        samples
    };
    let (done, (worker, kills), samples) =
        tokio::join!(load(&app, &customers, until), killer, sampler);
    assert!(!kill || kills >= 5, "the archiver was killed {kills} times");

    // Memory levels off: over the second half it grows less than a tenth
    // of what it grew over the first (the window filling). Each point is
    // the median of the samples around it, against the allocator's noise.
    let around = |at_ms: u64| -> (i64, i64) {
        let near: Vec<&(i64, i64)> = samples
            .range(at_ms.saturating_sub(1_500)..=at_ms + 1_500)
            .map(|(_, sample)| sample)
            .collect();
        let mut used: Vec<i64> = near.iter().map(|sample| sample.0).collect();
        let mut dataset: Vec<i64> = near.iter().map(|sample| sample.1).collect();
        used.sort_unstable();
        dataset.sort_unstable();
        (used[used.len() / 2], dataset[dataset.len() / 2])
    };
    let soak_ms = SOAK.as_millis() as u64;
    let (first, middle, last) = (around(1_500), around(soak_ms / 2), around(soak_ms - 1_500));
    println!(
        "used_memory {} -> {} -> {} bytes, used_memory_dataset {} -> {} -> {}; {} orders, {} transfers, {} wallet transactions, {kills} kills",
        first.0,
        middle.0,
        last.0,
        first.1,
        middle.1,
        last.1,
        done.orders.len(),
        done.transfers,
        done.wallet.len()
    );
    let grew_first = middle.0 - first.0;
    let grew_second = last.0 - middle.0;
    assert!(
        kill || grew_second * 10 < grew_first.max(1),
        "used_memory grew {grew_first} bytes over the first half and {grew_second} over the second"
    );

    // Drain: everything settles or applies, then leaves with the window.
    let keys = app.keys().clone();
    let drained = || async {
        let mut conn = app.redis().await;
        let mut pipe = redis::pipe();
        for id in &done.orders {
            pipe.exists(keys.order(&OrderId::parse(id).unwrap()));
        }
        let present: Vec<bool> = pipe.query_async(&mut conn).await.unwrap();
        // The last orders may wait in the bucket for the minimum: in flight.
        let in_redis = present.iter().filter(|present| **present).count();
        let mut wallet = 0;
        for id in &done.wallet {
            let exists: bool = redis::cmd("EXISTS")
                .arg(keys.wallet_transaction(id))
                .query_async(&mut conn)
                .await
                .unwrap();
            wallet += usize::from(exists);
        }
        let journal = app.journal().await.len();
        in_redis < 3 && wallet == 0 && journal == 0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !drained().await {
        assert!(
            Instant::now() < deadline,
            "finished records left Redis within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(worker);

    // Every record and entry that left Redis is in the archive once.
    let lines = archived(&app);
    let mut seen = HashSet::new();
    for line in &lines {
        assert!(
            seen.insert((line.kind.clone(), line.id.clone())),
            "{} {} is in the archive twice",
            line.kind,
            line.id
        );
    }
    let archived_ids = |kind: &str| -> HashSet<&str> {
        lines
            .iter()
            .filter(|line| line.kind == kind)
            .map(|line| line.id.as_str())
            .collect()
    };
    let orders = archived_ids("order");
    let mut conn = app.redis().await;
    for id in &done.orders {
        let in_redis: bool = redis::cmd("EXISTS")
            .arg(keys.order(&OrderId::parse(id).unwrap()))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            in_redis != orders.contains(id.as_str()),
            "order {id}: in Redis {in_redis}, archived {}",
            orders.contains(id.as_str())
        );
    }
    let wallet = archived_ids("wallet_transaction");
    for id in &done.wallet {
        assert!(
            wallet.contains(id.as_str()),
            "wallet transaction {id} is not archived"
        );
    }
    // Every journal entry ever written on a shard is archived (none is left).
    for shard in keys.shards() {
        let exists: bool = redis::cmd("EXISTS")
            .arg(keys.journal(shard))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !exists {
            continue; // no entry was ever written on this shard
        }
        let info: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(keys.journal(shard))
            .query_async(&mut conn)
            .await
            .unwrap();
        let added = info
            .chunks(2)
            .find_map(|pair| match (&pair[0], &pair[1]) {
                (redis::Value::BulkString(name), redis::Value::Int(added))
                    if name == b"entries-added" =>
                {
                    Some(*added)
                }
                _ => None,
            })
            .unwrap_or(0);
        let archived = lines
            .iter()
            .filter(|line| line.kind == "journal_entry" && line.shard == shard.index())
            .count();
        assert_eq!(archived as i64, added, "shard {}'s journal", shard.index());
    }
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}
