//! Many concurrent orders against balances that cover only part of them:
//! nothing negative, every cent in exactly one place, the audit clean.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tally::store::keys::Keys;

use redis::AsyncCommands;
use serde_json::Value;
use tally::domain::{Amount, Symbol};

use crate::helpers::spawn_app;

const CUSTOMERS: usize = 50;
const ORDERS: usize = 500;

fn cents(text: &str) -> i64 {
    let negative = text.starts_with('-');
    let amount = Amount::parse(text.trim_start_matches('-')).unwrap().cents();
    if negative { -amount } else { amount }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_orders_never_overdraw_and_every_cent_is_in_one_place() {
    let app = Arc::new(spawn_app().await);
    let mut customers = Vec::new();
    for i in 0..CUSTOMERS {
        // 10 orders each, averaging about 4.00: 20.00 covers roughly half.
        customers.push(app.create_account(&format!("c{i}"), "20.00").await);
    }
    let quantities = ["0.5", "1", "1.25", "2", "3"]; // 2.00 to 12.00: some above the minimum
    let mut tasks = Vec::new();
    for i in 0..ORDERS {
        let app = app.clone();
        let customer = customers[i % CUSTOMERS].clone();
        let quantity = quantities[(i * 7) % quantities.len()];
        tasks.push(tokio::spawn(async move {
            let response = app.place_order(&customer, "ABAN", quantity).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (customer, status, body)
        }));
    }
    let mut accepted: HashMap<String, i64> = HashMap::new();
    let mut spent: BTreeMap<String, i64> = BTreeMap::new();
    for task in tasks {
        let (customer, status, body) = task.await.unwrap();
        match status {
            201 => {
                let cost = cents(body["cost"].as_str().unwrap());
                accepted.insert(body["id"].as_str().unwrap().to_owned(), cost);
                *spent.entry(customer).or_default() += cost;
            }
            422 => assert_eq!(body["type"], "/problems/insufficient-funds"),
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        accepted.len() > ORDERS / 4 && accepted.len() < ORDERS,
        "balances covered part: {}",
        accepted.len()
    );

    // No balance below zero, and each customer paid exactly for their accepted orders.
    for customer in &customers {
        let balance = cents(&app.balance(customer).await);
        assert!(balance >= 0, "{customer} is at {balance}");
        assert_eq!(balance, 2000 - spent.get(customer).copied().unwrap_or(0));
    }

    // Each accepted order is in exactly one job or in the bucket.
    let jobs = app.settle_jobs().await;
    let mut conn = app.redis().await;
    let bucket_orders: Vec<String> = conn
        .lrange(
            Keys::default().bucket_orders(&Symbol::parse("ABAN").unwrap()),
            0,
            -1,
        )
        .await
        .unwrap();
    let mut placed: HashMap<String, usize> = HashMap::new();
    let mut jobs_value = 0;
    for job in &jobs {
        let job_value: i64 = job["value_cents"].parse().unwrap();
        assert!(job_value >= 1000, "a job below the minimum: {job:?}");
        let orders: Vec<&str> = job["orders"].split(',').collect();
        assert_eq!(orders.len().to_string(), job["order_count"]);
        assert_eq!(
            job_value,
            orders.iter().map(|id| accepted[*id]).sum::<i64>(),
            "job value is its orders' costs"
        );
        for id in orders {
            *placed.entry(id.to_owned()).or_default() += 1;
        }
        jobs_value += job_value;
    }
    for id in &bucket_orders {
        *placed.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(placed.len(), accepted.len());
    assert!(
        placed.values().all(|count| *count == 1),
        "an order in two places"
    );
    assert!(
        accepted.keys().all(|id| placed.contains_key(id)),
        "an order lost"
    );

    // Total debits equal the value of all jobs plus the bucket.
    let bucket_value = cents(app.bucket("ABAN").await["value"].as_str().unwrap());
    assert!(bucket_value < 1000);
    let debits: i64 = accepted.values().sum();
    assert_eq!(debits, jobs_value + bucket_value);
    assert_eq!(cents(&app.balance("@exchange").await), debits);

    // All balances sum to zero, and the audit agrees.
    let report = tally::audit::run(&app.store).await.unwrap();
    assert_eq!(report.balances_sum_cents, 0);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.journal_entries as usize, CUSTOMERS + accepted.len());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["audit", "--redis-url", &app.redis.url()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(app.assert_account_lists().await > 0);
}
