//! Retention: the journal past its window goes to the archive, then leaves
//! Redis; each entry is archived once however a step dies, and the trim
//! script refuses, writing nothing, what it must not do.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tally::archive::{Archive, day_of_ms};
use tally::retention::archive_journal;
use tally::store::archive::FinishedKind::{Advance, WalletTransaction};
use tally::store::journal::{self, OldEntries, Trimmed};
use tally::store::now_ms;
use tally::store::slots::Shard;

use crate::helpers::{
    TestApp, assert_problem, eventually, spawn_app_with, spawn_exchange, spawn_workers,
    test_worker_settings,
};

const WINDOW: Duration = Duration::from_millis(300);

/// An app whose journal window is 300 ms, an account with `count` entries
/// (bank credits of 1.00) past it, and the cutoff that takes them.
async fn entries_past_the_window(count: usize) -> (TestApp, String, u64) {
    let app = spawn_app_with(|settings| settings.ledger.journal_retention = WINDOW).await;
    let account = app.create_account("kept", "0").await;
    for _ in 0..count {
        let credit =
            json!({"account_id": account, "amount": "1.00", "direction": "credit", "reason": "r"});
        assert_eq!(
            app.post("/api/v1/bank-transactions", &credit)
                .await
                .status(),
            201
        );
    }
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let cutoff_ms = u64::try_from(now_ms()).unwrap() - 300;
    (app, account, cutoff_ms)
}

fn archived_ids(archive: &Archive, shard: Shard) -> Vec<String> {
    archive
        .read(&day_of_ms(now_ms()), shard)
        .unwrap()
        .into_iter()
        .map(|line| line.id)
        .collect()
}

