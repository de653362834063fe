//! The refund saga (`store::refund_saga`), for a failed batch whose orders'
//! customers live on other shards: a crash after the batch became
//! `refunding`, and after some customers' shards were paid back, is finished
//! by a sweeper, each customer refunded exactly once; the audit stays clean
//! meanwhile (it counts what is still owed); the operator's refund answers as
//! a one-step refund.

use serde_json::{Value, json};
use tally::domain::BatchId;
use tally::store::now_ms;
use tally::store::order_saga::TAKEOVER_AFTER_MS;
use tally::store::refund_saga;

use crate::helpers::{
    TestApp, TestWorkers, eventually, spawn_app_with_sagas, spawn_exchange, spawn_workers,
    test_worker_settings,
};

async fn audit(app: &TestApp) {
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// Three customers on three shards, 10.00 each, order 1 ABAN (4.00) each
/// against an exchange that is down: one batch of 12.00, failed. Returns the
/// customers, the batch, and the workers (stopped: nothing else runs).
async fn a_failed_batch_of_three_shards(app: &TestApp) -> ([String; 3], String, TestWorkers) {
    let exchange = spawn_exchange(tally::exchange::sim::Faults {
        fail_rate: 1.0,
        ..Default::default()
    })
    .await;
    let settings = tally::config::WorkerSettings {
        attempts_max: 1,
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(app, settings);
    let a = app.create_account_off("a", "10.00", &[]).await;
    let b = app.create_account_off("b", "10.00", &[&a]).await;
    let c = app.create_account_off("c", "10.00", &[&a, &b]).await;
    let mut batch = String::new();
    for customer in [&a, &b, &c] {
        let response = app.place_order(customer, "ABAN", "1").await;
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        if let Some(id) = answer["batch_id"].as_str() {
            batch = id.to_owned();
        }
    }
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    ([a, b, c], batch, workers)
}

async fn sweep_all(app: &TestApp) -> usize {
    let mut conn = app.redis().await;
    let later = now_ms() + TAKEOVER_AFTER_MS + 1;
    let mut finished = 0;
    for shard in app.keys().shards() {
        finished += refund_saga::sweep(&mut conn, app.keys(), shard, later)
            .await
            .unwrap();
    }
    finished
}

async fn balances(app: &TestApp, customers: &[String; 3]) -> Vec<String> {
    let mut all = Vec::new();
    for customer in customers {
        all.push(app.balance(customer).await);
    }
    all.push(app.balance("@exchange").await);
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_each_step_is_finished_by_a_sweeper_once() {
    let app = spawn_app_with_sagas().await;
    let (customers, batch, workers) = a_failed_batch_of_three_shards(&app).await;
    workers.stop().await;
    let batch_id = BatchId::parse(&batch).unwrap();
    let mut conn = app.redis().await;
    assert_eq!(
        balances(&app, &customers).await,
        ["6.00", "6.00", "6.00", "12.00"]
    );

    // Step 1 only: the process dies once the batch is refunding.
    refund_saga::begin(
        &mut conn,
        app.keys(),
        &batch_id,
        "exchange gone",
        false,
        now_ms(),
    )
    .await
    .unwrap();
    assert_eq!(app.batch_status(&batch).await, "refunding");
    audit(&app).await;
    // Step 2 on the first customer's shard only: the process dies again.
    let orders = refund_saga::batch_orders(&mut conn, app.keys(), &batch_id)
        .await
        .unwrap();
    let first = app.shard_of(&customers[0]);
    refund_saga::refund_customers_on(&mut conn, app.keys(), &batch_id, first, &orders)
        .await
        .unwrap();
    // Sent again (a lost reply): refunds no one twice.
    refund_saga::refund_customers_on(&mut conn, app.keys(), &batch_id, first, &orders)
        .await
        .unwrap();
    assert_eq!(
        balances(&app, &customers).await,
        ["10.00", "6.00", "6.00", "8.00"]
    );
    audit(&app).await;
    // The operator's retry is refused meanwhile: the batch is being refunded.
    let retry = app
        .post(&format!("/api/v1/batches/{batch}/retry"), &json!({}))
        .await;
    assert_eq!(retry.status(), 409);

    assert_eq!(sweep_all(&app).await, 1);
    assert_eq!(sweep_all(&app).await, 0, "a second sweep finds nothing");
    assert_eq!(app.batch_status(&batch).await, "refunded");
    assert_eq!(
        balances(&app, &customers).await,
        ["10.00", "10.00", "10.00", "0.00"]
    );
    assert_eq!(app.journal_count("refund").await, 3);
    audit(&app).await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_refund_pays_every_shard_back_once_and_answers_refunded() {
    let app = spawn_app_with_sagas().await;
    let (customers, batch, workers) = a_failed_batch_of_three_shards(&app).await;
    let refund = format!("/api/v1/batches/{batch}/refund");
    let response = app.post(&refund, &json!({"note": "exchange gone"})).await;
    assert_eq!(response.status(), 200);
    let refunded: Value = response.json().await.unwrap();
    assert_eq!(refunded["status"], "refunded");
    assert_eq!(
        balances(&app, &customers).await,
        ["10.00", "10.00", "10.00", "0.00"]
    );
    // Again: not failed any more, nothing written.
    assert_eq!(app.post(&refund, &json!({})).await.status(), 409);
    assert_eq!(app.journal_count("refund").await, 3);
    // A second run of the saga's steps (a resent call) changes nothing.
    let mut conn = app.redis().await;
    let batch_id = BatchId::parse(&batch).unwrap();
    let again = refund_saga::complete(&mut conn, app.keys(), &batch_id)
        .await
        .unwrap();
    assert_eq!(again, (3, 1_200));
    assert_eq!(
        balances(&app, &customers).await,
        ["10.00", "10.00", "10.00", "0.00"]
    );
    audit(&app).await;
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}
