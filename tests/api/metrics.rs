//! `/metrics`: Prometheus text read from Redis at scrape time and from the
//! API process's own counters, and still answered while Redis is down.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tally::exchange::sim::Faults;

use crate::helpers::{
    TestApp, eventually, spawn_app, spawn_exchange, spawn_workers, test_worker_settings,
};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn scrape(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], CONTENT_TYPE);
    response.text().await.unwrap()
}

/// The value of one series (`name{labels}` exactly as written), if present.
fn value(body: &str, series: &str) -> Option<u64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(rest.parse().expect("an integer sample"))
    })
}

fn requests(body: &str, class: &str) -> u64 {
    let series = format!("tally_http_requests_total{{status_class=\"{class}\"}}");
    value(body, &series).expect("the class is always written")
}

/// Every sample belongs to a family announced with `# HELP` and `# TYPE`.
fn assert_well_formed(body: &str) {
    let mut helped = HashSet::new();
    let mut typed = HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with("tally_"), "prefixed: {line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| typed.contains(*family))
                .unwrap_or(name);
            assert!(helped.contains(family), "HELP before {line}");
            assert!(typed.contains(family), "TYPE before {line}");
            let sample = line.rsplit(' ').next().unwrap();
            assert!(!sample.is_empty(), "a value: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_prometheus_text_with_help_and_type_outside_the_spec() {
    let app = spawn_app().await;
    let body = scrape(&app).await;
    assert_well_formed(&body);
    assert_eq!(value(&body, "tally_redis_up"), Some(1));
    assert_eq!(
        value(&body, "tally_stream_length{stream=\"settle\"}"),
        Some(0)
    );
    assert_eq!(value(&body, "tally_failed_batches"), Some(0));
    assert_eq!(value(&body, "tally_batches_settled_total"), Some(0));
    let spec = app.get("/openapi.yaml").await.text().await.unwrap();
    assert!(!spec.contains("/metrics"), "like /health, not in the spec");
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_move_the_settle_stream_the_settled_count_and_the_request_counters() {
    let app = spawn_app().await;
    let customer = app.create_account("metered", "100.00").await;
    let before = scrape(&app).await;
    assert_eq!(requests(&before, "2xx"), 1, "the account");

    for quantity in ["3", "3", "3", "1"] {
        assert_eq!(
            app.place_order(&customer, "ABAN", quantity).await.status(),
            201
        );
    }
    assert_eq!(app.get("/api/v1/no-such-thing").await.status(), 404);
    let after = scrape(&app).await;
    assert_well_formed(&after);
    assert_eq!(
        value(&after, "tally_stream_length{stream=\"settle\"}"),
        Some(3),
        "three orders of $12 closed a batch each; the $4 one waits"
    );
    assert_eq!(
        requests(&after, "2xx"),
        6,
        "the account, a scrape, four orders"
    );
    assert_eq!(requests(&after, "4xx"), 1, "the unknown route");
    assert_eq!(
        value(&after, "tally_http_request_duration_seconds_count"),
        Some(7)
    );
    assert_eq!(
        value(
            &after,
            "tally_http_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(7)
    );

    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("the metrics show three batches settled", || async {
        value(&scrape(&app).await, "tally_batches_settled_total") == Some(3)
    })
    .await;
    workers.stop().await;
    let settled = scrape(&app).await;
    let group = "{stream=\"settle\",group=\"settlers\"}";
    assert_eq!(
        value(&settled, &format!("tally_stream_group_pending{group}")),
        Some(0)
    );
    assert_eq!(
        value(&settled, &format!("tally_stream_group_lag{group}")),
        Some(0)
    );
    assert!(value(&settled, &format!("tally_stream_group_consumers{group}")).unwrap() >= 1);
    assert_eq!(
        value(&settled, "tally_dead_letter_length{stream=\"settle\"}"),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_answer_redis_down_when_redis_is_gone() {
    let mut app = spawn_app().await;
    assert_eq!(value(&scrape(&app).await, "tally_redis_up"), Some(1));
    app.redis.kill().await.unwrap();

    let started = Instant::now();
    let body = scrape(&app).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the scrape's bound, took {:?}",
        started.elapsed()
    );
    assert_well_formed(&body);
    assert_eq!(value(&body, "tally_redis_up"), Some(0));
    assert!(
        !body.contains("\ntally_stream_length{"),
        "no Redis readings without Redis:\n{body}"
    );
    assert_eq!(
        requests(&body, "2xx"),
        1,
        "the process counters still answer"
    );
}
