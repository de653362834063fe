//! Wallet transactions through the queue, the error stream, and accounting
//! notifications delivered to a real webhook receiver.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally::store::keys::Keys;

use poem::web::Data;
use poem::{EndpointExt, Request, Route, Server, handler, post};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::config::WorkerSettings;
use tally::exchange::sim::Faults;

use crate::helpers::{
    TestApp, assert_problem, eventually, pending_count, set_maxmemory, spawn_app, spawn_exchange,
    spawn_workers, stream_entries, test_worker_settings, worker_process,
};

async fn accept(app: &TestApp, account: &str, kind: &str, amount: &str) -> String {
    let body = json!({"kind": kind, "amount": amount});
    let response = app
        .post(&format!("/api/v1/accounts/{account}/transactions"), &body)
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["status"], "queued");
    accepted["id"].as_str().unwrap().to_owned()
}

async fn wallet_drained(app: &TestApp, accounts: &[String]) -> bool {
    let mut conn = app.redis().await;
    for account in accounts {
        let id = tally::domain::AccountId::parse(account).unwrap();
        let queued: usize = conn.llen(Keys::default().wallet_queue(&id)).await.unwrap();
        if queued > 0 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deposits_and_withdrawals_apply_in_acceptance_order_across_four_workers() {
    let app = Arc::new(spawn_app().await);
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(
        &app,
        WorkerSettings {
            consumers: 4,
            ..test_worker_settings(&exchange)
        },
    );
    let mut accounts = Vec::new();
    for i in 0..20 {
        accounts.push(app.create_account(&format!("w{i}"), "0").await);
    }
    let mut tasks = Vec::new();
    for account in accounts.clone() {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for pair in 0..50 {
                let amount = format!("{}.{:02}", 1 + pair % 40, pair % 100);
                ids.push(accept(&app, &account, "deposit", &amount).await);
                ids.push(accept(&app, &account, "withdrawal", &amount).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    assert_eq!(ids.len(), 2_000);
    eventually("every transaction is applied", || {
        wallet_drained(&app, &accounts)
    })
    .await;

    let mut conn = app.redis().await;
    let mut workers_seen = HashSet::new();
    for id in &ids {
        let txn = tally::store::wallet::get(&mut conn, &Keys::default(), id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(txn.status, "completed", "{id}: {:?}", txn.reason);
        assert_eq!(
            txn.applied_seq,
            Some(txn.accepted_seq),
            "applied in the order accepted"
        );
        workers_seen.insert(txn.worker.unwrap());
    }
    assert!(
        workers_seen.len() > 1,
        "several workers shared the accounts: {workers_seen:?}"
    );
    for account in &accounts {
        assert_eq!(app.balance(account).await, "0.00");
    }
    let errors = app.all_length(Keys::wallet_errors).await;
    assert_eq!(errors, 0, "no rejection for funds");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawal_beyond_the_balance_is_rejected_with_a_reason() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("w", "10.00").await;
    let journal_before = app.journal().await.len();
    let id = accept(&app, &account, "withdrawal", "10.01").await;
    let path = format!("/api/v1/accounts/{account}/transactions/{id}");
    eventually("the withdrawal is decided", || async {
        app.get_json(&path).await["status"] != "queued"
    })
    .await;
    let txn = app.get_json(&path).await;
    assert_eq!(
        (txn["status"].as_str(), txn["reason"].as_str()),
        (Some("rejected"), Some("insufficient funds"))
    );
    assert_eq!(app.balance(&account).await, "10.00");
    let errors = app.all_entries(Keys::wallet_errors).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (
            errors[0]["transaction_id"].as_str(),
            errors[0]["reason"].as_str()
        ),
        (id.as_str(), "insufficient funds")
    );
    let journal = app.journal().await;
    assert_eq!(
        journal.len(),
        journal_before + 1,
        "only the recorded refusal"
    );
    let refusal = journal.last().unwrap();
    assert_eq!(
        (refusal["status"].as_str(), refusal["amount"].as_str()),
        ("failed", "0")
    );
    let listed = app
        .get_json(&format!(
            "/api/v1/accounts/{account}/transactions?status=rejected"
        ))
        .await;
    assert_eq!(listed["items"][0]["id"], id.as_str());
    let card = accept(&app, &account, "card_payment", "2.50").await;
    let card_path = format!("/api/v1/accounts/{account}/transactions/{card}");
    eventually("the card payment is applied", || async {
        app.get_json(&card_path).await["status"] == "completed"
    })
    .await;
    assert_eq!(app.balance("@card").await, "2.50");
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposit_that_would_pass_the_balance_limit_is_rejected_before_anything_moves() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("rich", "0").await;
    // Set by hand: reaching it honestly takes about 10^7 deposits of the largest amount.
    let near_limit = crate::helpers::BALANCE_LIMIT_CENTS - 100;
    app.set_balance_cents(&account, near_limit).await;
    let before = app.balance("@bank").await;
    let txn = accept(&app, &account, "deposit", "1.01").await;
    let path = format!("/api/v1/accounts/{account}/transactions/{txn}");
    eventually("the deposit is decided", || async {
        app.get_json(&path).await["status"] != "queued"
    })
    .await;
    let decided = app.get_json(&path).await;
    assert_eq!(decided["status"], "rejected");
    assert!(
        decided["reason"]
            .as_str()
            .unwrap()
            .contains("largest amount"),
        "{decided}"
    );
    assert_eq!(
        (
            app.balance_cents(&account).await,
            app.balance("@bank").await
        ),
        (near_limit, before)
    );
    // One cent less fits, and is applied.
    let fits = accept(&app, &account, "deposit", "1.00").await;
    let fits_path = format!("/api/v1/accounts/{account}/transactions/{fits}");
    eventually("the deposit that fits is applied", || async {
        app.get_json(&fits_path).await["status"] == "completed"
    })
    .await;
    workers.stop().await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_no_worker_can_read_are_dead_lettered_and_the_rest_go_on() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let mut conn = app.redis().await;
    let shard = app.keys().layout().first();
    let wallet_job: String = conn
        .xadd(
            app.keys().wallet(shard),
            "*",
            &[("account_id", "not-an-account")],
        )
        .await
        .unwrap();
    let installment_job: String = conn
        .xadd(
            app.keys().installments(shard),
            "*",
            &[("installment", "no-number")],
        )
        .await
        .unwrap();
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let account = app.create_account("after", "0").await;
    let txn = accept(&app, &account, "deposit", "1.00").await;
    let path = format!("/api/v1/accounts/{account}/transactions/{txn}");
    eventually("the good job is applied", || async {
        app.get_json(&path).await["status"] == "completed"
    })
    .await;
    for (stream, group, dead, job, problem) in [
        (
            app.keys().wallet(shard),
            tally::store::wallet::WALLET_GROUP,
            app.keys().wallet_dead(shard),
            &wallet_job,
            "no account",
        ),
        (
            app.keys().installments(shard),
            tally::store::advances::COLLECT_GROUP,
            app.keys().installments_dead(shard),
            &installment_job,
            "no installment",
        ),
    ] {
        eventually("the unreadable job is dead-lettered", || async {
            stream_entries(&mut app.redis().await, &dead).await.len() == 1
        })
        .await;
        let entry = &stream_entries(&mut app.redis().await, &dead).await[0];
        assert_eq!(entry["stream_id"], *job);
        assert!(entry["error"].contains(problem), "{entry:?}");
        assert_eq!(
            pending_count(&mut app.redis().await, &stream, group).await,
            0
        );
    }
    workers.stop().await;
}

#[derive(Default)]
struct Receiver {
    failing: AtomicBool,
    refused: AtomicUsize,
    events: Mutex<BTreeMap<String, Value>>,
    bad_signatures: AtomicUsize,
}

#[handler]
async fn receive(
    request: &Request,
    body: String,
    receiver: Data<&Arc<Receiver>>,
) -> poem::http::StatusCode {
    if receiver.failing.load(Ordering::SeqCst) {
        receiver.refused.fetch_add(1, Ordering::SeqCst);
        return poem::http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    let signature = request
        .headers()
        .get("x-tally-signature")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if signature != format!("sha256={}", tally::notifier::sign("test-secret", &body)) {
        receiver.bad_signatures.fetch_add(1, Ordering::SeqCst);
    }
    let event: Value = serde_json::from_str(&body).unwrap();
    receiver
        .events
        .lock()
        .unwrap()
        .insert(event["event_id"].as_str().unwrap().to_owned(), event);
    poem::http::StatusCode::OK
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_gets_every_event_signed_even_after_an_outage() {
    let receiver = Arc::new(Receiver::default());
    receiver.failing.store(true, Ordering::SeqCst);
    let acceptor =
        poem::listener::Listener::into_acceptor(poem::listener::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
    let address = poem::listener::Acceptor::local_addr(&acceptor)[0]
        .as_socket_addr()
        .copied()
        .unwrap();
    let app_route = Route::new()
        .at("/events", post(receive))
        .data(receiver.clone());
    tokio::spawn(Server::new_with_acceptor(acceptor).run(app_route));

    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let settings = WorkerSettings {
        accounting_webhook_url: Some(format!("http://{address}/events")),
        webhook_secret: "test-secret".to_owned(),
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(&app, settings);
    let account = app.create_account("n", "100.00").await;
    app.place_order(&account, "ABAN", "3").await; // order.placed, then batch.settled
    for amount in ["1.00", "2.00", "3.00"] {
        accept(&app, &account, "deposit", amount).await;
    }
    accept(&app, &account, "withdrawal", "1000.00").await; // rejected: an event too
    eventually("deliveries were refused and retried", || async {
        receiver.refused.load(Ordering::SeqCst) >= 10
    })
    .await;
    receiver.failing.store(false, Ordering::SeqCst);

    eventually("every event is delivered", || async {
        let ids: Vec<String> = app.event_ids().await;
        let received = receiver.events.lock().unwrap();
        ids.len() >= 6 && ids.iter().all(|id| received.contains_key(id))
    })
    .await;
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    eventually("every delivered event is acknowledged", || async {
        app.all_pending(Keys::events, tally::notifier::NOTIFY_GROUP)
            .await
            == 0
    })
    .await;
    let received = receiver.events.lock().unwrap().clone();
    let types: HashSet<&str> = received
        .values()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    for kind in [
        "account.opened",
        "order.placed",
        "batch.settled",
        "deposit.completed",
        "withdrawal.rejected",
    ] {
        assert!(types.contains(kind), "{kind} in {types:?}");
    }
    workers.stop().await;
}

/// `count` customer accounts with nothing in them.
async fn empty_accounts(app: &TestApp, count: usize) -> Vec<String> {
    let mut accounts = Vec::with_capacity(count);
    for i in 0..count {
        accounts.push(app.create_account(&format!("d{i}"), "0").await);
    }
    accounts
}

/// Queues `per_account` deposits of 1.00 on each account; returns their ids
/// in acceptance order.
async fn queue_deposits(app: &TestApp, accounts: &[String], per_account: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(accounts.len() * per_account);
    for account in accounts {
        for _ in 0..per_account {
            ids.push(accept(app, account, "deposit", "1.00").await);
        }
    }
    ids
}

/// Deposits applied so far, as the journal counts them.
async fn deposits_applied(app: &TestApp) -> usize {
    app.journal_count("deposit").await
}

/// After a failure: every one of `ids` was applied exactly once, in its
/// account's acceptance order, and each account holds what it was given.
async fn assert_applied_once_in_order(app: &TestApp, accounts: &[String], ids: &[String]) {
    let journal = app.journal().await;
    let mut applications: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in journal.iter().filter(|entry| entry["kind"] == "deposit") {
        *applications.entry(entry["ref"].as_str()).or_default() += 1;
    }
    assert_eq!(applications.len(), ids.len(), "none lost, none extra");
    assert!(
        applications.values().all(|count| *count == 1),
        "none applied twice"
    );
    let balance = format!("{}.00", ids.len() / accounts.len());
    for account in accounts {
        assert_eq!(app.balance(account).await, balance);
    }
    let mut conn = app.redis().await;
    for id in ids {
        let txn = tally::store::wallet::get(&mut conn, &Keys::default(), id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            txn.applied_seq,
            Some(txn.accepted_seq),
            "in acceptance order"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wallet_worker_killed_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let accounts = empty_accounts(&app, 10).await;
    let ids = queue_deposits(&app, &accounts, 100).await;
    let mut doomed = worker_process(&app, &exchange, "doomed");
    eventually("the worker is part way through", || async {
        deposits_applied(&app).await >= 50
    })
    .await;
    doomed.kill().await.unwrap();
    doomed.wait().await.unwrap();
    let _survivor = worker_process(&app, &exchange, "survivor");
    eventually("every transaction is applied", || {
        wallet_drained(&app, &accounts)
    })
    .await;
    assert_applied_once_in_order(&app, &accounts, &ids).await;
}

/// Redis refusing writes for a while (`maxmemory` reached) is a system
/// failure, not a verdict: the API answers 503 and writes nothing, the
/// workers keep the jobs they were handed pending (neither applied nor
/// released), and once writes are accepted again every transaction is
/// applied exactly once, in acceptance order, after the ones applied before.
#[tokio::test(flavor = "multi_thread")]
async fn redis_refusing_writes_loses_nothing_and_applies_nothing_twice() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let accounts = empty_accounts(&app, 10).await;
    let mut ids = queue_deposits(&app, &accounts, 50).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("the first half is applied", || {
        wallet_drained(&app, &accounts)
    })
    .await;
    workers.stop().await;
    ids.extend(queue_deposits(&app, &accounts, 50).await);

    set_maxmemory(&app, 1).await;
    let journal_before = app.journal().await.len();
    let response = app
        .post(
            &format!("/api/v1/accounts/{}/transactions", accounts[0]),
            &json!({"kind": "deposit", "amount": "5.00"}),
        )
        .await;
    assert_problem(response, 503, "unavailable").await;
    let response = app.place_order(&accounts[0], "ABAN", "1").await;
    assert_problem(response, 503, "unavailable").await;
    assert_eq!(
        app.journal().await.len(),
        journal_before,
        "the API wrote nothing"
    );

    let jobs_queued = app.all_length(Keys::wallet).await;
    let pending = || async {
        app.all_pending(Keys::wallet, tally::store::wallet::WALLET_GROUP)
            .await
    };
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    eventually("every account's job is handed out", || async {
        pending().await == accounts.len()
    })
    .await;
    // Housekeeping and reads go on meanwhile; what must not happen is a job
    // applied, released or queued again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pending().await,
        accounts.len(),
        "the jobs in hand stay pending"
    );
    let jobs_now = app.all_length(Keys::wallet).await;
    assert_eq!(jobs_now, jobs_queued, "no job queued again");
    assert_eq!(
        deposits_applied(&app).await,
        ids.len() / 2,
        "nothing applied while refused"
    );

    set_maxmemory(&app, 0).await;
    eventually("every transaction is applied", || {
        wallet_drained(&app, &accounts)
    })
    .await;
    workers.stop().await;
    assert_applied_once_in_order(&app, &accounts, &ids).await;
    assert!(tally::audit::run(&app.store).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_wallet_requests_are_refused_and_write_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("b", "1.00").await;
    let before = app.snapshot().await;
    let path = format!("/api/v1/accounts/{account}/transactions");
    for (body, detail) in [
        (json!({"kind": "gift", "amount": "1"}), "gift"),
        (
            json!({"kind": "deposit", "amount": "0"}),
            "greater than zero",
        ),
        (
            json!({"kind": "deposit", "amount": "-1"}),
            "must not be negative",
        ),
        (json!({"kind": "deposit"}), "amount"),
        (
            json!({"kind": "deposit", "amount": "1", "description": "x".repeat(201)}),
            "description",
        ),
    ] {
        crate::helpers::assert_problem(app.post(&path, &body).await, 400, detail).await;
    }
    let unknown = "01900000-0000-7000-8000-000000000000";
    let body = json!({"kind": "deposit", "amount": "1"});
    crate::helpers::assert_problem(
        app.post(&format!("/api/v1/accounts/{unknown}/transactions"), &body)
            .await,
        404,
        "not found",
    )
    .await;
    crate::helpers::assert_problem(app.get(&format!("{path}?status=lost")).await, 400, "status")
        .await;
    // A system account is an account id the spec admits; it has no wallet.
    let problem = crate::helpers::assert_problem(
        app.post("/api/v1/accounts/@bank/transactions", &body).await,
        422,
        "customer accounts",
    )
    .await;
    assert_eq!(problem["type"], "/problems/system-account");
    let listed = app.get_json("/api/v1/accounts/@bank/transactions").await;
    assert_eq!(listed["items"], json!([]), "{listed}");
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_wallet_queue_refuses_with_429_and_writes_nothing() {
    let app = crate::helpers::spawn_app_with(|settings| settings.api.wallet_queue_max = 2).await;
    let account = app.create_account("busy", "5.00").await;
    let other = app.create_account("calm", "5.00").await;
    // No workers run: the queue only fills.
    accept(&app, &account, "deposit", "1.00").await;
    accept(&app, &account, "withdrawal", "1.00").await;
    let before = app.snapshot().await;
    let path = format!("/api/v1/accounts/{account}/transactions");
    let body = json!({"kind": "deposit", "amount": "1"});
    let problem =
        crate::helpers::assert_problem(app.post(&path, &body).await, 429, "2 transactions waiting")
            .await;
    assert_eq!(problem["type"], "/problems/queue-full");
    assert_eq!(app.snapshot().await, before);
    // The bound is per account.
    accept(&app, &other, "deposit", "1.00").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wallet_transaction_ids_are_canonical_uuids_in_any_case() {
    let app = spawn_app().await;
    let account = app.create_account("ids", "0").await;
    let id = accept(&app, &account, "deposit", "5.00").await;
    let before = app.snapshot().await;
    let path = format!("/api/v1/accounts/{account}/transactions");
    let upper = app.get_json(&format!("{path}/{}", id.to_uppercase())).await;
    assert_eq!(
        upper["id"],
        id.as_str(),
        "the same transaction, spelled as stored"
    );
    let listed = app
        .get_json(&format!("{path}?cursor={}", id.to_uppercase()))
        .await;
    assert_eq!(listed["items"], json!([]), "nothing before the first");
    for malformed in [id.replace('-', ""), format!("{{{id}}}"), "nope".to_owned()] {
        let response = app.get(&format!("{path}/{malformed}")).await;
        let problem = assert_problem(response, 400, "expected a UUID").await;
        assert_eq!(problem["type"], "/problems/invalid-id", "{malformed}");
        let response = app.get(&format!("{path}?cursor={malformed}")).await;
        assert_problem(response, 400, "cursor").await;
    }
    assert_eq!(app.snapshot().await, before);
}
