//! The transfer saga (`store::transfer_saga`), for transfers between
//! customers on two shards where one script cannot write both: a crash after
//! each step leaves an intent that a sweeper finishes exactly once; balances
//! stay exact, `@transit` holds what is in flight (the audit counts it) and
//! sums to zero once nothing is; a payee that cannot take the money voids the
//! transfer; a replay finishes the saga before it answers; each step is safe
//! to run twice.

use serde_json::{Value, json};
use tally::domain::AccountId;
use tally::store::now_ms;
use tally::store::order_saga::TAKEOVER_AFTER_MS;
use tally::store::transfer_saga::{self, Debited, Decision};
use tally::store::transfers::{Movement, MovementOutcome};

use crate::helpers::{BALANCE_LIMIT_CENTS, TestApp, spawn_app_with_sagas};

async fn audit(app: &TestApp) -> tally::audit::AuditReport {
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    report
}

/// Two customers on two shards, 10.00 each.
async fn payer_and_payee(app: &TestApp) -> (String, String) {
    let payer = app.create_account_off("payer", "10.00", &[]).await;
    let payee = app.create_account_off("payee", "10.00", &[&payer]).await;
    (payer, payee)
}

/// A sweep of every shard as if the takeover time had come.
async fn sweep_all(app: &TestApp) -> usize {
    let mut conn = app.redis().await;
    let mut finished = 0;
    for shard in app.keys().shards() {
        let later = now_ms() + TAKEOVER_AFTER_MS + 1;
        finished += transfer_saga::sweep(&mut conn, app.keys(), shard, later)
            .await
            .unwrap();
    }
    finished
}

