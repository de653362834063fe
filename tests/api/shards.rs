//! The sharded key layout on one Redis: the shard count is fixed once data
//! exists, data of an earlier layout is refused with the way out, and money
//! moves between customers on different shards as it did on one.

use redis::AsyncCommands;
use serde_json::Value;
use tally::app::Application;
use tally::config::RedisSettings;
use tally::redis_server::RedisServer;
use tally::store::Store;

use crate::helpers::{redis_snapshot, spawn_app, spawn_app_on};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");

#[tokio::test(flavor = "multi_thread")]
async fn a_process_with_another_shard_count_refuses_the_data() {
    let app = spawn_app().await; // 16 shards, the default, stamped on first use
    let audit = |shards: &str| {
        std::process::Command::new(TALLY)
            .args(["audit", "--redis-url", &app.redis.url()])
            .env("TALLY_SHARDS", shards)
            .output()
            .unwrap()
    };
    let refused = audit("4");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("TALLY_SHARDS=16"), "{message}");
    assert!(audit("16").status.success());

    let mut settings = RedisSettings::for_url(&app.redis.url());
    settings.shards = 3;
    let opened = Store::open(&settings).await;
    let message = format!("{:#}", opened.err().expect("refused"));
    assert!(message.contains("TALLY_SHARDS=16"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn data_of_the_single_node_layout_is_refused_with_the_way_out() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // What every earlier tally wrote first: @bank, unsharded.
    let _: () = conn
        .hset_multiple("tally:account:@bank", &[("id", "@bank"), ("balance", "0")])
        .await
        .unwrap();
    let before = redis_snapshot(&mut conn).await;
    let mut settings = RedisSettings::for_url(&redis.url());
    settings.shards = 16;
    let built = Application::build(tally::config::ServeArgs {
        redis: settings,
        ledger: Default::default(),
        api: tally::config::ApiSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        access: tally::config::AccessSettings {
            api_key_pepper: Some(crate::helpers::TEST_PEPPER.to_owned()),
            ..Default::default()
        },
    })
    .await;
    let message = format!("{:#}", built.err().expect("refused"));
    assert!(message.contains("tally migrate"), "{message}");
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");
}

/// The mission's example across shards: three customers, each on a shard
/// of their own, order 1 ABAN (4.00) each; the third order closes the one
/// batch for 3, on ABAN's home shard.
#[tokio::test(flavor = "multi_thread")]
async fn customers_on_three_shards_fill_one_bucket() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let app = spawn_app_on(redis, |_| {}).await;
    let a = app.create_account_off("a", "10.00", &[]).await;
    let b = app.create_account_off("b", "10.00", &[&a]).await;
    let c = app.create_account_off("c", "10.00", &[&a, &b]).await;
    let mut answers = Vec::new();
    for customer in [&a, &b, &c] {
        let response = app.place_order(customer, "ABAN", "1").await;
        assert_eq!(response.status(), 201);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert!(
        answers[..2]
            .iter()
            .all(|answer| answer["status"] == "pending")
    );
    assert_eq!(answers[2]["status"], "settling");
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1, "one settle job");
    assert_eq!(jobs[0]["quantity"], "3.00000000");
    assert_eq!(
        jobs[0]["batch_id"],
        answers[2]["batch_id"].as_str().unwrap()
    );
    // Each debit credited @exchange on its customer's shard; the batch is on
    // ABAN's home shard, and @exchange is their sum.
    assert_eq!(app.balance("@exchange").await, "12.00");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}
