//! Settlement workers against the real exchange-sim over HTTP: settle once,
//! retry with growing delays, dead-letter, operator retry and refund.

use serde_json::{Value, json};
use tally::exchange::sim::Faults;
use tally::store::keys::Keys;

use crate::helpers::{
    DOWN, TestApp, TestExchange, TestWorkers, UP, assert_problem, eventually, spawn_app,
    spawn_exchange, spawn_workers, test_worker_settings,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_foundation_examples_end_with_one_fill_each() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(UP).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let alice = app.create_account("alice", "100.00").await;
    let large = app.place_batch(&alice, "3").await;
    let mut small_orders = Vec::new();
    for name in ["a", "b", "c"] {
        let customer = app.create_account(name, "10.00").await;
        let order: Value = app
            .place_order(&customer, "ABAN", "1")
            .await
            .json()
            .await
            .unwrap();
        small_orders.push(order["id"].as_str().unwrap().to_owned());
    }
    let small = app
        .get_json(&format!("/api/v1/orders/{}", small_orders[0]))
        .await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();

    for batch in [&large, &small] {
        eventually("the batch is settled", || async {
            app.batch_status(batch).await == "settled"
        })
        .await;
        let fill = exchange
            .order(batch)
            .await
            .expect("the exchange saw the batch");
        assert_eq!(
            (fill.symbol.as_str(), fill.quantity.as_str(), fill.calls),
            ("ABAN", "3", 1)
        );
        assert!(fill.fill.is_some());
    }
    assert_eq!(
        exchange.orders().await.len(),
        2,
        "one exchange call per batch, no more"
    );
    for id in &small_orders {
        assert_eq!(
            app.get_json(&format!("/api/v1/orders/{id}")).await["status"],
            "settled"
        );
    }
    assert_eq!(
        app.balance("@exchange").await,
        "0.00",
        "paid out to the exchange"
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exchange_outage_is_retried_with_growing_delays_and_settles_once() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let settings = tally::config::WorkerSettings {
        attempts_max: 20,
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(&app, settings);
    let customer = app.create_account("patient", "100.00").await;
    let batch = app.place_batch(&customer, "3").await;

    eventually("five calls failed", || async {
        exchange
            .order(&batch)
            .await
            .is_some_and(|order| order.calls >= 5)
    })
    .await;
    let failing = app.batch(&batch).await;
    assert_eq!(failing["status"], "settling");
    assert!(
        failing["last_error"].as_str().unwrap().contains("503"),
        "{failing}"
    );
    exchange.set_faults(UP).await;
    eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;

    let order = exchange.order(&batch).await.unwrap();
    assert!(order.fill.is_some());
    let gaps: Vec<i64> = order
        .call_times_ms
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect();
    // Delays double from 50 ms (each in the upper half of its range): by the
    // fifth gap they are several times the first.
    assert!(gaps[4] > gaps[0] * 2, "delays grow: {gaps:?}");
    assert!(
        gaps.windows(2).filter(|pair| pair[1] >= pair[0]).count() >= gaps.len() / 2,
        "{gaps:?}"
    );
    let settled = app.batch(&batch).await;
    assert_eq!(settled["attempts"], json!(order.calls));
    assert!(settled["last_error"].is_null());
    workers.stop().await;
}

/// A batch dead-lettered after `attempts_max` calls to an exchange that is
/// down, its customer, and the workers that failed it, still running.
async fn failed_batch(
    app: &TestApp,
    exchange: &TestExchange,
    attempts_max: u32,
) -> (TestWorkers, String, String) {
    let settings = tally::config::WorkerSettings {
        attempts_max,
        ..test_worker_settings(exchange)
    };
    let workers = spawn_workers(app, settings);
    let customer = app.create_account("unlucky", "100.00").await;
    let batch = app.place_batch(&customer, "3").await;
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    let calls = exchange.order(&batch).await.unwrap().calls;
    assert_eq!(calls, u64::from(attempts_max));
    (workers, customer, batch)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_past_attempts_max_is_dead_lettered_then_retried_once() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, _, batch) = failed_batch(&app, &exchange, 3).await;
    let dead = crate::helpers::stream_entries(
        &mut app.redis().await,
        &Keys::default().settle_dead(crate::helpers::aban_home()),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["batch_id"], batch);
    assert_eq!(dead[0]["attempts"], "3");
    let order_id = app.batch(&batch).await["order_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let order = app.get_json(&format!("/api/v1/orders/{order_id}")).await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["attempts"], 3);
    let listed = app.get_json("/api/v1/batches?status=failed").await;
    assert_eq!(listed["items"][0]["id"], batch.as_str());

    exchange.set_faults(UP).await;
    let retried = app
        .post(&format!("/api/v1/batches/{batch}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status(), 200);
    eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let filled = exchange.order(&batch).await.unwrap();
    assert!(filled.fill.is_some() && filled.calls == 4, "{filled:?}");
    assert_eq!(
        app.get_json("/api/v1/batches?status=failed").await["items"],
        json!([])
    );
    // Settled batches can be neither retried nor refunded.
    assert_problem(
        app.post(&format!("/api/v1/batches/{batch}/retry"), &json!({}))
            .await,
        409,
        "not failed",
    )
    .await;
    assert_problem(
        app.post(&format!("/api/v1/batches/{batch}/refund"), &json!({}))
            .await,
        409,
        "not failed",
    )
    .await;
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_restores_every_customer_exactly() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let settings = tally::config::WorkerSettings {
        attempts_max: 2,
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(&app, settings);
    let mut customers = Vec::new();
    for (name, quantity) in [
        ("x", "1.25"),
        ("y", "0.5"),
        ("z", "0.5"),
        ("w", "0.00000001"),
    ] {
        let customer = app.create_account(name, "7.77").await;
        let response = app.place_order(&customer, "ABAN", quantity).await;
        assert_eq!(response.status(), 201);
        customers.push(customer);
    }
    let closing = app.create_account("closer", "50.00").await;
    let batch = app.place_batch(&closing, "1.5").await; // 5.00 + 2.00 + 2.00 + 0.01 pending, + 6.00 closes
    customers.push(closing);
    assert_eq!(
        app.batch(&batch).await["order_ids"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    let refunded = app
        .post(
            &format!("/api/v1/batches/{batch}/refund"),
            &json!({"note": "exchange gone"}),
        )
        .await;
    assert_eq!(refunded.status(), 200);
    let refunded: Value = refunded.json().await.unwrap();
    assert_eq!(refunded["status"], "refunded");

    for customer in &customers[..4] {
        assert_eq!(app.balance(customer).await, "7.77");
    }
    assert_eq!(app.balance(&customers[4]).await, "50.00");
    assert_eq!(app.balance("@exchange").await, "0.00");
    let refunds = app.journal_count("refund").await;
    assert_eq!(refunds, 5);
    assert_problem(
        app.post(&format!("/api/v1/batches/{batch}/refund"), &json!({}))
            .await,
        409,
        "not failed",
    )
    .await;
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejection_from_the_exchange_is_not_retried() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults {
        reject_rate: 1.0,
        ..UP
    })
    .await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let customer = app.create_account("rejected", "100.00").await;
    let batch = app.place_batch(&customer, "3").await;
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    assert_eq!(exchange.order(&batch).await.unwrap().calls, 1);
    assert!(
        app.batch(&batch).await["last_error"]
            .as_str()
            .unwrap()
            .contains("422")
    );
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_actions_refuse_bad_input() {
    let app = spawn_app().await;
    assert_problem(
        app.get("/api/v1/batches?status=settled").await,
        400,
        "status",
    )
    .await;
    assert_problem(
        app.post("/api/v1/batches/nope/retry", &json!({})).await,
        400,
        "not a valid id",
    )
    .await;
    let unknown = "01900000-0000-7000-8000-000000000000";
    assert_problem(
        app.post(&format!("/api/v1/batches/{unknown}/retry"), &json!({}))
            .await,
        404,
        "not found",
    )
    .await;
    let long_note = json!({"note": "x".repeat(201)});
    assert_problem(
        app.post(&format!("/api/v1/batches/{unknown}/refund"), &long_note)
            .await,
        400,
        "note",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_batch_offsets_are_bounded_and_paging_ends() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let settings = tally::config::WorkerSettings {
        attempts_max: 1,
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(&app, settings);
    let customer = app.create_account("unlucky", "100.00").await;
    let mut batches = Vec::new();
    // One at a time: the listing is oldest failure first, and batches the
    // workers read together fail in any order.
    for _ in 0..3 {
        let batch = app.place_batch(&customer, "3").await;
        eventually("the batch failed", || async {
            app.batch_status(&batch).await == "failed"
        })
        .await;
        batches.push(batch);
    }
    workers.stop().await;
    let before = app.snapshot().await;

    // These once wrapped around in Redis: data past the end, or a next
    // offset of 0 that sent a pager back to the start forever.
    for query in [
        "offset=18446744073709551615",
        "limit=2&offset=18446744073709551614",
        "offset=1000001",
    ] {
        let response = app
            .get(&format!("/api/v1/batches?status=failed&{query}"))
            .await;
        let problem = assert_problem(response, 400, "offset must be at most 1000000").await;
        assert_eq!(problem["type"], "/problems/invalid-offset", "{query}");
    }
    let last = app
        .get_json("/api/v1/batches?status=failed&offset=1000000")
        .await;
    assert_eq!(last["items"], json!([]));
    assert!(last.get("next_offset").is_none_or(Value::is_null));

    let mut listed = Vec::new();
    let mut path = "/api/v1/batches?status=failed&limit=2".to_owned();
    for _ in 0..batches.len() {
        let page = app.get_json(&path).await;
        for item in page["items"].as_array().unwrap() {
            listed.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_offset"].as_u64() {
            Some(next) => path = format!("/api/v1/batches?status=failed&limit=2&offset={next}"),
            None => break,
        }
    }
    assert_eq!(
        listed, batches,
        "every failed batch once, and the pager ends"
    );
    assert_eq!(app.snapshot().await, before, "listing changed nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_note_with_control_characters_is_refused_and_refunds_nothing() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, customer, batch) = failed_batch(&app, &exchange, 1).await;
    workers.stop().await;
    let before = app.snapshot().await;
    for note in [
        "a\u{0000}b",
        "line\nbreak",
        "bell\u{0007}",
        "esc\u{001b}[31m",
    ] {
        let response = app
            .post(
                &format!("/api/v1/batches/{batch}/refund"),
                &json!({"note": note}),
            )
            .await;
        let problem = assert_problem(response, 400, "control characters").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("note"),
            "{problem}"
        );
        assert_eq!(app.snapshot().await, before, "{note:?} changed nothing");
    }
    assert_eq!(app.batch_status(&batch).await, "failed");
    assert_eq!(app.balance(&customer).await, "88.00", "not refunded");
    let refunds = app.journal_count("refund").await;
    assert_eq!(refunds, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_largest_order_that_takes_the_bucket_along_settles() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(UP).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let small = app.create_account("small", "4.00").await;
    assert_eq!(app.place_order(&small, "ABAN", "1").await.status(), 201); // pending
    let whale = app.create_account("whale", "4000000.00").await;
    // The largest quantity one order may have: with the pending one, the
    // batch holds more than one order may.
    let batch = app.place_batch(&whale, "1000000").await;
    eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let settled = app.batch(&batch).await;
    assert_eq!(settled["quantity"], "1000001", "{settled}");
    let bought = exchange.order(&batch).await.expect("bought");
    assert_eq!(bought.quantity, "1000001");
    assert_eq!(bought.calls, 1);
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_settle_job_fails_its_batch_so_it_can_be_refunded() {
    use redis::AsyncCommands;

    let app = spawn_app().await;
    let exchange = spawn_exchange(UP).await;
    let customer = app.create_account("c", "20.00").await;
    let batch = app.place_batch(&customer, "3").await;
    // Its job is replaced by one no worker can read (as a bad deploy or a
    // hand edit might leave it).
    let mut conn = app.redis().await;
    let jobs: redis::streams::StreamRangeReply = conn
        .xrange_all(Keys::default().settle(crate::helpers::aban_home()))
        .await
        .unwrap();
    let _: u64 = conn
        .xdel(
            Keys::default().settle(crate::helpers::aban_home()),
            &[&jobs.ids[0].id],
        )
        .await
        .unwrap();
    let _: String = conn
        .xadd(
            Keys::default().settle(crate::helpers::aban_home()),
            "*",
            &[("batch_id", batch.as_str()), ("quantity_units", "lots")],
        )
        .await
        .unwrap();

    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    assert!(exchange.order(&batch).await.is_none(), "never bought");
    let failed = app.batch(&batch).await;
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("unreadable settle job"),
        "{failed}"
    );
    let dead: usize = conn
        .xlen(Keys::default().settle_dead(crate::helpers::aban_home()))
        .await
        .unwrap();
    assert_eq!(dead, 1);
    let refunded = app
        .post(&format!("/api/v1/batches/{batch}/refund"), &json!({}))
        .await;
    assert_eq!(refunded.status(), 200);
    assert_eq!(app.balance(&customer).await, "20.00");
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_batch_gets_attempts_max_calls_again() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, _, batch) = failed_batch(&app, &exchange, 3).await;

    // Replayed while the exchange is still down: three more calls, with
    // backoff, before it fails again.
    let retried = app
        .post(&format!("/api/v1/batches/{batch}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status(), 200);
    eventually("the replay failed after three calls", || async {
        exchange.order(&batch).await.unwrap().calls == 6
            && app.batch_status(&batch).await == "failed"
    })
    .await;
    assert_eq!(app.batch(&batch).await["attempts"], 3);
    assert_eq!(
        app.batch(&batch).await["may_be_filled"],
        false,
        "the exchange answered each call"
    );
    let dead = crate::helpers::stream_entries(
        &mut app.redis().await,
        &Keys::default().settle_dead(crate::helpers::aban_home()),
    )
    .await;
    assert_eq!(
        dead.iter()
            .map(|entry| entry["attempts"].as_str())
            .collect::<Vec<_>>(),
        ["3", "3"]
    );
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_whose_call_timed_out_is_not_refunded_unconfirmed_and_a_retry_finds_its_fill() {
    let app = spawn_app().await;
    // Slower than the workers' exchange timeout (1.5 s): the call times out,
    // and the exchange fills the batch anyway.
    let exchange = spawn_exchange(Faults {
        latency_ms: 1_700,
        ..UP
    })
    .await;
    let (workers, customer, batch) = failed_batch(&app, &exchange, 1).await;
    eventually("the exchange filled it after all", || async {
        exchange.order(&batch).await.unwrap().fill.is_some()
    })
    .await;

    assert_eq!(app.batch(&batch).await["may_be_filled"], true);
    let before = app.snapshot().await;
    let refund = app
        .post(&format!("/api/v1/batches/{batch}/refund"), &json!({}))
        .await;
    let problem = assert_problem(refund, 409, "may have been filled").await;
    assert_eq!(problem["type"], "/problems/may-be-filled");
    assert_eq!(app.snapshot().await, before, "refused: nothing written");

    // The safe path: a retry gets the exchange's first fill back.
    exchange.set_faults(UP).await;
    let retried = app
        .post(&format!("/api/v1/batches/{batch}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status(), 200);
    eventually("the batch is settled", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let bought = exchange.order(&batch).await.unwrap();
    assert_eq!(bought.calls, 2, "{bought:?}");
    assert_eq!(
        app.balance(&customer).await,
        "88.00",
        "charged once, never refunded"
    );
    let audit = app.get_json("/api/v1/audit").await;
    assert_eq!(audit["clean"], true, "{}", audit["report"]);
    workers.stop().await;
}
