//! Bad input gets a clear 4xx problem+json naming the problem, and changes nothing.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app, spawn_app_with};

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
            400,
            "is a system account",
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

#[tokio::test(flavor = "multi_thread")]
async fn money_with_too_many_decimals_is_refused_not_rounded() {
    let app = spawn_app().await;
    let customer = app.create_account("buyer", "100.00").await;
    let order = |quantity: &str| {
        format!(r#"{{"account_id":"{customer}","symbol":"ABAN","quantity":{quantity}}}"#)
    };
    let account = |balance: &str| format!(r#"{{"name":"a","balance":{balance}}}"#);
    // Past 28 digits a decimal parser rounds: these used to become 3 and 12.00.
    let cases = [
        (
            "/api/v1/orders",
            order(r#""2.999999999999999999999999999999""#),
            "more than 8 decimal places",
        ),
        (
            "/api/v1/orders",
            order(r#""1e-30""#),
            "more than 8 decimal places",
        ),
        (
            "/api/v1/orders",
            order("1e-30"),
            "more than 8 decimal places",
        ),
        ("/api/v1/orders", order(r#""0e999""#), "greater than zero"),
        (
            "/api/v1/accounts",
            account(r#""12.0000000000000000000000000001""#),
            "more than 2 decimal places",
        ),
        (
            "/api/v1/accounts",
            account("12.0000000000000000000000000001"),
            "more than 2 decimal places",
        ),
        (
            "/api/v1/accounts",
            account(r#""1e-30""#),
            "more than 2 decimal places",
        ),
    ];
    let before = app.snapshot().await;
    for (path, body, detail) in cases {
        let response = app
            .client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_problem(response, 400, detail).await;
        assert_eq!(app.snapshot().await, before, "{body} changed nothing");
    }
    assert_eq!(app.balance(&customer).await, "100.00");
    assert_eq!(app.journal().await.len(), 1, "only the opening balance");
    let accounts = app.get_json("/api/v1/accounts").await;
    assert_eq!(accounts["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn non_ascii_or_repeated_idempotency_keys_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("buyer", "100.00").await;
    let other = app.create_account("seller", "0.00").await;
    let wallet = format!("/api/v1/accounts/{customer}/transactions");
    let cases = [
        (
            "/api/v1/orders",
            json!({"account_id": customer, "symbol": "ABAN", "quantity": "3"}),
        ),
        ("/api/v1/accounts", json!({"name": "a", "balance": "1.00"})),
        (
            "/api/v1/transfers",
            json!({"src_account_id": customer, "dst_account_id": other,
                   "amount": "1.00", "direction": "debit"}),
        ),
        (
            "/api/v1/bank-transactions",
            json!({"account_id": customer, "amount": "1.00", "direction": "debit", "reason": "fee"}),
        ),
        (&wallet, json!({"kind": "withdrawal", "amount": "1.00"})),
        (
            "/api/v1/advances",
            json!({"account_id": customer, "amount": "12.00"}),
        ),
    ];
    let non_ascii = reqwest::header::HeaderValue::from_bytes("clé-1".as_bytes()).unwrap();
    let before = app.snapshot().await;
    let journal_before = app.journal().await.len();
    for (path, body) in cases {
        // poem-openapi's header parameter would read this as no key at all.
        let response = app
            .client
            .post(app.url(path))
            .header("Idempotency-Key", non_ascii.clone())
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 400, "visible ASCII").await;
        assert_eq!(
            problem["type"], "/problems/invalid-idempotency-key",
            "{path}"
        );
        // ... and this as the first key only.
        let response = app
            .client
            .post(app.url(path))
            .header("Idempotency-Key", "retry-1")
            .header("Idempotency-Key", "retry-2")
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 400, "at most one Idempotency-Key").await;
        assert_eq!(
            problem["type"], "/problems/invalid-idempotency-key",
            "{path}"
        );
        assert_eq!(app.snapshot().await, before, "{path} changed nothing");
    }
    assert_eq!(app.balance(&customer).await, "100.00");
    assert_eq!(app.journal().await.len(), journal_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_arrives_too_slowly_gets_a_408_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const REQUEST_TIMEOUT_MS: u64 = 500;
    let app = spawn_app_with(|settings| settings.api.request_timeout_ms = REQUEST_TIMEOUT_MS).await;
    let before = app.snapshot().await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    // 100 bytes announced, 12 sent, and the connection left open.
    let head = format!(
        "POST /api/v1/accounts HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        app.admin_key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(br#"{"name":"a","#).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("an answer before the client gives up")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).to_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(answer.contains("/problems/body-timeout"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(REQUEST_TIMEOUT_MS / 2));
    assert_eq!(app.snapshot().await, before, "nothing written");
    let accounts = app.get_json("/api/v1/accounts").await;
    assert_eq!(accounts["items"], json!([]));
}

/// Optional fields are left out when they have no value, as the spec says
/// ("absent"), never sent as `null`: a generated client trips over a null
/// in a field its schema calls non-nullable.
#[tokio::test(flavor = "multi_thread")]
async fn answers_leave_out_absent_fields_rather_than_send_null() {
    let app = spawn_app().await;
    let customer = app.create_account("a", "100.00").await;
    // Below the minimum: a pending order, with no batch and no error yet.
    let order: serde_json::Value = app
        .place_order(&customer, "ABAN", "1")
        .await
        .json()
        .await
        .unwrap();
    let accepted: serde_json::Value = app
        .post(
            &format!("/api/v1/accounts/{customer}/transactions"),
            &json!({"kind": "deposit", "amount": "1.00"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let paths = [
        format!("/api/v1/orders/{}", order["id"].as_str().unwrap()),
        "/api/v1/accounts?limit=100".to_owned(),
        format!("/api/v1/accounts/{customer}/transactions"),
        format!(
            "/api/v1/accounts/{customer}/transactions/{}",
            accepted["id"].as_str().unwrap()
        ),
        "/api/v1/transactions?limit=100".to_owned(),
        "/api/v1/batches?status=failed".to_owned(),
        "/api/v1/keys?limit=100".to_owned(),
    ];
    for path in paths {
        let text = app.get(&path).await.text().await.unwrap();
        assert!(!text.contains("null"), "GET {path}: {text}");
    }
    assert!(order.get("batch_id").is_none(), "{order}");
}

/// Requests hold no null either: no field is nullable in the spec, so
/// `"merchant": null` is refused rather than read as absent.
#[tokio::test(flavor = "multi_thread")]
async fn a_null_in_a_request_is_refused_and_writes_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("a", "100.00").await;
    let before = app.snapshot().await;
    let cases = [
        (
            format!("/api/v1/accounts/{customer}/transactions"),
            json!({"kind": "deposit", "amount": "1.00", "merchant": null}),
            "`merchant` is null",
        ),
        (
            "/api/v1/keys".to_owned(),
            json!({"role": "ops", "account_id": null}),
            "`account_id` is null",
        ),
        (
            "/api/v1/accounts".to_owned(),
            json!({"name": "b", "balance": null}),
            "`balance` is null",
        ),
    ];
    for (path, body, detail) in cases {
        let problem = assert_problem(app.post(&path, &body).await, 400, detail).await;
        assert_eq!(problem["type"], "/problems/null-value", "{body}");
    }
    assert_eq!(app.snapshot().await, before);
}