async fn intents(app: &TestApp) -> usize {
    use redis::AsyncCommands;
    let mut conn = app.redis().await;
    let mut count = 0;
    for shard in app.keys().shards() {
        let n: usize = conn
            .zcard(app.keys().transfer_intents(shard))
            .await
            .unwrap();
        count += n;
    }
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_debit_is_finished_by_a_sweeper_once() {
    let app = spawn_app_with_sagas().await;
    let (payer, payee) = payer_and_payee(&app).await;
    let transfer = app.movement(&payer, &payee, "3.00");
    let mut conn = app.redis().await;
    let debited = transfer_saga::debit(&mut conn, app.keys(), &transfer, true)
        .await
        .unwrap();
    assert_eq!(debited, Debited::Pending);
    // The process dies here. The money sits in @transit, which the audit counts.
    assert_eq!(app.balance(&payer).await, "7.00");
    assert_eq!(app.balance(&payee).await, "10.00");
    assert_eq!(app.balance("@transit").await, "3.00");
    let report = audit(&app).await;
    assert_eq!(
        (report.transfers_in_flight, report.transfers_in_flight_cents),
        (1, 300)
    );
    // Not before its takeover time.
    let mut early = 0;
    for shard in app.keys().shards() {
        early += transfer_saga::sweep(&mut conn, app.keys(), shard, now_ms())
            .await
            .unwrap();
    }
    assert_eq!(early, 0);

    assert_eq!(sweep_all(&app).await, 1);
    assert_eq!(sweep_all(&app).await, 0, "a second sweep finds nothing");
    assert_eq!(app.balance(&payer).await, "7.00");
    assert_eq!(app.balance(&payee).await, "13.00");
    assert_eq!(app.balance("@transit").await, "0.00");
    assert_eq!(intents(&app).await, 0);
    let report = audit(&app).await;
    assert_eq!(report.transfers_in_flight, 0);
    // A step sent again (a lost reply) changes nothing more.
    assert_eq!(
        transfer_saga::debit(&mut conn, app.keys(), &transfer, true)
            .await
            .unwrap(),
        Debited::Ended(MovementOutcome::Success)
    );
    assert_eq!(
        transfer_saga::credit(&mut conn, app.keys(), &transfer.id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(app.balance(&payee).await, "13.00");
    audit(&app).await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_credit_is_finished_by_a_sweeper_once() {
    let app = spawn_app_with_sagas().await;
    let (payer, payee) = payer_and_payee(&app).await;
    let transfer = app.movement(&payer, &payee, "2.50");
    let mut conn = app.redis().await;
    transfer_saga::debit(&mut conn, app.keys(), &transfer, true)
        .await
        .unwrap();
    let decided = transfer_saga::credit(&mut conn, app.keys(), &transfer.id)
        .await
        .unwrap();
    assert_eq!(decided, Some(Decision::Credited));
    // Sent again: the decision stands, the payee is credited once.
    let again = transfer_saga::credit(&mut conn, app.keys(), &transfer.id)
        .await
        .unwrap();
    assert_eq!(again, Some(Decision::Credited));
    // The process dies here: the payee has it; @transit's sub-accounts, one
    // up and one down, sum to zero; nothing is in flight.
    assert_eq!(app.balance(&payee).await, "12.50");
    assert_eq!(app.balance("@transit").await, "0.00");
    let report = audit(&app).await;
    assert_eq!(report.transfers_in_flight, 0);

    assert_eq!(sweep_all(&app).await, 1);
    assert_eq!(intents(&app).await, 0);
    assert_eq!(app.balance(&payer).await, "7.50");
    assert_eq!(app.balance(&payee).await, "12.50");
    assert_eq!(app.balance("@transit").await, "0.00");
    audit(&app).await;
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payee_that_cannot_take_the_money_voids_the_transfer() {
    let app = spawn_app_with_sagas().await;
    let (payer, payee) = payer_and_payee(&app).await;
    // The payee near the largest balance kept exact, set by hand (and put
    // back before the audit): room for less than 5.00.
    app.set_balance_cents(&payee, BALANCE_LIMIT_CENTS - 100)
        .await;
    let before = app.balance(&payee).await;

    let body = json!({"src_account_id": payer, "dst_account_id": payee, "amount": "5.00", "direction": "debit"});
    let response = app.post("/api/v1/transfers", &body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["type"].as_str().unwrap().ends_with("balance-limit"),
        "{answer}"
    );
    assert_eq!(app.balance(&payer).await, "10.00", "credited back");
    assert_eq!(app.balance(&payee).await, before);
    assert_eq!(app.balance("@transit").await, "0.00");
    assert_eq!(intents(&app).await, 0);
    app.set_balance_cents(&payee, 1_000).await;
    audit(&app).await;
    // The payer's journal shows the debit to @transit and its reversal.
    let page: Value = app.get_json("/api/v1/transactions?limit=10").await;
    let legs: Vec<(&str, &str, &str)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["kind"] == "transfer")
        .map(|item| {
            (
                item["debit_account_id"].as_str().unwrap(),
                item["credit_account_id"].as_str().unwrap(),
                item["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        legs,
        [
            ("@transit", payer.as_str(), "failed"),
            (payer.as_str(), "@transit", "pending")
        ],
        "{page}"
    );
    assert!(app.assert_account_lists().await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_api_a_transfer_between_shards_completes_and_a_replay_finishes_first() {
    let app = spawn_app_with_sagas().await;
    let (payer, payee) = payer_and_payee(&app).await;
    let body = json!({"src_account_id": payer, "dst_account_id": payee, "amount": "1.25", "direction": "debit"});
    let response = app.post_with_key("/api/v1/transfers", "t-1", &body).await;
    assert_eq!(response.status(), 201);
    let first: Value = response.json().await.unwrap();
    assert_eq!(app.balance(&payer).await, "8.75");
    assert_eq!(app.balance(&payee).await, "11.25");
    let replay = app.post_with_key("/api/v1/transfers", "t-1", &body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(replayed["id"], first["id"]);
    assert_eq!(app.balance(&payee).await, "11.25", "once");

    // A saga a crash left after its debit, replayed: finished, then answered.
    let transfer = Movement {
        idempotency: Some(tally::domain::Idempotency::new(
            tally::domain::IdempotencyKey::parse("t-2")
                .unwrap()
                .scoped(&app.admin_key_id()),
            &["transfer", "x"],
        )),
        ..app.movement(&payer, &payee, "1.00")
    };
    let mut conn = app.redis().await;
    transfer_saga::debit(&mut conn, app.keys(), &transfer, true)
        .await
        .unwrap();
    let outcome = transfer_saga::move_money(
        &mut conn,
        app.keys(),
        &Movement {
            id: app
                .keys()
                .new_id_in(app.keys().account_shard(&transfer.payer))
                .to_string(),
            ..transfer.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(outcome, MovementOutcome::Replayed(transfer.id.clone()));
    assert_eq!(app.balance(&payee).await, "12.25");
    assert_eq!(intents(&app).await, 0);
    let report = audit(&app).await;
    assert_eq!(report.transfers_in_flight, 0);
}

/// An unknown payee is refused before anything moves, and journaled.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_payee_on_another_shard_is_refused_and_nothing_moves() {
    let app = spawn_app_with_sagas().await;
    let payer = app.create_account_off("payer", "10.00", &[]).await;
    let nobody = loop {
        let id = AccountId::new_customer().to_string();
        if app.shard_of(&id) != app.shard_of(&payer) {
            break id;
        }
    };
    let body = json!({"src_account_id": payer, "dst_account_id": nobody, "amount": "1.00", "direction": "debit"});
    let response = app.post("/api/v1/transfers", &body).await;
    assert_eq!(response.status(), 422);
    assert_eq!(app.balance(&payer).await, "10.00");
    assert_eq!(app.balance("@transit").await, "0.00");
    assert_eq!(intents(&app).await, 0);
    audit(&app).await;
    assert!(app.assert_account_lists().await > 0);
}
