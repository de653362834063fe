//! Accounts: opening balances are journaled from @bank; listing pages by id.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test(flavor = "multi_thread")]
async fn an_opening_balance_is_funded_by_the_bank_and_journaled() {
    let app = spawn_app().await;
    let response = app
        .post(
            "/api/v1/accounts",
            &json!({"name": "alice", "balance": 100}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let account: Value = response.json().await.unwrap();
    assert_eq!(account["balance"], "100.00");
    assert_eq!(account["name"], "alice");
    assert_eq!(
        location,
        format!("/api/v1/accounts/{}", account["id"].as_str().unwrap())
    );
    assert_eq!(app.balance("@bank").await, "-100.00");

    let journal = app.journal().await;
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0]["kind"], "opening_balance");
    assert_eq!(journal[0]["debit"], "@bank");
    assert_eq!(journal[0]["credit"], account["id"].as_str().unwrap());
    assert_eq!(journal[0]["amount"], "10000");

    // No opening balance: nothing moves, nothing is journaled.
    let empty = app.create_account("bob", "0").await;
    assert_eq!(app.balance(&empty).await, "0.00");
    assert_eq!(app.journal().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_page_in_creation_order() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create_account(&format!("customer {i}"), "1.00").await);
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/accounts?limit=2".to_owned();
    for _ in 0..10 {
        let page = app.get_json(&path).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/accounts?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn account_creation_is_idempotent_per_key() {
    let app = spawn_app().await;
    let request = |body: Value| {
        let app = &app;
        async move { app.post_with_key("/api/v1/accounts", "open-1", &body).await }
    };
    let first: Value = request(json!({"name": "a", "balance": "5"}))
        .await
        .json()
        .await
        .unwrap();
    let second: Value = request(json!({"name": "a", "balance": "5.00"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        first["id"], second["id"],
        "the same amount, spelled differently, is the same request"
    );
    assert_eq!(app.balance("@bank").await, "-5.00");
    let conflict = request(json!({"name": "a", "balance": "6"})).await;
    assert_problem(conflict, 409, "another request").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn system_accounts_are_readable() {
    let app = spawn_app().await;
    for id in ["@bank", "@exchange", "@card"] {
        let account = app.get_json(&format!("/api/v1/accounts/{id}")).await;
        assert_eq!(account["balance"], "0.00");
    }
}
