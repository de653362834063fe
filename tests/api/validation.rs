//! Bad input gets a clear 4xx problem+json naming the problem, and changes nothing.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test(flavor = "multi_thread")]
async fn bad_orders_are_refused_with_a_problem_that_names_it_and_change_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("victim", "100.00").await;
    app.place_order(&customer, "ABAN", "1").await; // something in the bucket
    let unknown = "01900000-0000-7000-8000-000000000000";
    let order = |quantity: serde_json::Value| json!({"account_id": customer, "symbol": "ABAN", "quantity": quantity});
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "zero quantity",
            order(json!("0")).to_string(),
            400,
            "greater than zero",
        ),
        (
            "negative quantity",
            order(json!("-1")).to_string(),
            400,
            "must not be negative",
        ),
        (
            "negative number",
            order(json!(-1.5)).to_string(),
            400,
            "must not be negative",
        ),
        (
            "nine decimals",
            order(json!("0.123456789")).to_string(),
            400,
            "more than 8 decimal places",
        ),
        (
            "absurd quantity",
            order(json!("1e30")).to_string(),
            400,
            "larger than the maximum",
        ),
        (
            "absurd number",
            format!(r#"{{"account_id":"{customer}","symbol":"ABAN","quantity":1e400}}"#),
            400,
            "larger than the maximum",
        ),
        (
            "huge integer",
            order(json!("99999999999999999999999999999999999")).to_string(),
            400,
            "larger than the maximum",
        ),
        (
            "not a number",
            order(json!("three")).to_string(),
            400,
            "not a decimal number",
        ),
        (
            "quantity as bool",
            order(json!(true)).to_string(),
            400,
            "quantity",
        ),
        (
            "unknown symbol",
            json!({"account_id": customer, "symbol": "DOGE", "quantity": "1"}).to_string(),
            422,
            "DOGE",
        ),
        (
            "malformed symbol",
            json!({"account_id": customer, "symbol": "aban", "quantity": "1"}).to_string(),
            400,
            "not a symbol",
        ),
        (
            "symbol as number",
            json!({"account_id": customer, "symbol": 5, "quantity": "1"}).to_string(),
            400,
            "symbol",
        ),
        (
            "unknown account",
            json!({"account_id": unknown, "symbol": "ABAN", "quantity": "1"}).to_string(),
            422,
            "not found",
        ),
        (
            "malformed account",
            json!({"account_id": "abc", "symbol": "ABAN", "quantity": "1"}).to_string(),
            400,
            "not a valid id",
        ),
        (
            "account as number",
            json!({"account_id": 123, "symbol": "ABAN", "quantity": "1"}).to_string(),
            400,
            "account_id",
        ),
        (
            "system account",
            json!({"account_id": "@bank", "symbol": "ABAN", "quantity": "1"}).to_string(),
            422,
            "system account",
        ),
        (
            "missing quantity",
            json!({"account_id": customer, "symbol": "ABAN"}).to_string(),
            400,
            "quantity",
        ),
        (
            "missing account",
            json!({"symbol": "ABAN", "quantity": "1"}).to_string(),
            400,
            "account_id",
        ),
        (
            "unknown field",
            json!({"account_id": customer, "symbol": "ABAN", "quantity": "1", "price": "0.01"})
                .to_string(),
            400,
            "unknown field",
        ),
        (
            "malformed json",
            r#"{"account_id": "#.to_owned(),
            400,
            "parse",
        ),
        ("array body", "[]".to_owned(), 400, "PlaceOrderRequest"),
        ("empty body", String::new(), 400, "parse"),
    ];
    let before = app.snapshot().await;
    for (name, body, status, detail) in cases {
        let response = app
            .client
            .post(app.url("/api/v1/orders"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{name}");
        assert_problem(response, status, detail).await;
        assert_eq!(app.snapshot().await, before, "{name} changed nothing");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_untyped_bodies_are_refused() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    let big = json!({"name": "x".repeat(20_000), "balance": "1"}).to_string();
    let response = app
        .client
        .post(app.url("/api/v1/accounts"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "larger than").await;
    // A chunked body announces no length; it is cut off all the same.
    let stream = futures_stream(big);
    let response = app
        .client
        .post(app.url("/api/v1/accounts"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "larger than").await;
    let response = app
        .client
        .post(app.url("/api/v1/accounts"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/problem+json")
    );
    assert_eq!(app.snapshot().await, before);
}

fn futures_stream(
    body: String,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(1024)
        .map(|chunk| Ok(chunk.to_vec()))
        .collect();
    tokio_stream::iter(chunks)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_accounts_and_headers_are_refused() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    let cases = [
        (json!({"name": ""}), 400, "name"),
        (json!({"name": "  "}), 400, "1 to 200 characters"),
        (
            json!({"name": "a", "balance": "-5"}),
            400,
            "must not be negative",
        ),
        (
            json!({"name": "a", "balance": "1.001"}),
            400,
            "more than 2 decimal places",
        ),
        (
            json!({"name": "a", "balance": "1000000000.01"}),
            400,
            "larger than the maximum",
        ),
        (
            json!({"balance": "1"}),
            400,
            r#"Type "name" expects an input value"#,
        ),
        (
            json!({"name": 7}),
            400,
            r#"Expected input type "name", found 7"#,
        ),
    ];
    for (body, status, detail) in cases {
        assert_problem(app.post("/api/v1/accounts", &body).await, status, detail).await;
    }
    let response = app
        .post_with_key("/api/v1/accounts", "has space", &json!({"name": "a"}))
        .await;
    assert_problem(response, 400, "Idempotency-Key").await;
    assert_problem(app.get("/api/v1/accounts?limit=1000").await, 400, "limit").await;
    assert_problem(app.get("/api/v1/accounts?limit=0").await, 400, "limit").await;
    assert_problem(app.get("/api/v1/accounts?cursor=nope").await, 400, "cursor").await;
    assert_problem(app.get("/api/v1/nowhere").await, 404, "").await;
    assert_problem(
        app.get("/api/v1/accounts/@nobody").await,
        400,
        "system account",
    )
    .await;
    assert_eq!(app.snapshot().await, before);
}
