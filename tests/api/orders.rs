//! The purchase-order flow: debit at once, bucket below the minimum, one
//! settle job when the threshold is crossed.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test(flavor = "multi_thread")]
async fn order_at_or_above_minimum_settles_at_once() {
    let app = spawn_app().await;
    let customer = app.create_account("alice", "100.00").await;

    let response = app.place_order(&customer, "ABAN", "3").await;

    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["cost"], "12.00");
    assert_eq!(order["price"], "4.00");
    assert_eq!(order["quantity"], "3");
    assert_eq!(order["status"], "settling");
    assert_eq!(app.balance(&customer).await, "88.00");
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["symbol"], "ABAN");
    assert_eq!(jobs[0]["quantity"], "3.00000000");
    assert_eq!(jobs[0]["value_cents"], "1200");
    assert_eq!(jobs[0]["orders"], order["id"].as_str().unwrap());
    assert_eq!(jobs[0]["batch_id"], order["batch_id"].as_str().unwrap());
    assert_eq!(app.balance("@exchange").await, "12.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn small_orders_wait_in_the_bucket_until_together_they_reach_the_minimum() {
    let app = spawn_app().await;
    let mut customers = Vec::new();
    for name in ["a", "b", "c"] {
        customers.push(app.create_account(name, "50.00").await);
    }

    let mut order_ids = Vec::new();
    for (i, customer) in customers.iter().enumerate() {
        let response = app.place_order(customer, "ABAN", "1").await;
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        order_ids.push(order["id"].as_str().unwrap().to_owned());
        assert_eq!(
            app.balance(customer).await,
            "46.00",
            "debited at response time"
        );
        if i < 2 {
            assert_eq!(order["status"], "pending");
            assert!(
                app.settle_jobs().await.is_empty(),
                "no job after order {}",
                i + 1
            );
            let bucket = app.bucket("ABAN").await;
            assert_eq!(bucket["value"], if i == 0 { "4.00" } else { "8.00" });
        } else {
            assert_eq!(order["status"], "settling");
        }
    }

    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["quantity"], "3.00000000");
    assert_eq!(jobs[0]["orders"], order_ids.join(","));
    let bucket = app.bucket("ABAN").await;
    assert_eq!(
        bucket,
        json!({"symbol": "ABAN", "value": "0.00", "quantity": "0", "order_count": 0})
    );
    // Every order now reports the batch it travels in.
    let batch_id = jobs[0]["batch_id"].clone();
    for id in &order_ids {
        let order = app.get_json(&format!("/api/v1/orders/{id}")).await;
        assert_eq!(order["status"], "settling");
        assert_eq!(order["batch_id"], batch_id.as_str());
    }
    let batch = app.get_json(&format!("/api/v1/batches/{batch_id}")).await;
    assert_eq!(batch["quantity"], "3");
    assert_eq!(batch["value"], "12.00");
    assert_eq!(batch["order_ids"], json!(order_ids));
    assert_eq!(batch["status"], "settling");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_order_takes_the_pending_bucket_along() {
    let app = spawn_app().await;
    let small = app.create_account("small", "20.00").await;
    let large = app.create_account("large", "20.00").await;
    let mut order_ids = Vec::new();
    for _ in 0..2 {
        let order: Value = app
            .place_order(&small, "ABAN", "1")
            .await
            .json()
            .await
            .unwrap();
        order_ids.push(order["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(app.bucket("ABAN").await["value"], "8.00");

    let order: Value = app
        .place_order(&large, "ABAN", "3")
        .await
        .json()
        .await
        .unwrap();
    order_ids.push(order["id"].as_str().unwrap().to_owned());

    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["quantity"], "5.00000000");
    assert_eq!(jobs[0]["value_cents"], "2000");
    assert_eq!(jobs[0]["orders"], order_ids.join(","));
    assert_eq!(app.bucket("ABAN").await["order_count"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_balance_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("poor", "5.00").await;
    app.place_order(&customer, "ABAN", "1").await; // 4.00 into the bucket
    let before = app.snapshot().await;

    let response = app.place_order(&customer, "ABAN", "1").await;

    let problem = assert_problem(response, 422, "insufficient funds").await;
    assert_eq!(problem["type"], "/problems/insufficient-funds");
    assert_eq!(
        app.snapshot().await,
        before,
        "balance, bucket, journal and stream unchanged"
    );
    assert_eq!(app.balance(&customer).await, "1.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn cost_rounds_up_to_the_cent() {
    let app = spawn_app().await;
    let customer = app.create_account("c", "1.00").await;
    let order: Value = app
        .place_order(&customer, "ABAN", "0.00000001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(order["cost"], "0.01");
    assert_eq!(app.balance(&customer).await, "0.99");
}

#[tokio::test(flavor = "multi_thread")]
async fn quantities_are_parsed_exactly_from_numbers_and_strings() {
    let app = spawn_app().await;
    let customer = app.create_account("exact", "100.00").await;
    // As a float, 1.00000001 is 1.0000000099999999: a float parse would lose a unit.
    for raw in ["1.00000001", "\"1.00000001\""] {
        let body = format!(r#"{{"account_id":"{customer}","symbol":"ABAN","quantity":{raw}}}"#);
        let response = app
            .client
            .post(app.url("/api/v1/orders"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{raw}");
        let order: Value = response.json().await.unwrap();
        assert_eq!(order["quantity"], "1.00000001", "{raw}");
        assert_eq!(order["cost"], "4.01", "{raw}");
    }
    for raw in ["1.5", "\"1.5\""] {
        let body = format!(r#"{{"account_id":"{customer}","symbol":"ABAN","quantity":{raw}}}"#);
        let order: Value = app
            .client
            .post(app.url("/api/v1/orders"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(order["quantity"], "1.5");
        assert_eq!(order["cost"], "6.00");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_and_body_give_the_same_order_and_one_debit() {
    let app = spawn_app().await;
    let customer = app.create_account("idem", "100.00").await;
    let body = json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"});
    let send = |key: &'static str, body: Value| {
        let app = &app;
        async move { app.post_with_key("/api/v1/orders", key, &body).await }
    };

    let first = send("key-1", body.clone()).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let second = send("key-1", body.clone()).await;
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.unwrap();

    assert_eq!(first["id"], second["id"]);
    assert_eq!(app.balance(&customer).await, "88.00");
    assert_eq!(app.settle_jobs().await.len(), 1);
    let orders = app.journal_count("order").await;
    assert_eq!(orders, 1);

    let before = app.snapshot().await;
    let other_body = json!({"account_id": customer, "symbol": "ABAN", "quantity": "4"});
    let conflict = send("key-1", other_body).await;
    assert_problem(conflict, 409, "another request").await;
    assert_eq!(app.snapshot().await, before);

    // A new key is a new order.
    let third: Value = send("key-2", body).await.json().await.unwrap();
    assert_ne!(third["id"], first["id"]);
    assert_eq!(app.balance(&customer).await, "76.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_and_batches_are_readable_and_unknown_ones_are_404() {
    let app = spawn_app().await;
    let customer = app.create_account("reader", "10.00").await;
    let order: Value = app
        .place_order(&customer, "ABAN", "1")
        .await
        .json()
        .await
        .unwrap();
    let fetched = app
        .get_json(&format!("/api/v1/orders/{}", order["id"].as_str().unwrap()))
        .await;
    assert_eq!(fetched, order);
    assert_eq!(fetched["status"], "pending");
    assert!(fetched["batch_id"].is_null());

    let unknown = "01900000-0000-7000-8000-000000000000";
    assert_problem(
        app.get(&format!("/api/v1/orders/{unknown}")).await,
        404,
        "not found",
    )
    .await;
    assert_problem(
        app.get(&format!("/api/v1/batches/{unknown}")).await,
        404,
        "not found",
    )
    .await;
    assert_problem(app.get("/api/v1/orders/42").await, 400, "not a valid id").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prices_list_the_configured_symbols_and_minimum() {
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.ledger.prices = tally::config::PriceList::parse("ABAN=4.00,BTC=65000.50").unwrap();
    })
    .await;
    let prices = app.get_json("/api/v1/prices").await;
    assert_eq!(
        prices,
        json!({
            "prices": [{"symbol": "ABAN", "price": "4.00"}, {"symbol": "BTC", "price": "65000.50"}],
            "exchange_minimum": "10.00"
        })
    );
}
