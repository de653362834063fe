//! Advances: 12 installments, collected exactly once under leases, failures
//! carried forward, reconciliation. Time moves by hand: no test sleeps a week.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tally::store::keys::Keys;

use serde_json::{Value, json};
use tally::advances::{Clock, ManualClock, SchedulerSettings, run_scheduler, schedule_once};
use tally::exchange::sim::Faults;
use tokio::sync::watch;

use crate::helpers::{
    TestApp, eventually, spawn_app, spawn_app_with, spawn_exchange, spawn_workers,
    test_worker_settings,
};

pub(crate) const WEEK: Duration = Duration::from_secs(7 * 24 * 60 * 60);

pub(crate) fn scheduler_settings() -> SchedulerSettings {
    SchedulerSettings {
        lease: Duration::from_secs(30),
        interval: Duration::from_millis(20),
        batch_max: 500,
    }
}

pub(crate) async fn create_advance(app: &TestApp, account: &str, amount: &str) -> Value {
    let response = app
        .post(
            "/api/v1/advances",
            &json!({"account_id": account, "amount": amount}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn advance(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/api/v1/advances/{id}")).await
}

pub(crate) fn statuses(advance: &Value) -> Vec<String> {
    advance["installments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap().to_owned())
        .collect()
}

/// A new account with nothing in it and an advance of 120.00, a week on, with
/// its first installment just leased: (account, advance id, the clock).
async fn first_installment_leased(app: &TestApp, name: &str) -> (String, String, ManualClock) {
    let account = app.create_account(name, "0").await;
    let id = create_advance(app, &account, "120.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let clock = ManualClock::starting_at(tally::store::now_ms());
    clock.advance(WEEK);
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (1, 0, 0)
    );
    (account, id, clock)
}

/// Moves the clock one period, runs the scheduler once, and waits until
/// installment `n` is no longer scheduled or processing.
pub(crate) async fn step(
    app: &TestApp,
    clock: &ManualClock,
    period: Duration,
    id: &str,
    n: usize,
) -> Value {
    clock.advance(period);
    schedule_once(&app.store, clock, &scheduler_settings())
        .await
        .unwrap();
    eventually("the installment is collected", || async {
        let status = &statuses(&advance(app, id).await)[n - 1];
        status == "paid" || status == "failed"
    })
    .await;
    let advance = advance(app, id).await;
    assert_eq!(advance["reconciled"], true, "{advance}");
    advance
}

async fn bank(app: &TestApp, account: &str, amount: &str, direction: &str) {
    let body =
        json!({"account_id": account, "amount": amount, "direction": direction, "reason": "test"});
    assert_eq!(
        app.post("/api/v1/bank-transactions", &body).await.status(),
        201
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_advance_is_repaid_in_twelve_weekly_installments() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("borrower", "0").await;
    let created = create_advance(&app, &account, "1200.00").await;
    let clock = ManualClock::starting_at(tally::store::now_ms());
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(app.balance(&account).await, "1200.00");
    assert!(
        created["installments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["amount"] == "100.00" && i["status"] == "scheduled")
    );

    // Nothing is due before its time.
    let early = ManualClock::starting_at(clock.now_ms() + 7 * 24 * 60 * 60 * 1000 - 1000);
    assert_eq!(
        schedule_once(&app.store, &early, &scheduler_settings())
            .await
            .unwrap(),
        (0, 0, 0)
    );
    for n in 1..=12 {
        let advance = step(&app, &clock, WEEK, &id, n).await;
        let statuses = statuses(&advance);
        assert!(
            statuses[..n].iter().all(|s| s == "paid")
                && statuses[n..].iter().all(|s| s == "scheduled"),
            "{statuses:?}"
        );
    }
    let repaid = advance(&app, &id).await;
    assert_eq!(
        (repaid["paid"].as_str(), repaid["scheduled"].as_str()),
        (Some("1200.00"), Some("0.00"))
    );
    assert_eq!(app.balance(&account).await, "0.00", "back where it started");
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_installments_carry_forward_and_a_failed_last_one_makes_a_thirteenth() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("short", "0").await;
    let id = create_advance(&app, &account, "1200.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let clock = ManualClock::starting_at(tally::store::now_ms());
    step(&app, &clock, WEEK, &id, 1).await;
    step(&app, &clock, WEEK, &id, 2).await;
    bank(&app, &account, "1000.00", "debit").await; // spent: nothing left
    let third = step(&app, &clock, WEEK, &id, 3).await;
    assert_eq!(third["installments"][2]["status"], "failed");
    assert_eq!(third["installments"][3]["amount"], "200.00");
    let fourth = step(&app, &clock, WEEK, &id, 4).await;
    assert_eq!(fourth["installments"][3]["status"], "failed");
    assert_eq!(
        fourth["installments"][4]["amount"], "300.00",
        "installment 5 carries 3 and 4"
    );
    bank(&app, &account, "2000.00", "credit").await;
    let fifth = step(&app, &clock, WEEK, &id, 5).await;
    assert_eq!(fifth["installments"][4]["status"], "paid");
    for n in 6..=11 {
        step(&app, &clock, WEEK, &id, n).await;
    }
    let balance = app.balance(&account).await;
    bank(&app, &account, &balance, "debit").await; // the last one cannot be paid
    let twelfth = step(&app, &clock, WEEK, &id, 12).await;
    assert_eq!(twelfth["installments"][11]["status"], "failed");
    assert_eq!(twelfth["installments"].as_array().unwrap().len(), 13);
    assert_eq!(twelfth["installments"][12]["amount"], "100.00");
    assert_eq!(
        (twelfth["paid"].as_str(), twelfth["scheduled"].as_str()),
        (Some("1100.00"), Some("100.00"))
    );
    bank(&app, &account, "100.00", "credit").await;
    let thirteenth = step(&app, &clock, WEEK, &id, 13).await;
    assert_eq!(thirteenth["paid"], "1200.00");
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_amount_not_divisible_by_twelve_is_split_exactly() {
    let app = spawn_app().await;
    let account = app.create_account("odd", "0").await;
    let created = create_advance(&app, &account, "1000.00").await;
    let amounts: Vec<&str> = created["installments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts[..11], ["83.33"; 11]);
    assert_eq!(amounts[11], "83.37");
    let cents: i64 = amounts
        .iter()
        .map(|a| tally::domain::Amount::parse(a).unwrap().cents())
        .sum();
    assert_eq!(cents, 100_000);
    assert_eq!(created["scheduled"], "1000.00");
    let listed = app
        .get_json(&format!("/api/v1/accounts/{account}/advances"))
        .await;
    assert_eq!(listed[0]["id"], created["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_and_three_workers_collect_every_installment_once() {
    let app =
        spawn_app_with(|settings| settings.ledger.advance_period = Duration::from_secs(1)).await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(
        &app,
        tally::config::WorkerSettings {
            consumers: 3,
            ..test_worker_settings(&exchange)
        },
    );
    let clock = Arc::new(ManualClock::starting_at(tally::store::now_ms()));
    let (stop, stopped) = watch::channel(false);
    for _ in 0..2 {
        let clock: Arc<dyn Clock> = clock.clone();
        tokio::spawn(run_scheduler(
            app.store.clone(),
            clock,
            scheduler_settings(),
            stopped.clone(),
        ));
    }
    let mut ids = Vec::new();
    for i in 0..50 {
        let account = app.create_account(&format!("a{i}"), "0").await;
        ids.push(
            create_advance(&app, &account, "120.00").await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Past the last installment's due time, with room for the time the
    // advances took to create (they are due from their creation, in real time).
    for _ in 0..16 {
        clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(60)).await; // a few scheduler rounds
    }
    eventually("every installment is collected", || async {
        let journal = app.journal().await;
        journal
            .iter()
            .filter(|entry| entry["kind"] == "installment")
            .count()
            >= 600
    })
    .await;
    let _ = stop.send(true);
    let journal = app.journal().await;
    let mut collections: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in journal
        .iter()
        .filter(|entry| entry["kind"] == "installment")
    {
        *collections.entry(entry["ref"].as_str()).or_default() += 1;
    }
    assert_eq!(collections.len(), 600, "50 advances x 12 installments");
    assert!(
        collections.values().all(|count| *count == 1),
        "each collected once"
    );
    for id in &ids {
        assert_eq!(advance(&app, id).await["paid"], "120.00");
    }
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(
        report.is_clean() && report.advances_checked == 50,
        "{report}"
    );
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_installment_whose_worker_died_is_collected_once_after_its_lease() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let (account, id, clock) = first_installment_leased(&app, "lease").await;
    let installments = app.keys().installments(app.shard_of(&account));

    // A worker takes the job and dies holding the lease: it never acknowledges.
    let mut conn = app.redis().await;
    tally::workers::ensure_group(
        &mut conn,
        &installments,
        tally::store::advances::COLLECT_GROUP,
    )
    .await
    .unwrap();
    let taken: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(tally::store::advances::COLLECT_GROUP)
        .arg("doomed")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&installments)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), 1);
    assert_eq!(statuses(&advance(&app, &id).await)[0], "processing");

    // Within the lease nothing is handed out again; after it, the installment is.
    clock.advance(Duration::from_secs(29));
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (0, 0, 0)
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (0, 1, 0)
    );
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("the installment is paid", || async {
        statuses(&advance(&app, &id).await)[0] == "paid"
    })
    .await;
    // The dead worker's delivery is taken over too (after claim_idle_ms) and finds no lease.
    eventually("both deliveries are acknowledged", || async {
        let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
            .arg(&installments)
            .arg(tally::store::advances::COLLECT_GROUP)
            .query_async(&mut app.redis().await)
            .await
            .unwrap();
        pending.count() == 0
    })
    .await;
    let collections = app.journal_count("installment").await;
    assert_eq!(collections, 1);
    assert_eq!(app.balance(&account).await, "110.00");
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_whose_job_is_still_unread_is_extended_without_a_new_job() {
    let app = spawn_app().await;
    let (account, _, clock) = first_installment_leased(&app, "behind").await;
    let installments = app.keys().installments(app.shard_of(&account));
    let settings = scheduler_settings();
    let step = || schedule_once(&app.store, &clock, &settings);
    let mut conn = app.redis().await;
    let jobs = |mut conn: tally::store::connection::Conn, installments: String| async move {
        let length: usize = redis::AsyncCommands::xlen(&mut conn, installments)
            .await
            .unwrap();
        length
    };

    // No collector has read the stream (no group yet, then a group that has
    // not read): each expiry only extends the lease.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(31));
        assert_eq!(step().await.unwrap(), (0, 0, 1));
    }
    tally::workers::ensure_group(
        &mut conn,
        &installments,
        tally::store::advances::COLLECT_GROUP,
    )
    .await
    .unwrap();
    clock.advance(Duration::from_secs(31));
    assert_eq!(step().await.unwrap(), (0, 0, 1));
    assert_eq!(
        jobs(conn.clone(), installments.clone()).await,
        1,
        "no duplicate jobs"
    );

    // A worker reads the job and dies: the next expiry queues it again.
    let _: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(tally::store::advances::COLLECT_GROUP)
        .arg("doomed")
        .arg("STREAMS")
        .arg(&installments)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    assert_eq!(step().await.unwrap(), (0, 1, 0));
    assert_eq!(jobs(conn.clone(), installments.clone()).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_finds_a_scheduled_installment_nothing_would_collect() {
    let app = spawn_app().await;
    let account = app.create_account("stranded", "0").await;
    let id = create_advance(&app, &account, "120.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    // Damaged by hand: installment 3 leaves the due set and is not leased.
    let member = format!("{id}:3");
    let due = app.keys().installments_due(app.shard_of(&account));
    let _: () = redis::AsyncCommands::zrem(&mut app.redis().await, due, &member)
        .await
        .unwrap();
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(!report.is_clean(), "{report}");
    assert_eq!(report.stranded_installments, vec![member]);
    assert!(report.to_string().contains("1 stranded"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_advances_are_refused_and_write_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("b", "0").await;
    let before = app.snapshot().await;
    for (body, status, detail) in [
        (
            json!({"account_id": account, "amount": "0"}),
            400,
            "at least 0.12",
        ),
        (
            json!({"account_id": account, "amount": "-1"}),
            400,
            "negative",
        ),
        (
            json!({"account_id": "@bank", "amount": "1"}),
            400,
            "is a system account",
        ),
        (
            json!({"account_id": "01900000-0000-7000-8000-000000000000", "amount": "1"}),
            422,
            "not found",
        ),
    ] {
        crate::helpers::assert_problem(app.post("/api/v1/advances", &body).await, status, detail)
            .await;
    }
    crate::helpers::assert_problem(app.get("/api/v1/advances/nope").await, 400, "UUID").await;
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_carries_past_a_later_installment_collected_first() {
    let app = spawn_app().await;
    let account = app.create_account("late", "0").await;
    let id = create_advance(&app, &account, "1200.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let clock = ManualClock::starting_at(tally::store::now_ms());
    bank(&app, &account, "1100.00", "debit").await; // 100.00 left: one installment's worth
    clock.advance(WEEK * 2); // the scheduler was down: two installments fall due together
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (2, 0, 0)
    );

    // The second is collected first (they are handled concurrently), then the first fails.
    let mut conn = app.redis().await;
    let customer = tally::domain::AccountId::parse(&account).unwrap();
    let second = tally::store::advances::collect(
        &mut conn,
        &Keys::default(),
        &id,
        &customer,
        2,
        "0-1",
        "test",
        1000,
    )
    .await
    .unwrap();
    assert_eq!(second, tally::store::advances::Collected::Paid(10_000));
    let first = tally::store::advances::collect(
        &mut conn,
        &Keys::default(),
        &id,
        &customer,
        1,
        "0-2",
        "test",
        1000,
    )
    .await
    .unwrap();
    assert_eq!(
        first,
        tally::store::advances::Collected::Failed {
            amount: 10_000,
            carried_to: 3
        }
    );

    let advance = advance(&app, &id).await;
    assert_eq!(
        advance["installments"][2]["amount"], "200.00",
        "carried past the paid second"
    );
    assert_eq!(
        (advance["paid"].as_str(), advance["reconciled"].as_bool()),
        (Some("100.00"), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collection_that_cannot_read_its_records_writes_nothing_and_keeps_its_lease() {
    use tally::store::advances::{Collected, collect};
    let app = spawn_app().await;
    let (account, id, _) = first_installment_leased(&app, "broken").await;
    let customer = tally::domain::AccountId::parse(&account).unwrap();
    let mut conn = app.redis().await;
    // Damaged by hand, one field at a time: the last installment's due time
    // (read only on the path where the balance falls short), then the balance.
    let damages = [
        (Keys::default().advance(&id), "i12:due", "lacks"),
        (Keys::default().account(&customer), "balance", "no balance"),
    ];
    for (key, field, problem) in damages {
        let _: () = redis::AsyncCommands::hdel(&mut conn, &key, field)
            .await
            .unwrap();
        let before = app.snapshot().await;
        let collected = collect(
            &mut conn,
            &Keys::default(),
            &id,
            &customer,
            1,
            "0-1",
            "test",
            1000,
        )
        .await
        .unwrap();
        assert!(
            matches!(&collected, Collected::Malformed(what) if what.contains(problem)),
            "{collected:?}"
        );
        assert_eq!(
            app.snapshot().await,
            before,
            "the lease and the job stay, for a collection once the record is repaired"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_advance_below_a_cent_per_installment_is_refused_and_lends_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("small", "0").await;
    let before = app.snapshot().await;
    // 0.05 would make eleven installments of 0.00.
    for amount in ["0.05", "0.11", "0.01"] {
        let response = app
            .post(
                "/api/v1/advances",
                &json!({"account_id": account, "amount": amount}),
            )
            .await;
        let problem = crate::helpers::assert_problem(response, 400, "at least 0.12").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("\"amount\""),
            "names the field: {problem}"
        );
        assert_eq!(app.snapshot().await, before, "{amount} lent nothing");
    }
    assert_eq!(app.balance(&account).await, "0.00");
    let listed = app
        .get_json(&format!("/api/v1/accounts/{account}/advances"))
        .await;
    assert_eq!(listed, json!([]));

    // The smallest advance allowed: a cent for each installment.
    let created = create_advance(&app, &account, "0.12").await;
    let amounts: Vec<&str> = created["installments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["0.01"; 12]);
}

#[tokio::test(flavor = "multi_thread")]
async fn advance_ids_are_canonical_uuids_in_any_case() {
    let app = spawn_app().await;
    let account = app.create_account("ids", "0").await;
    let id = create_advance(&app, &account, "120.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = app.snapshot().await;
    let upper = advance(&app, &id.to_uppercase()).await;
    assert_eq!(
        upper["id"],
        id.as_str(),
        "the same advance, spelled as stored"
    );
    for malformed in [id.replace('-', ""), format!("{{{id}}}"), "nope".to_owned()] {
        let response = app.get(&format!("/api/v1/advances/{malformed}")).await;
        let problem = crate::helpers::assert_problem(response, 400, "expected a UUID").await;
        assert_eq!(problem["type"], "/problems/invalid-id", "{malformed}");
    }
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn at_its_installment_bound_a_failed_last_installment_is_due_again_instead() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(
        &app,
        tally::config::WorkerSettings {
            installments_max: 13,
            ..test_worker_settings(&exchange)
        },
    );
    let account = app.create_account("broke", "0").await;
    let id = create_advance(&app, &account, "12.00").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    bank(&app, &account, "12.00", "debit").await; // spent: every collection fails
    let clock = ManualClock::starting_at(tally::store::now_ms());
    for n in 1..=12 {
        step(&app, &clock, WEEK, &id, n).await;
    }
    let grown = advance(&app, &id).await;
    assert_eq!(grown["installments"].as_array().unwrap().len(), 13);
    assert_eq!(grown["installments"][12]["amount"], "12.00");

    // The 13th fails twice: the advance stays at 13, the 13th is due again
    // a period later each time, and everything still reconciles.
    let mut due = grown["installments"][12]["due_at"].clone();
    for _ in 0..2 {
        clock.advance(WEEK);
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap();
        eventually("the 13th is due again", || async {
            let now = advance(&app, &id).await;
            let last = &now["installments"][12];
            last["status"] == "scheduled" && last["due_at"] != due
        })
        .await;
        let now = advance(&app, &id).await;
        assert_eq!(now["installments"].as_array().unwrap().len(), 13, "{now}");
        assert_eq!(now["reconciled"], true, "{now}");
        due = now["installments"][12]["due_at"].clone();
    }

    bank(&app, &account, "12.00", "credit").await;
    clock.advance(WEEK);
    schedule_once(&app.store, &clock, &scheduler_settings())
        .await
        .unwrap();
    eventually("the 13th is paid", || async {
        advance(&app, &id).await["installments"][12]["status"] == "paid"
    })
    .await;
    let repaid = advance(&app, &id).await;
    assert_eq!(repaid["paid"], "12.00", "{repaid}");
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accounts_advances_page_by_offset_and_an_unknown_account_is_404() {
    let app = spawn_app().await;
    let account = app.create_account("pager", "0").await;
    let mut created = Vec::new();
    for amount in ["12.00", "24.00", "36.00"] {
        created.push(create_advance(&app, &account, amount).await["id"].clone());
    }
    let page = |offset: u32| {
        let app = &app;
        let account = account.clone();
        async move {
            app.get_json(&format!(
                "/api/v1/accounts/{account}/advances?limit=2&offset={offset}"
            ))
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|advance| advance["id"].clone())
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(0).await, created[..2]);
    assert_eq!(page(2).await, created[2..]);
    assert!(page(3).await.is_empty());

    let before = crate::helpers::redis_snapshot(&mut app.redis().await).await;
    let too_far = app
        .get(&format!(
            "/api/v1/accounts/{account}/advances?offset=1000001"
        ))
        .await;
    crate::helpers::assert_problem(too_far, 400, "offset").await;
    let unknown = tally::domain::AccountId::new_customer();
    for path in ["advances", "transactions"] {
        let response = app.get(&format!("/api/v1/accounts/{unknown}/{path}")).await;
        crate::helpers::assert_problem(response, 404, "not found").await;
    }
    assert_eq!(
        crate::helpers::redis_snapshot(&mut app.redis().await).await,
        before
    );
}
