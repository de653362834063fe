//! The order saga (`store::order_saga`): a crash after each step leaves an
//! intent that a sweeper finishes exactly once; balances stay exact and the
//! audit clean meanwhile (the audit counts debited orders not yet in a
//! bucket as in flight); a replay of the request finishes the saga before it
//! answers; and across shards, the mission's three $4 orders make one
//! exchange call for 3.

use serde_json::Value;
use tally::domain::{AccountId, IdempotencyKey, Quantity, Symbol};
use tally::orders::{OrderRequest, prepare};
use tally::store::now_ms;
use tally::store::order_saga::{self, Admission, Debit, TAKEOVER_AFTER_MS};
use tally::store::orders::PlaceOrder;

use crate::helpers::{
    TestApp, eventually, spawn_app_with_sagas, spawn_exchange, spawn_workers, test_worker_settings,
};

/// An order of `quantity` ABAN for `account`, priced as the API prices it.
fn order(app: &TestApp, account: &str, quantity: &str, key: Option<&str>) -> PlaceOrder {
    let request = OrderRequest {
        account_id: AccountId::parse(account).unwrap(),
        symbol: Symbol::parse("ABAN").unwrap(),
        quantity: Quantity::parse(quantity).unwrap(),
    };
    let key = key.map(|key| {
        IdempotencyKey::parse(key)
            .unwrap()
            .scoped(&app.admin_key_id())
    });
    prepare(&request, app.keys(), &Default::default(), key, 60).unwrap()
}

/// Runs the debit step alone, as if the process died right after it.
async fn debit_only(app: &TestApp, order: &PlaceOrder) {
    let shard = app.keys().account_shard(&order.account_id);
    let debited = order_saga::debit(&mut app.redis().await, app.keys(), shard, &[order], &[])
        .await
        .unwrap();
    assert!(matches!(debited[..], [Ok(Debit::Debited)]), "{debited:?}");
}

/// Every shard swept once, far enough in the future that every intent is past
/// its takeover time; returns the sagas finished.
async fn sweep_all(app: &TestApp) -> usize {
    let later = now_ms() + TAKEOVER_AFTER_MS + 1;
    let mut finished = 0;
    for shard in app.keys().shards() {
        let swept = order_saga::sweep(&mut app.redis().await, app.keys(), shard, later)
            .await
            .unwrap();
        assert_eq!(swept.too_old, 0);
        finished += swept.finished;
    }
    finished
}

async fn audit_clean(app: &TestApp) -> tally::audit::AuditReport {
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    report
}

