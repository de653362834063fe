//! Transfers, bank transactions and the transactions report.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tally::store::keys::Keys;

use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::helpers::{BALANCE_LIMIT_CENTS, TestApp, assert_problem, spawn_app, spawn_app_with};

fn cents(text: &str) -> i64 {
    let negative = text.starts_with('-');
    let amount = tally::domain::Amount::parse(text.trim_start_matches('-'))
        .unwrap()
        .cents();
    if negative { -amount } else { amount }
}

async fn transfer(
    app: &TestApp,
    src: &str,
    dst: &str,
    amount: &str,
    direction: &str,
) -> reqwest::Response {
    let body = json!({"src_account_id": src, "dst_account_id": dst, "amount": amount, "direction": direction});
    app.post("/api/v1/transfers", &body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_moves_money_either_way_and_a_refusal_is_journaled() {
    let app = spawn_app().await;
    let a = app.create_account("a", "50.00").await;
    let b = app.create_account("b", "10.00").await;

    let response = transfer(&app, &a, &b, "20.00", "debit").await;
    assert_eq!(response.status(), 201);
    let moved: Value = response.json().await.unwrap();
    assert_eq!(moved["status"], "success");
    assert_eq!(moved["amount"], "20.00");
    assert_eq!(moved["direction"], "debit");
    assert!(moved["transaction_id"].is_string() && moved["transaction_timestamp"].is_string());
    assert_eq!(
        (app.balance(&a).await, app.balance(&b).await),
        ("30.00".into(), "30.00".into())
    );

    // credit: dst pays src.
    assert_eq!(transfer(&app, &a, &b, "5", "credit").await.status(), 201);
    assert_eq!(
        (app.balance(&a).await, app.balance(&b).await),
        ("35.00".into(), "25.00".into())
    );

    // Insufficient funds: 422 with the journaled transaction's id and reason; nothing moves.
    let problem = assert_problem(
        transfer(&app, &b, &a, "25.01", "debit").await,
        422,
        "insufficient funds",
    )
    .await;
    let failed_id = problem["transaction_id"].as_str().unwrap().to_owned();
    assert!(
        problem["reason"]
            .as_str()
            .unwrap()
            .contains("insufficient funds")
    );
    assert_eq!(
        (app.balance(&a).await, app.balance(&b).await),
        ("35.00".into(), "25.00".into())
    );
    let journal = app.journal().await;
    let failed = journal
        .iter()
        .find(|entry| entry["ref"] == failed_id)
        .unwrap();
    assert_eq!(
        (
            failed["status"].as_str(),
            failed["amount"].as_str(),
            failed["requested"].as_str()
        ),
        ("failed", "0", "2501")
    );

    // An unknown account is refused and journaled the same way.
    let unknown = "01900000-0000-7000-8000-000000000000";
    let problem = assert_problem(
        transfer(&app, &a, unknown, "1", "debit").await,
        422,
        "not found",
    )
    .await;
    assert!(problem["transaction_id"].is_string());
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");

    // The accounting events say who paid whom.
    let events = app.all_entries(Keys::events).await;
    let completed = events
        .iter()
        .find(|event| event["type"] == "transfer.completed" && event["debit"] == a.as_str())
        .unwrap();
    let fields = ["debit", "credit", "amount", "requested"].map(|name| completed[name].as_str());
    assert_eq!(fields, [a.as_str(), b.as_str(), "2000", "2000"]);
    let failed = events
        .iter()
        .find(|event| event["ref"] == failed_id)
        .unwrap();
    let fields =
        ["type", "debit", "credit", "amount", "requested"].map(|name| failed[name].as_str());
    assert_eq!(
        fields,
        ["transfer.failed", b.as_str(), a.as_str(), "0", "2501"]
    );
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_that_would_pass_the_balance_limit_is_refused_and_moves_nothing() {
    let app = spawn_app().await;
    let a = app.create_account("a", "10.00").await;
    let b = app.create_account("b", "0").await;
    // Set by hand: reaching it honestly takes about 10^7 transfers of the largest amount.
    let near_limit = BALANCE_LIMIT_CENTS - 100;
    app.set_balance_cents(&b, near_limit).await;
    assert_problem(
        transfer(&app, &a, &b, "1.01", "debit").await,
        422,
        "largest amount",
    )
    .await;
    assert_eq!(app.balance(&a).await, "10.00");
    assert_eq!(app.balance_cents(&b).await, near_limit);
    assert_eq!(transfer(&app, &a, &b, "1.00", "debit").await.status(), 201);
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bank_transactions_move_money_against_the_bank() {
    let app = spawn_app().await;
    let a = app.create_account("a", "0").await;
    let credit =
        json!({"account_id": a, "amount": "100.00", "direction": "credit", "reason": "salary"});
    let response = app.post("/api/v1/bank-transactions", &credit).await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["reason"].as_str(), body["status"].as_str()),
        (Some("salary"), Some("success"))
    );
    let debit = json!({"account_id": a, "amount": "30.00", "direction": "debit", "reason": "rent"});
    assert_eq!(
        app.post("/api/v1/bank-transactions", &debit).await.status(),
        201
    );
    assert_eq!(app.balance(&a).await, "70.00");
    assert_eq!(app.balance("@bank").await, "-70.00");
    let too_much =
        json!({"account_id": a, "amount": "70.01", "direction": "debit", "reason": "rent"});
    assert_problem(
        app.post("/api/v1/bank-transactions", &too_much).await,
        422,
        "insufficient funds",
    )
    .await;
    assert_eq!(app.balance(&a).await, "70.00");
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_are_idempotent_per_key() {
    let app = spawn_app().await;
    let a = app.create_account("a", "10.00").await;
    let b = app.create_account("b", "0").await;
    let send = |key: &'static str, amount: &'static str| {
        let body = json!({"src_account_id": a, "dst_account_id": b, "amount": amount, "direction": "debit"});
        let app = &app;
        async move { app.post_with_key("/api/v1/transfers", key, &body).await }
    };
    let first: Value = send("t1", "4").await.json().await.unwrap();
    let again = send("t1", "4.00").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["transaction_id"], again["transaction_id"]);
    assert_eq!(app.balance(&b).await, "4.00");
    assert_problem(send("t1", "5").await, 409, "another request").await;
    // A refusal replays as the same refusal.
    let refused = assert_problem(send("t2", "7").await, 422, "insufficient").await;
    let replayed = assert_problem(send("t2", "7").await, 422, "insufficient").await;
    assert_eq!(refused["transaction_id"], replayed["transaction_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_never_overdraw_and_never_create_money() {
    let app = Arc::new(spawn_app().await);
    let mut accounts = Vec::new();
    for i in 0..10 {
        accounts.push(app.create_account(&format!("t{i}"), "20.00").await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (app, src, dst) = (
            app.clone(),
            accounts[i % 10].clone(),
            accounts[(i * 3 + 1) % 10].clone(),
        );
        let direction = if i % 2 == 0 { "debit" } else { "credit" };
        let amount = ["3.00", "7.50", "12.25", "0.01"][i % 4];
        tasks.push(tokio::spawn(async move {
            if src == dst {
                return None;
            }
            let response = transfer(&app, &src, &dst, amount, direction).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            Some((status, body))
        }));
    }
    let mut refused = HashSet::new();
    let mut succeeded = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some((201, _)) => succeeded += 1,
            Some((422, body)) => {
                assert!(
                    body["reason"]
                        .as_str()
                        .unwrap()
                        .contains("insufficient funds")
                );
                refused.insert(body["transaction_id"].as_str().unwrap().to_owned());
            }
            Some((status, body)) => panic!("{status}: {body}"),
            None => {}
        }
    }
    assert!(
        succeeded > 0 && !refused.is_empty(),
        "both outcomes seen: {succeeded} / {}",
        refused.len()
    );
    let mut sum = 0;
    for account in &accounts {
        let balance = cents(&app.balance(account).await);
        assert!(balance >= 0);
        sum += balance;
    }
    assert_eq!(sum, 10 * 2000, "customer balances sum unchanged");
    let journaled_failures: HashSet<String> = app
        .journal()
        .await
        .into_iter()
        .filter(|entry| entry["kind"] == "transfer" && entry["status"] == "failed")
        .inspect(|entry| assert!(entry["reason"].contains("insufficient funds")))
        .map(|entry| entry["ref"].clone())
        .collect();
    assert_eq!(
        journaled_failures, refused,
        "every refused transfer is journaled with its reason"
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(
        report.is_clean() && report.balances_sum_cents == 0,
        "{report}"
    );
    assert!(app.assert_account_lists().await > 0);
}

/// Writes `count` journal entries (bank credits) straight through the store.
async fn write_entries(app: &TestApp, account: &str, count: usize) {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let body = json!({"account_id": account, "amount": "1.00", "direction": "credit", "reason": "seed"});
        let request = app
            .client
            .post(app.url("/api/v1/bank-transactions"))
            .json(&body);
        tasks.push(tokio::spawn(async move {
            request.send().await.unwrap().status()
        }));
        if tasks.len() == 64 {
            for task in tasks.drain(..) {
                assert_eq!(task.await.unwrap(), 201);
            }
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 201);
    }
}

/// A report id, `ms-seq.shard`, as the numbers it orders by.
fn id_order(id: &str) -> (u64, u64, u16) {
    let (stream_id, shard) = id.split_once('.').unwrap();
    let (ms, seq) = stream_id.split_once('-').unwrap();
    (
        ms.parse().unwrap(),
        seq.parse().unwrap(),
        shard.parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_stays_inside_the_snapshot_while_writes_go_on() {
    let app = Arc::new(spawn_app().await);
    // Entries on three shards' journals, written at once: the report merges them.
    let a = app.create_account("a", "0").await;
    let c = app.create_account_off("c", "0", &[&a]).await;
    let d = app.create_account_off("d", "0", &[&a, &c]).await;
    // On a's shard: each transfer below is one entry, sagas or not.
    let b = app.create_account_beside("b", "0", &a).await;
    tokio::join!(
        write_entries(&app, &a, 400),
        write_entries(&app, &c, 300),
        write_entries(&app, &d, 300),
    );
    let before = app.journal_ids_newest_first().await;
    assert_eq!(before.len(), 1_000);

    let first = app.get_json("/api/v1/transactions?limit=50").await;
    assert_eq!(
        (first["total_count"].as_u64(), first["total_pages"].as_u64()),
        (Some(1_000), Some(20))
    );
    let writer = {
        let app = app.clone();
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move {
            for _ in 0..500 {
                assert_eq!(transfer(&app, &a, &b, "0.01", "debit").await.status(), 201);
            }
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut page = first.clone();
    let mut cursors = Vec::new();
    for _ in 0..25 {
        assert_eq!(
            page["as_of"], first["as_of"],
            "every page reports the same snapshot"
        );
        assert_eq!(page["total_count"], 1_000);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                cursors.push(cursor.to_owned());
                page = app
                    .get_json(&format!("/api/v1/transactions?cursor={cursor}"))
                    .await;
            }
            None => break,
        }
    }
    writer.await.unwrap();
    assert_eq!(
        seen, before,
        "exactly the 1,000 of the snapshot, each once, newest first"
    );
    assert!(
        seen.windows(2)
            .all(|pair| id_order(&pair[0]) > id_order(&pair[1]))
    );

    // page=N reads the same snapshot as the cursor walk, now 500 entries later.
    let seventh = app
        .get_json(&format!(
            "/api/v1/transactions?cursor={}&page=7",
            cursors[0]
        ))
        .await;
    let ids: Vec<&str> = seventh["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        seen[300..350]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    assert_eq!(seventh["page"], 7);
    // A new listing sees the 500 new ones.
    assert_eq!(
        app.get_json("/api/v1/transactions?limit=50").await["total_count"],
        1_500
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn report_entries_describe_every_kind_and_filter_by_time() {
    let app = spawn_app().await;
    let a = app.create_account("a", "100.00").await;
    app.place_order(&a, "ABAN", "3").await;
    let listing = app.get_json("/api/v1/transactions").await;
    let kinds: Vec<&str> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["order", "opening_balance"]);
    let order = &listing["items"][0];
    assert_eq!(
        (
            order["debit_account_id"].as_str(),
            order["credit_account_id"].as_str()
        ),
        (Some(a.as_str()), Some("@exchange"))
    );
    assert_eq!(
        (order["amount"].as_str(), order["status"].as_str()),
        (Some("12.00"), Some("completed"))
    );
    let future = app
        .get_json("/api/v1/transactions?start=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(future["total_count"], 0);
    let past = app
        .get_json("/api/v1/transactions?end=2000-01-01T00:00:00Z")
        .await;
    assert_eq!(past["total_count"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_past_retention_leave_the_report_and_redis_and_the_audit_still_adds_up() {
    let app = spawn_app_with(|settings| {
        settings.ledger.journal_retention = std::time::Duration::from_millis(300)
    })
    .await;
    let a = app.create_account("a", "0").await;
    write_entries(&app, &a, 10).await;
    assert_eq!(
        app.get_json("/api/v1/transactions").await["total_count"],
        10
    );
    assert_eq!(
        app.assert_account_lists().await,
        10,
        "on the account's list"
    );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await; // let the window pass
    assert_eq!(
        app.get_json("/api/v1/transactions").await["total_count"],
        0,
        "out of the window"
    );

    let mut conn = app.redis().await;
    let cutoff_ms = u64::try_from(tally::store::now_ms()).unwrap() - 300;
    let archive = app.archive();
    let trimmed =
        tally::retention::archive_journal(&app.store, &archive, app.shard_of(&a), cutoff_ms, 10)
            .await
            .unwrap();
    assert_eq!(trimmed, 10);
    let day = tally::archive::day_of_ms(tally::store::now_ms());
    let archived = archive.read(&day, app.shard_of(&a)).unwrap();
    let ids: std::collections::HashSet<&str> =
        archived.iter().map(|line| line.id.as_str()).collect();
    assert_eq!(
        (archived.len(), ids.len()),
        (10, 10),
        "each entry archived once"
    );
    assert!(archived.iter().all(|line| line.kind == "journal_entry"
        && line.fields["credit"] == a
        && line.fields["amount"] == "100"));
    let length = app.journal().await.len();
    let indexed = app.journal_index_len().await;
    assert_eq!((length, indexed), (0, 0), "gone from Redis memory");
    assert_eq!(
        app.assert_account_lists().await,
        0,
        "and from the account's list"
    );
    let carried: BTreeMap<String, i64> = conn
        .hgetall(app.keys().journal_carried(app.shard_of(&a)))
        .await
        .unwrap();
    assert_eq!(carried[&a], 1000);
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trim_waits_while_an_audit_reads_the_journal() {
    use tally::retention::archive_journal;
    use tally::store::journal::{pause_trim, resume_trim};
    use tally::store::now_ms;
    let app = spawn_app_with(|settings| {
        settings.ledger.journal_retention = std::time::Duration::from_millis(300)
    })
    .await;
    let a = app.create_account("a", "0").await;
    write_entries(&app, &a, 5).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await; // let the window pass
    let cutoff_ms = u64::try_from(now_ms()).unwrap() - 300;
    let mut conn = app.redis().await;
    let shard = app.shard_of(&a);

    pause_trim(&mut conn, &Keys::default(), "audit", now_ms() + 60_000)
        .await
        .unwrap();
    let before = app.snapshot().await;
    assert_eq!(
        archive_journal(&app.store, &app.archive(), shard, cutoff_ms, 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(app.snapshot().await, before, "a paused trim writes nothing");

    // A pause that ran out (its audit died) does not hold the trim.
    resume_trim(&mut conn, &Keys::default(), "audit")
        .await
        .unwrap();
    let _: () = conn
        .zadd(
            app.keys().journal_trim_pauses(shard),
            "dead-audit",
            now_ms() - 1,
        )
        .await
        .unwrap();
    assert_eq!(
        archive_journal(&app.store, &app.archive(), shard, cutoff_ms, 10)
            .await
            .unwrap(),
        5
    );

    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    let pauses: Vec<String> = conn
        .zrange(app.keys().journal_trim_pauses(shard), 0, -1)
        .await
        .unwrap();
    assert!(
        pauses.is_empty(),
        "the audit ended its pause and forgot the one that ran out: {pauses:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_that_finds_the_journal_trimmed_under_it_says_so_instead_of_a_breach() {
    let app = spawn_app().await;
    let a = app.create_account("a", "0").await;
    write_entries(&app, &a, 3_000).await; // a few pages, so each audit takes a while
    // A trim that ignores the pause (its clock far off), over and over: the
    // carried sums change while every audit reads.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trimmer = {
        let (stop, mut conn) = (stop.clone(), app.redis().await);
        let carried = app.keys().journal_carried(app.shard_of(&a));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _: i64 = conn.hincr(&carried, "kind:seed", 1).await.unwrap();
            }
        })
    };
    let audited = tally::audit::run(&app.store).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    trimmer.await.unwrap();
    assert!(
        matches!(&audited, Err(tally::store::StoreError::Contended(_))),
        "{audited:?}"
    );
    // Left alone, the same ledger audits clean.
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_transfer_and_report_input_is_refused_and_writes_nothing() {
    let app = spawn_app().await;
    let a = app.create_account("a", "10.00").await;
    let b = app.create_account("b", "10.00").await;
    let first = app.get_json("/api/v1/transactions?limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let before = app.snapshot().await;
    let body = |amount: &str, src: &str, dst: &str, direction: &str| json!({"src_account_id": src, "dst_account_id": dst, "amount": amount, "direction": direction});
    // 400: the body breaks the spec. 422: it keeps to it, but names one
    // account twice (a rule between fields, which a schema cannot state).
    let cases = [
        (body("-5", &a, &b, "debit"), 400, "must not be negative"),
        (body("0", &a, &b, "debit"), 400, "greater than zero"),
        (
            body("1.001", &a, &b, "debit"),
            400,
            "more than 2 decimal places",
        ),
        (body("1.5e1", &a, &b, "debit"), 400, "plain decimal"),
        (body("5", &a, &a, "debit"), 422, "must differ"),
        (body("5", &a, &b, "sideways"), 400, "sideways"),
        (body("5", &a, "@bank", "debit"), 400, "is a system account"),
        (
            json!({"src_account_id": a, "amount": "5", "direction": "debit"}),
            400,
            "account_id",
        ),
    ];
    for (body, status, detail) in cases {
        assert_problem(app.post("/api/v1/transfers", &body).await, status, detail).await;
    }
    let no_reason = json!({"account_id": a, "amount": "1", "direction": "credit", "reason": " "});
    assert_problem(
        app.post("/api/v1/bank-transactions", &no_reason).await,
        400,
        "reason",
    )
    .await;
    let forged = cursor.replace(".1.", ".2.");
    for (query, status, detail) in [
        ("start=yesterday", 400, "not an RFC 3339"),
        ("end=2026-13-45T00:00:00Z", 400, "not an RFC 3339"),
        ("end=2026-02-29T00:00:00Z", 400, "not an RFC 3339"),
        (
            "start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
            422,
            "start must not be after end",
        ),
        ("limit=101", 400, "limit"),
        ("page=0", 400, "page"),
        (&format!("cursor={forged}"), 422, "cursor"),
        ("cursor=abc", 422, "cursor"),
        (
            &format!("cursor={cursor}&start=2026-01-01T00:00:00Z"),
            422,
            "cursor",
        ),
    ] {
        assert_problem(
            app.get(&format!("/api/v1/transactions?{query}")).await,
            status,
            detail,
        )
        .await;
    }
    assert_eq!(app.snapshot().await, before);
}

/// `cursor` with its limit and offset replaced, signed again with `secret`:
/// what someone who learned the secret could send.
fn resign_cursor(cursor: &str, secret: &str, limit: &str, offset: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let (payload, _) = cursor.rsplit_once('.').unwrap();
    let mut parts: Vec<&str> = payload.split('.').collect();
    parts[3] = limit;
    parts[4] = offset;
    let payload = parts.join(".");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    format!("{payload}.{}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_validly_signed_cursor_with_numbers_out_of_bounds_is_refused() {
    let app = spawn_app().await;
    let a = app.create_account("a", "10.00").await;
    let b = app.create_account("b", "10.00").await;
    transfer(&app, &a, &b, "1.00", "debit").await;
    let first = app.get_json("/api/v1/transactions?limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let secret = tally::config::CURSOR_SECRET_DEFAULT;
    // The re-signing is right: the same numbers give a cursor that works.
    let same = resign_cursor(&cursor, secret, "1", "1");
    let page = app
        .get_json(&format!("/api/v1/transactions?cursor={same}"))
        .await;
    assert_eq!(page["page"], 2);
    for (limit, offset) in [("0", "0"), ("100000", "0"), ("1", "18446744073709551615")] {
        let forged = resign_cursor(&cursor, secret, limit, offset);
        assert_problem(
            app.get(&format!("/api/v1/transactions?cursor={forged}"))
                .await,
            422,
            "out of bounds",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn report_times_in_the_future_are_clamped_to_now() {
    let app = spawn_app().await;
    let a = app.create_account("a", "10.00").await;
    // On a's shard, so that the transfer is one entry, sagas or not; with
    // no opening balance, so the accounts made to get there journal nothing.
    let b = app.create_account_beside("b", "0", &a).await;
    assert_eq!(transfer(&app, &a, &b, "1.00", "debit").await.status(), 201);
    let everything = app.get_json("/api/v1/transactions").await;
    let total = everything["total_count"].as_u64().unwrap();
    assert_eq!(total, 2, "an opening balance and a transfer");
    let before = app.snapshot().await;
    // Index members pad ms to 13 digits; 2300 has 14 and compared as text
    // as if it were before 1970.
    for (query, expected) in [
        ("end=2300-01-01T00:00:00Z", total),
        ("end=9999-12-31T23:59:59Z", total),
        ("start=2300-01-01T00:00:00Z", 0),
        ("start=2300-01-01T00:00:00Z&end=2400-01-01T00:00:00Z", 0),
        ("start=2000-01-01T00:00:00Z&end=2300-01-01T00:00:00Z", total),
    ] {
        let page = app.get_json(&format!("/api/v1/transactions?{query}")).await;
        assert_eq!(page["total_count"], expected, "{query}");
        assert_eq!(
            page["items"].as_array().unwrap().len() as u64,
            expected,
            "{query}"
        );
    }
    assert_eq!(app.snapshot().await, before, "reading changed nothing");
}