fn assert_each_once(ids: &[String], count: usize) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (count, count), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_died_after_its_append_is_archived_once_by_the_next() {
    let (app, account, cutoff_ms) = entries_past_the_window(6).await;
    let shard = app.shard_of(&account);
    let archive = app.archive();
    let mut conn = app.redis().await;

    // A step read the entries, appended them, fsynced, and died before its
    // trim (and commit): the file holds them, Redis too, nothing committed.
    let old = journal::old_entries(&mut conn, app.keys(), shard, cutoff_ms)
        .await
        .unwrap()
        .unwrap();
    let day = day_of_ms(now_ms());
    let lines: Vec<tally::archive::Line> = old
        .entries
        .iter()
        .map(|entry| tally::archive::Line {
            id: tally::retention::entry_id(&entry.id, shard),
            kind: "journal_entry".to_owned(),
            shard: shard.index(),
            archived_at: "2026-12-01T00:00:00Z".to_owned(),
            fields: entry.fields.clone().into_iter().collect(),
        })
        .collect();
    archive.set_identity("another-step").ok(); // as the dead step named it
    let _: () = redis::cmd("SET")
        .arg(app.keys().archive_identity())
        .arg("another-step")
        .query_async(&mut conn)
        .await
        .unwrap();
    archive.append(&day, shard, 0, &lines).unwrap();
    assert_each_once(&archived_ids(&archive, shard), 6);

    let trimmed = archive_journal(&app.store, &archive, shard, cutoff_ms, 10)
        .await
        .unwrap();
    assert_eq!(trimmed, 6);
    assert_each_once(&archived_ids(&archive, shard), 6);
    assert_eq!(app.journal().await.len(), 0, "gone from Redis");
    let committed: u64 = redis::cmd("HGET")
        .arg(app.keys().archive_committed(shard))
        .arg(&day)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        committed,
        std::fs::metadata(archive.path(&day, shard)).unwrap().len(),
        "the whole file is committed"
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trim_script_refuses_a_lost_lock_and_entries_it_was_not_shown() {
    let (app, account, cutoff_ms) = entries_past_the_window(3).await;
    let shard = app.shard_of(&account);
    let mut conn = app.redis().await;
    let old = journal::old_entries(&mut conn, app.keys(), shard, cutoff_ms)
        .await
        .unwrap()
        .unwrap();
    let before = app.snapshot().await;

    // No lock held: a step whose lock ran out.
    let refused = journal::trim_archived(
        &mut conn,
        app.keys(),
        shard,
        &old,
        cutoff_ms,
        "not-the-holder",
        &[("2026-12-01".to_owned(), 10)],
    )
    .await
    .unwrap();
    assert_eq!(refused, Trimmed::LostLock);
    assert_eq!(app.snapshot().await, before, "nothing written");

    // Held, but the caller read fewer entries than the range holds.
    hold_archive_lock(&mut conn, app.keys(), shard).await;
    let before = app.snapshot().await;
    let short = OldEntries {
        last: old.last.clone(),
        members: old.members - 1,
        entries: old.entries[1..].to_vec(),
    };
    let refused = journal::trim_archived(
        &mut conn,
        app.keys(),
        shard,
        &short,
        cutoff_ms,
        "holder",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(refused, Trimmed::Stale);
    assert_eq!(app.snapshot().await, before, "nothing written");

    // Under the lock, as read: trimmed, and the lengths committed.
    let done = journal::trim_archived(
        &mut conn,
        app.keys(),
        shard,
        &old,
        cutoff_ms,
        "holder",
        &[("2026-12-01".to_owned(), 10)],
    )
    .await
    .unwrap();
    assert_eq!(done, Trimmed::Entries(3));
    let committed: u64 = redis::cmd("HGET")
        .arg(app.keys().archive_committed(shard))
        .arg("2026-12-01")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(committed, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_datasets_archive_directory_is_refused_and_nothing_leaves_redis() {
    let (app, account, cutoff_ms) = entries_past_the_window(2).await;
    let shard = app.shard_of(&account);
    let elsewhere = tempfile::tempdir().unwrap();
    Archive::new(elsewhere.path())
        .set_identity("some-other-dataset")
        .unwrap();
    let err = archive_journal(
        &app.store,
        &Archive::new(elsewhere.path()),
        shard,
        cutoff_ms,
        10,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is not this dataset's"), "{err:#}");
    assert_eq!(app.journal().await.len(), 2, "nothing left Redis");

    // Its own directory works, and names the dataset: a directory with no
    // name is refused from then on (records already archived are elsewhere).
    let archive = app.archive();
    assert_eq!(
        archive_journal(&app.store, &archive, shard, cutoff_ms, 10)
            .await
            .unwrap(),
        2
    );
    let credit =
        json!({"account_id": account, "amount": "1.00", "direction": "credit", "reason": "r"});
    assert_eq!(
        app.post("/api/v1/bank-transactions", &credit)
            .await
            .status(),
        201
    );
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let cutoff_ms = u64::try_from(now_ms()).unwrap() - 300;
    let empty = tempfile::tempdir().unwrap();
    let err = archive_journal(
        &app.store,
        &Archive::new(empty.path()),
        shard,
        cutoff_ms,
        10,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is not this dataset's"), "{err:#}");
    assert_eq!(app.journal().await.len(), 1, "nothing left Redis");
}

/// `tally` with `args`, to its end, with its output.
async fn tally_output(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("tally runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn tally_archive_find_prints_an_archived_entry_and_fails_for_an_unknown_id() {
    let (app, account, cutoff_ms) = entries_past_the_window(2).await;
    let shard = app.shard_of(&account);
    let archive = app.archive();
    archive_journal(&app.store, &archive, shard, cutoff_ms, 10)
        .await
        .unwrap();
    let id = archived_ids(&archive, shard).remove(0);
    let dir = app.archive_dir.path().to_str().unwrap().to_owned();
    let found = tally_output(&["archive", "find", &id, "--dir", &dir]).await;
    assert!(found.status.success());
    let line: serde_json::Value =
        serde_json::from_slice(found.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["fields"]["credit"], account.as_str());
    assert_eq!(line["fields"]["amount"], "100");

    let missing = tally_output(&["archive", "find", "1-0", "--dir", &dir]).await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("nothing archived under 1-0"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settled_batches_leave_with_their_orders_into_the_archive_and_answer_410() {
    use tally::retention::{retire_batches, window_start};
    let window = Duration::from_secs(1);
    let app = spawn_app_with(|settings| settings.ledger.record_retention = window).await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let mut customers = Vec::new();
    let mut order_ids = Vec::new();
    for name in ["a", "b", "c"] {
        let customer = app.create_account(name, "10.00").await;
        let order: serde_json::Value = app
            .place_order(&customer, "ABAN", "1")
            .await
            .json()
            .await
            .unwrap();
        order_ids.push(order["id"].as_str().unwrap().to_owned());
        customers.push(customer);
    }
    let order: serde_json::Value = app
        .get_json(&format!("/api/v1/orders/{}", order_ids[2]))
        .await;
    let batch = order["batch_id"].as_str().unwrap().to_owned();
    eventually("the batch settles", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    workers.stop().await;
    // One still pending: in flight, it stays whatever its age.
    let pending: serde_json::Value = app
        .place_order(&customers[0], "ABAN", "1")
        .await
        .json()
        .await
        .unwrap();
    tokio::time::sleep(window + Duration::from_millis(200)).await;

    let archive = app.archive();
    let mut retired = 0;
    for shard in app.keys().shards() {
        retired += retire_batches(&app.store, &archive, shard, window_start(window), 100)
            .await
            .unwrap();
    }
    assert_eq!(retired, 1);

    // Gone from Redis, and a GET says where it went.
    for (path, id) in [
        ("orders", &order_ids[0]),
        ("orders", &order_ids[2]),
        ("batches", &batch),
    ] {
        let response = app.get(&format!("/api/v1/{path}/{id}")).await;
        let problem = assert_problem(response, 410, "is in the archive of").await;
        let day = day_of_ms(now_ms());
        assert!(
            problem["detail"].as_str().unwrap().contains(&day),
            "{problem}"
        );
    }
    let pending_id = pending["id"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/api/v1/orders/{pending_id}"))
            .await
            .status(),
        200,
        "an order in flight stays"
    );
    // Never archived: a fresh id, and an old one from a day with no archive.
    let fresh = uuid::Uuid::now_v7();
    let old = "01900000-0000-7000-8000-000000000000"; // June 2024
    for id in [fresh.to_string(), old.to_owned()] {
        let response = app.get(&format!("/api/v1/orders/{id}")).await;
        assert_problem(response, 404, "not found").await;
    }
    // The console's find says the same.
    let read_key = app.key(tally::access::Role::Read, None).await;
    let find = |id: String| {
        let request = app
            .client
            .get(app.url(&format!("/ops/find?id={id}")))
            .bearer_auth(&read_key)
            .send();
        async move {
            let response = request.await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, page) = find(order_ids[0].clone()).await;
    assert_eq!(status, 410, "{page}");
    assert!(page.contains("in the archive of"), "{page}");
    let (status, page) = find(fresh.to_string()).await;
    assert_eq!(status, 404, "{page}");

    // In the archive, each once: three orders on their shards, the batch on
    // its home shard, with its order ids.
    let mut lines = Vec::new();
    for shard in app.keys().shards() {
        lines.extend(archive.read(&day_of_ms(now_ms()), shard).unwrap());
    }
    let mut ids: Vec<&str> = lines.iter().map(|line| line.id.as_str()).collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = order_ids
        .iter()
        .chain([&batch])
        .map(String::as_str)
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let archived_batch = lines.iter().find(|line| line.kind == "batch").unwrap();
    assert_eq!(archived_batch.fields["status"], "settled");
    assert_eq!(archived_batch.fields["orders"], order_ids.join(","));
    assert!(
        lines
            .iter()
            .filter(|line| line.kind == "order")
            .all(|line| line.fields["cost"] == "400")
    );

    // A second round finds nothing more; the books still balance.
    for shard in app.keys().shards() {
        assert_eq!(
            retire_batches(&app.store, &archive, shard, window_start(window), 100)
                .await
                .unwrap(),
            0
        );
    }
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    app.assert_account_lists().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retiring_scripts_refuse_a_lost_lock_a_batch_in_flight_and_orders_not_named() {
    use tally::domain::{AccountId, BatchId, OrderId, Symbol};
    use tally::store::archive::{Retired, retire_batches, retire_orders};
    let app = spawn_app_with(|_| {}).await;
    let customer = app.create_account("c", "40.00").await;
    let batch = BatchId::parse(&app.place_batch(&customer, "3").await).unwrap();
    let order: serde_json::Value = app.get_json(&format!("/api/v1/batches/{batch}")).await;
    let order = OrderId::parse(order["order_ids"][0].as_str().unwrap()).unwrap();
    let account = AccountId::parse(&customer).unwrap();
    let keys = app.keys().clone();
    let home = keys.shard_of_id(&batch.uuid());
    let shard = app.shard_of(&customer);
    let mut conn = app.redis().await;
    let named_batch = [(batch, Symbol::parse("ABAN").unwrap())];
    let future = now_ms() + 60_000;

    let before = app.snapshot().await;
    let refused = retire_batches(&mut conn, &keys, home, &named_batch, future, "nobody", &[])
        .await
        .unwrap();
    assert_eq!(refused, Retired::LostLock);
    let refused = retire_orders(
        &mut conn,
        &keys,
        shard,
        "nobody",
        &[],
        &[(order, account.clone())],
    )
    .await
    .unwrap();
    assert_eq!(refused, Retired::LostLock);
    assert_eq!(app.snapshot().await, before, "nothing written");

    for shard in [home, shard] {
        hold_archive_lock(&mut conn, &keys, shard).await;
    }
    let before = app.snapshot().await;
    // The batch is still settling (no workers): not finished.
    let refused = retire_batches(&mut conn, &keys, home, &named_batch, future, "holder", &[])
        .await
        .unwrap();
    assert_eq!(refused, Retired::Stale);
    // An order named with another customer, and one that does not exist.
    let stranger = AccountId::parse(&app.create_account_beside("s", "0", &customer).await).unwrap();
    let before_stranger = app.snapshot().await;
    let refused = retire_orders(&mut conn, &keys, shard, "holder", &[], &[(order, stranger)])
        .await
        .unwrap();
    assert_eq!(refused, Retired::Stale);
    let missing = OrderId::parse(&keys.new_order_id(&account).to_string()).unwrap();
    let refused = retire_orders(
        &mut conn,
        &keys,
        shard,
        "holder",
        &[],
        &[(missing, account.clone())],
    )
    .await
    .unwrap();
    assert_eq!(refused, Retired::Stale);
    assert_eq!(app.snapshot().await, before_stranger, "nothing written");
    assert_ne!(
        before, before_stranger,
        "(the stranger's account was made in between)"
    );

    // The order, named right, under the lock: retired, with its list entry,
    // and the committed length set.
    let done = retire_orders(
        &mut conn,
        &keys,
        shard,
        "holder",
        &[("2026-12-01".to_owned(), 42)],
        &[(order, account.clone())],
    )
    .await
    .unwrap();
    assert_eq!(done, Retired::Records(1));
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.order(&order))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
    let listed: usize = redis::cmd("XLEN")
        .arg(keys.account_orders(&account))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(listed, 0, "off its customer's list");

    // Two batches, one finished (marked settled an hour ago by hand) and
    // one still settling: refused together, writing nothing; the finished
    // one alone leaves, its value carried.
    let settling = BatchId::parse(&app.place_batch(&customer, "3").await).unwrap();
    let _: () = redis::cmd("HSET")
        .arg(keys.batch(&batch))
        .arg("status")
        .arg("settled")
        .arg("settled_at")
        .arg(now_ms() - 3_600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let aban = Symbol::parse("ABAN").unwrap();
    let both = [(batch, aban.clone()), (settling, aban)];
    let before = app.snapshot().await;
    let refused = retire_batches(&mut conn, &keys, home, &both, future, "holder", &[])
        .await
        .unwrap();
    assert_eq!(refused, Retired::Stale);
    assert_eq!(app.snapshot().await, before, "nothing written");
    let committed = [("2026-12-01".to_owned(), 99)];
    let done = retire_batches(
        &mut conn,
        &keys,
        home,
        &both[..1],
        future,
        "holder",
        &committed,
    )
    .await
    .unwrap();
    assert_eq!(done, Retired::Records(1));
    let after = app.snapshot().await;
    let again = retire_batches(
        &mut conn,
        &keys,
        home,
        &both[..1],
        future,
        "holder",
        &committed,
    )
    .await
    .unwrap();
    assert_eq!(again, Retired::Records(1), "sent again, it answers alike");
    assert_eq!(app.snapshot().await, after, "and writes nothing");
    let carried: i64 = redis::cmd("HGET")
        .arg(keys.archive_carried(home))
        .arg("batches_value")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(carried, 1200, "3 ABAN at 4.00");
    let indexed: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.batches(home))
        .arg(batch.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, None, "off the shard's batches");
}

/// Takes the shard's archive lock as the holder `holder`, as a step would.
async fn hold_archive_lock(
    conn: &mut tally::store::connection::Conn,
    keys: &tally::store::keys::Keys,
    shard: Shard,
) {
    let _: () = redis::cmd("SET")
        .arg(keys.archive_lock(shard))
        .arg("holder")
        .query_async(conn)
        .await
        .unwrap();
}

/// Queues a wallet transaction through the API; returns its id.
async fn queue_wallet(app: &TestApp, account: &str, kind: &str, amount: &str) -> String {
    let response = app
        .post(
            &format!("/api/v1/accounts/{account}/transactions"),
            &json!({"kind": kind, "amount": amount}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let queued: serde_json::Value = response.json().await.unwrap();
    queued["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn applied_wallet_transactions_leave_into_the_archive_and_answer_410() {
    use tally::retention::{retire_records, window_start};
    let window = Duration::from_secs(1);
    let app = spawn_app_with(|settings| settings.ledger.record_retention = window).await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults::default()).await;
    let account = app.create_account("w", "0").await;
    let deposit = queue_wallet(&app, &account, "deposit", "5.00").await;
    let rejected = queue_wallet(&app, &account, "withdrawal", "9.00").await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let status = |id: String| {
        let app = &app;
        let account = account.clone();
        async move {
            app.get_json(&format!("/api/v1/accounts/{account}/transactions/{id}"))
                .await["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    eventually("both are applied", || async {
        status(deposit.clone()).await == "completed" && status(rejected.clone()).await == "rejected"
    })
    .await;
    workers.stop().await;
    let shard = app.shard_of(&account);
    let archive = app.archive();

    // Within the window: nothing leaves.
    assert_eq!(
        retire_records(
            &app.store,
            &archive,
            WalletTransaction,
            shard,
            window_start(window),
            100
        )
        .await
        .unwrap(),
        0
    );
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    // One queued after: not applied, so it stays whatever its age.
    let queued = queue_wallet(&app, &account, "deposit", "1.00").await;
    assert_eq!(
        retire_records(
            &app.store,
            &archive,
            WalletTransaction,
            shard,
            window_start(window),
            100
        )
        .await
        .unwrap(),
        2
    );
    for id in [&deposit, &rejected] {
        let response = app
            .get(&format!("/api/v1/accounts/{account}/transactions/{id}"))
            .await;
        assert_problem(response, 410, "is in the archive of").await;
    }
    assert_eq!(status(queued).await, "queued");
    let mut ids: Vec<String> = archived_ids(&archive, shard);
    ids.sort();
    let mut expected = vec![deposit.clone(), rejected.clone()];
    expected.sort();
    assert_eq!(ids, expected, "each once");
    let lines = archive.read(&day_of_ms(now_ms()), shard).unwrap();
    let line = lines.iter().find(|line| line.id == rejected).unwrap();
    assert_eq!(
        (
            line.kind.as_str(),
            line.fields["status"].as_str(),
            line.fields["reason"].as_str()
        ),
        ("wallet_transaction", "rejected", "insufficient funds")
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(app.balance(&account).await, "5.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repaid_advance_leaves_with_its_installments_into_the_archive_and_answers_410() {
    use crate::advances::{WEEK, create_advance, statuses, step};
    use tally::advances::ManualClock;
    use tally::retention::{retire_records, window_start};
    let window = Duration::from_secs(1);
    let app = spawn_app_with(|settings| settings.ledger.record_retention = window).await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("borrower", "0").await;
    let spender = app.create_account("spender", "0").await;
    let repaid = create_advance(&app, &account, "120.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another borrower spends the advance at once: every installment fails.
    let owing = create_advance(&app, &spender, "24.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let spent =
        json!({"account_id": spender, "amount": "24.00", "direction": "debit", "reason": "spent"});
    assert_eq!(
        app.post("/api/v1/bank-transactions", &spent).await.status(),
        201
    );
    let shard = app.shard_of(&account);
    let keys = app.keys().clone();
    let repaid_index = || async {
        let mut conn = app.redis().await;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.advances_repaid(shard))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        ids
    };
    // Both advances fall due together, week by week.
    let clock = ManualClock::starting_at(now_ms());
    for n in 1..=12 {
        if n == 12 {
            assert!(
                repaid_index().await.is_empty(),
                "not repaid until its last cent"
            );
        }
        step(&app, &clock, WEEK, &repaid, n).await;
        eventually("the other's installment too", || async {
            statuses(&app.get_json(&format!("/api/v1/advances/{owing}")).await)[n - 1]
                != "scheduled"
        })
        .await;
    }
    workers.stop().await;
    let owed = app.get_json(&format!("/api/v1/advances/{owing}")).await;
    let first = app.get_json(&format!("/api/v1/advances/{repaid}")).await;
    assert_eq!(first["paid"], "120.00", "{first}");
    assert_eq!(owed["paid"], "0.00", "{owed}");
    assert_eq!(repaid_index().await, vec![repaid.clone()]);
    let archive = app.archive();

    // Within the window: nothing leaves.
    assert_eq!(
        retire_records(
            &app.store,
            &archive,
            Advance,
            shard,
            window_start(window),
            100
        )
        .await
        .unwrap(),
        0
    );
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert_eq!(
        retire_records(
            &app.store,
            &archive,
            Advance,
            shard,
            window_start(window),
            100
        )
        .await
        .unwrap(),
        1
    );
    let response = app.get(&format!("/api/v1/advances/{repaid}")).await;
    assert_problem(response, 410, "is in the archive of").await;
    assert_eq!(
        app.get_json(&format!("/api/v1/advances/{owing}")).await,
        owed,
        "the advance still owed stays"
    );
    let listed = |account: String| {
        let app = &app;
        async move {
            let page = app
                .get_json(&format!("/api/v1/accounts/{account}/advances"))
                .await;
            page.as_array()
                .unwrap()
                .iter()
                .map(|advance| advance["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert!(listed(account.clone()).await.is_empty());
    assert_eq!(listed(spender.clone()).await, vec![owing.clone()]);
    assert!(repaid_index().await.is_empty());
    let mut conn = app.redis().await;
    let on_shard: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.advances(shard))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!on_shard.contains(&repaid), "off its shard's list");
    assert_eq!(archived_ids(&archive, shard), vec![repaid.clone()], "once");
    let lines = archive.read(&day_of_ms(now_ms()), shard).unwrap();
    let line = lines.iter().find(|line| line.id == repaid).unwrap();
    assert_eq!(
        (
            line.kind.as_str(),
            line.fields["paid"].as_str(),
            line.fields["amount"].as_str(),
            line.fields["i12:status"].as_str()
        ),
        ("advance", "12000", "12000", "paid")
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retire_records_refuses_a_lost_lock_and_a_record_not_finished_before_the_window() {
    use tally::domain::AccountId;
    use tally::store::archive::{Retired, retire_records};
    let app = spawn_app_with(|_| {}).await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults::default()).await;
    let account = app.create_account("w", "0").await;
    let queued = queue_wallet(&app, &account, "deposit", "5.00").await;
    let owing = crate::advances::create_advance(&app, &account, "24.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = AccountId::parse(&account).unwrap();
    let shard = app.shard_of(&account);
    let keys = app.keys().clone();
    let mut conn = app.redis().await;
    let before = app.snapshot().await;
    for (kind, record) in [(WalletTransaction, &queued), (Advance, &owing)] {
        let named = [(record.clone(), id.clone())];
        let refused = retire_records(
            &mut conn,
            &keys,
            kind,
            shard,
            now_ms(),
            "nobody",
            &[],
            &named,
        )
        .await
        .unwrap();
        assert_eq!(refused, Retired::LostLock, "{kind:?}");
    }
    assert_eq!(app.snapshot().await, before, "nothing written");
    hold_archive_lock(&mut conn, &keys, shard).await;
    // Queued, not applied; owed, not repaid.
    let before_locked = app.snapshot().await;
    for (kind, record) in [(WalletTransaction, &queued), (Advance, &owing)] {
        let named = [(record.clone(), id.clone())];
        let refused = retire_records(
            &mut conn,
            &keys,
            kind,
            shard,
            now_ms(),
            "holder",
            &[],
            &named,
        )
        .await
        .unwrap();
        assert_eq!(refused, Retired::Stale, "{kind:?}");
    }
    assert_eq!(app.snapshot().await, before_locked, "nothing written");
    // Applied, but within the window (the cutoff is before it was applied);
    // and one named with another account.
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("the deposit is applied", || async {
        app.get_json(&format!("/api/v1/accounts/{account}/transactions/{queued}"))
            .await["status"]
            == "completed"
    })
    .await;
    workers.stop().await;
    let other = AccountId::parse(&app.create_account_beside("x", "0", &account).await).unwrap();
    let before_applied = app.snapshot().await;
    let named = [(queued.clone(), id.clone())];
    let refused = retire_records(
        &mut conn,
        &keys,
        WalletTransaction,
        shard,
        now_ms() - 60_000,
        "holder",
        &[],
        &named,
    )
    .await
    .unwrap();
    assert_eq!(refused, Retired::Stale, "finished within the window");
    let named = [(queued.clone(), other)];
    let refused = retire_records(
        &mut conn,
        &keys,
        WalletTransaction,
        shard,
        now_ms() + 1_000,
        "holder",
        &[],
        &named,
    )
    .await
    .unwrap();
    assert_eq!(refused, Retired::Stale, "not the account named");
    assert_eq!(app.snapshot().await, before_applied, "nothing written");
}

/// A dead letter of the installments stream, discarded; returns its id.
async fn discarded_letter(app: &TestApp, shard: Shard, installment: &str) -> String {
    use tally::store::dead_letters::{Resolution, resolve};
    use tally::store::keys::StreamKind;
    let keys = app.keys();
    let mut conn = app.redis().await;
    let id: String = redis::AsyncCommands::xadd(
        &mut conn,
        keys.job_stream_dead(StreamKind::Installments, shard),
        "*",
        &[("installment", installment)],
    )
    .await
    .unwrap();
    let letter = tally::store::streams::StreamId::parse(&id).unwrap();
    resolve(
        &mut conn,
        keys,
        StreamKind::Installments,
        shard,
        letter,
        Resolution::Discard,
    )
    .await
    .unwrap();
    id
}

/// An operator log entry on `shard`, with `note`.
async fn logged_action(app: &TestApp, shard: Shard, note: &str) {
    use tally::store::console::{OperatorAction, record_operator_action};
    let action = OperatorAction {
        key_id: "k1".to_owned(),
        role: "ops".to_owned(),
        action: "discard installments".to_owned(),
        target: "1-0.1".to_owned(),
        effect: "moves no money; the dead letter is gone".to_owned(),
        note: note.to_owned(),
        via: "api".to_owned(),
    };
    let mut conn = app.redis().await;
    record_operator_action(&mut conn, app.keys(), shard, &action)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn resolved_dead_letters_and_the_operator_log_leave_into_the_archive_after_the_window() {
    use tally::retention::{archive_stream, archived_streams, window_start};
    let window = Duration::from_secs(1);
    let app = spawn_app_with(|settings| settings.ledger.record_retention = window).await;
    let shard = app.keys().shards().nth(3).unwrap();
    let archive = app.archive();
    let old_letter = discarded_letter(&app, shard, "a:1").await;
    logged_action(&app, shard, "the advance was closed by hand").await;
    let round = || async {
        let mut left = Vec::new();
        for stream in archived_streams(&app.store, shard) {
            left.push(
                archive_stream(
                    &app.store,
                    &archive,
                    shard,
                    &stream,
                    window_start(window),
                    10,
                )
                .await
                .unwrap(),
            );
        }
        left
    };
    assert_eq!(round().await, vec![0, 0, 0], "within the window");
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    discarded_letter(&app, shard, "b:2").await;
    logged_action(&app, shard, "young").await;
    assert_eq!(round().await, vec![1, 0, 1]);
    assert_eq!(round().await, vec![0, 0, 0], "each once");

    let keys = app.keys();
    let mut conn = app.redis().await;
    let resolved =
        crate::helpers::stream_entries(&mut conn, &keys.dead_letters_resolved(shard)).await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["installment"], "b:2", "the young one stays");
    let log = crate::helpers::stream_entries(&mut conn, &keys.operator_log(shard)).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["note"], "young");

    let lines = archive.read(&day_of_ms(now_ms()), shard).unwrap();
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|line| {
            (
                line.kind.as_str(),
                line.fields
                    .get("installment")
                    .or(line.fields.get("note"))
                    .unwrap()
                    .as_str(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("dead_letter", "a:1"),
            ("operator_action", "the advance was closed by hand")
        ]
    );
    let letter = &lines[0];
    assert_eq!(
        (
            letter.fields["resolution"].as_str(),
            letter.fields["resolved_letter"].as_str(),
            letter.fields["resolved_stream"].as_str()
        ),
        ("discarded", old_letter.as_str(), "installments")
    );
    assert!(
        letter.id.ends_with(&format!(".{}", shard.index())),
        "{}",
        letter.id
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_trim_refuses_a_lost_lock_and_entries_it_was_not_shown() {
    use tally::store::archive::{Retired, trim_archived_stream};
    let app = spawn_app_with(|_| {}).await;
    let shard = app.keys().shards().nth(2).unwrap();
    discarded_letter(&app, shard, "a:1").await;
    let keys = app.keys().clone();
    let stream = keys.dead_letters_resolved(shard);
    let mut conn = app.redis().await;
    let ids: Vec<String> = crate::helpers::stream_ids(&mut conn, &stream).await;
    discarded_letter(&app, shard, "b:2").await;
    let all = crate::helpers::stream_ids(&mut conn, &stream).await;
    let before = app.snapshot().await;
    let refused = trim_archived_stream(&mut conn, &keys, shard, &stream, &ids[0], 1, "nobody", &[])
        .await
        .unwrap();
    assert_eq!(refused, Retired::LostLock);
    hold_archive_lock(&mut conn, &keys, shard).await;
    let locked = app.snapshot().await;
    assert_ne!(before, locked);
    // Told of one entry up to the second (there are two), of two up to the
    // first, of none: each refused.
    for (last, count) in [(&all[1], 1), (&ids[0], 2), (&ids[0], 0)] {
        let refused =
            trim_archived_stream(&mut conn, &keys, shard, &stream, last, count, "holder", &[])
                .await
                .unwrap();
        assert_eq!(refused, Retired::Stale, "{last} {count}");
    }
    assert_eq!(app.snapshot().await, locked, "nothing written");
    let done = trim_archived_stream(
        &mut conn,
        &keys,
        shard,
        &stream,
        &ids[0],
        1,
        "holder",
        &[("2026-12-01".to_owned(), 7)],
    )
    .await
    .unwrap();
    assert_eq!(done, Retired::Records(1));
    assert_eq!(
        crate::helpers::stream_ids(&mut conn, &stream).await,
        all[1..].to_vec()
    );
    // Sent again (a reply lost on a cluster), it answers alike and writes
    // nothing, though its entry is gone.
    let after = app.snapshot().await;
    let again = trim_archived_stream(
        &mut conn,
        &keys,
        shard,
        &stream,
        &ids[0],
        1,
        "holder",
        &[("2026-12-01".to_owned(), 7)],
    )
    .await
    .unwrap();
    assert_eq!(again, Retired::Records(1));
    assert_eq!(app.snapshot().await, after);
    let committed: Option<u64> = redis::cmd("HGET")
        .arg(keys.archive_committed(shard))
        .arg("2026-12-01")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(committed, Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batchs_dead_letter_stays_until_the_batch_is_refunded_then_leaves() {
    use tally::retention::{archive_stream, archived_streams, window_start};
    let window = Duration::from_secs(1);
    let app = spawn_app_with(|settings| settings.ledger.record_retention = window).await;
    let exchange = spawn_exchange(tally::exchange::sim::Faults {
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let workers = spawn_workers(
        &app,
        tally::config::WorkerSettings {
            attempts_max: 1,
            ..test_worker_settings(&exchange)
        },
    );
    let customer = app.create_account("c", "20.00").await;
    let batch = app.place_batch(&customer, "3").await;
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    workers.stop().await;
    let home = crate::helpers::aban_home();
    let [_, settle_dead, _] = archived_streams(&app.store, home);
    let archive = app.archive();
    let round = || async {
        archive_stream(
            &app.store,
            &archive,
            home,
            &settle_dead,
            window_start(window),
            10,
        )
        .await
        .unwrap()
    };
    let letters =
        || async { crate::helpers::stream_entries(&mut app.redis().await, &settle_dead.key).await };
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert_eq!(round().await, 0, "its batch is still failed");
    assert_eq!(letters().await.len(), 1);

    let refunded = app
        .post(&format!("/api/v1/batches/{batch}/refund"), &json!({}))
        .await;
    assert!(refunded.status().is_success(), "{}", refunded.status());
    assert_eq!(round().await, 1);
    assert!(letters().await.is_empty());
    let lines = archive.read(&day_of_ms(now_ms()), home).unwrap();
    let letter = lines
        .iter()
        .find(|line| line.kind == "dead_letter")
        .expect("the letter is archived");
    assert_eq!(letter.fields["batch_id"], batch);
    assert_eq!(round().await, 0, "once");
}