/// Three customers, each on a shard of their own.
async fn three_customers(app: &TestApp) -> [String; 3] {
    let a = app.create_account_off("a", "10.00", &[]).await;
    let b = app.create_account_off("b", "10.00", &[&a]).await;
    let c = app.create_account_off("c", "10.00", &[&a, &b]).await;
    [a, b, c]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_debit_is_finished_by_a_sweeper_once() {
    let app = spawn_app_with_sagas().await;
    let customers = three_customers(&app).await;
    let orders: Vec<PlaceOrder> = customers
        .iter()
        .map(|customer| order(&app, customer, "1", None))
        .collect();
    for placed in &orders {
        debit_only(&app, placed).await;
    }
    // Debited, in no bucket yet: the audit counts them in flight.
    for customer in &customers {
        assert_eq!(app.balance(customer).await, "6.00");
    }
    let report = audit_clean(&app).await;
    assert_eq!(
        (report.orders_in_flight, report.orders_in_flight_cents),
        (3, 1200)
    );
    assert!(app.settle_jobs().await.is_empty());
    let status = app
        .get_json(&format!("/api/v1/orders/{}", orders[0].order_id))
        .await;
    assert_eq!(status["status"], "pending");

    assert_eq!(sweep_all(&app).await, 3);
    assert_eq!(app.order_intents().await, 0);
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1, "one batch for the three");
    assert_eq!(jobs[0]["quantity"], "3.00000000");
    let report = audit_clean(&app).await;
    assert_eq!(report.orders_in_flight, 0);
    for placed in &orders {
        let status = app
            .get_json(&format!("/api/v1/orders/{}", placed.order_id))
            .await;
        assert_eq!(status["status"], "settling");
        assert_eq!(status["batch_id"], jobs[0]["batch_id"].as_str());
    }

    // Nothing left: another sweep finds nothing and writes nothing.
    let before = app.snapshot().await;
    assert_eq!(sweep_all(&app).await, 0);
    assert_eq!(app.snapshot().await, before);
    assert_eq!(app.balance("@exchange").await, "12.00");
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_admission_is_finished_without_admitting_again() {
    let app = spawn_app_with_sagas().await;
    let customer = app.create_account("d", "10.00").await;
    let placed = order(&app, &customer, "1", None);
    debit_only(&app, &placed).await;
    let admitted = order_saga::admit(
        &mut app.redis().await,
        app.keys(),
        &[Admission::of(&placed)],
    )
    .await
    .unwrap();
    assert_eq!(admitted[0].batch_id, None);
    // Admitted and not finished: in the bucket, so not in flight.
    let report = audit_clean(&app).await;
    assert_eq!(report.orders_in_flight, 0);
    assert_eq!(app.bucket("ABAN").await["order_count"], 1);
    let status = app
        .get_json(&format!("/api/v1/orders/{}", placed.order_id))
        .await;
    assert_eq!(status["status"], "pending");

    assert_eq!(sweep_all(&app).await, 1);
    assert_eq!(app.order_intents().await, 0);
    assert_eq!(app.bucket("ABAN").await["order_count"], 1, "admitted once");
    audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sweepers_at_once_finish_every_saga_once() {
    let app = spawn_app_with_sagas().await;
    let mut placed = Vec::new();
    for i in 0..20 {
        let customer = app.create_account(&format!("c{i}"), "10.00").await;
        let one = order(&app, &customer, "1", None);
        debit_only(&app, &one).await;
        placed.push(one);
    }
    let (first, second) = tokio::join!(sweep_all(&app), sweep_all(&app));
    assert_eq!(first + second, 20, "each saga taken by one sweeper");
    assert_eq!(app.order_intents().await, 0);
    // 20 orders of 4.00: 8 batches of 10.00 or more (4 + 4 + 4 closes one).
    let jobs = app.settle_jobs().await;
    let in_batches: usize = jobs
        .iter()
        .map(|job| job["order_count"].parse::<usize>().unwrap())
        .sum();
    let waiting = app.bucket("ABAN").await["order_count"].as_u64().unwrap() as usize;
    assert_eq!(in_batches + waiting, 20, "every order admitted once");
    assert_eq!(app.balance("@exchange").await, "80.00");
    audit_clean(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_request_finishes_its_unfinished_saga_before_it_answers() {
    let app = spawn_app_with_sagas().await;
    let customer = app.create_account("e", "20.00").await;
    let first = order(&app, &customer, "3", Some("saga-1"));
    debit_only(&app, &first).await; // the first request's process died here
    let body = serde_json::json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    let replay = app.post_with_key("/api/v1/orders", "saga-1", &body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let answer: Value = replay.json().await.unwrap();
    assert_eq!(answer["id"], first.order_id.to_string());
    assert_eq!(answer["status"], "settling", "12.00 closes a batch");
    assert_eq!(app.order_intents().await, 0, "finished before it answered");
    assert_eq!(app.balance(&customer).await, "8.00", "charged once");
    assert_eq!(app.settle_jobs().await.len(), 1);
    audit_clean(&app).await;
}

/// The mission's example across shards, through the API, the workers and
/// the exchange: three customers on three shards order 1 ABAN (4.00) each;
/// the third answer carries the batch, and the exchange gets one call for 3.
#[tokio::test(flavor = "multi_thread")]
async fn three_customers_on_three_shards_make_one_exchange_call_for_three() {
    let app = spawn_app_with_sagas().await;
    let exchange = spawn_exchange(Default::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let customers = three_customers(&app).await;
    let mut answers = Vec::new();
    for customer in &customers {
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
    eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let calls = exchange.orders().await;
    assert_eq!(calls.len(), 1, "one exchange call");
    assert_eq!(calls[0].client_order_id, batch);
    assert_eq!(calls[0].quantity, "3");
    assert_eq!(calls[0].calls, 1);
    assert_eq!(app.order_intents().await, 0);
    audit_clean(&app).await;
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}
