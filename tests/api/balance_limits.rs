//! No operation takes a balance, customer or system, past 2^53 - 1 cents
//! either way (`BALANCE_LIMIT` in lua/lib.lua), the range a script keeps
//! exact. Each script that moves money is called directly against Redis with
//! a balance set near the limit by hand and a move that would pass it: it is
//! refused, and a snapshot of every key shows what it wrote (nothing, or for
//! the two whose refusals are records by design, transfers and wallet
//! applies, exactly that record). Then the same over HTTP and through the
//! workers, and the audit on a balance already out of range.
//!
//! The apps here run with one shard: a system account is then one
//! sub-account, so "@bank near the limit" is one balance set by hand. The
//! checks are the same per sub-account on any count of shards.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tally::store::keys::Keys;

use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::advances::{ManualClock, schedule_once};
use tally::domain::{AccountId, AccountName, Amount, BatchId, SystemAccount};
use tally::exchange::sim::Faults;
use tally::store::accounts::{CreateAccountError, NewAccount, create_account};
use tally::store::advances::{self, AdvanceError, Collected, NewAdvance};
use tally::store::now_ms;
use tally::store::orders::{
    PlaceOrder, PlaceOrderError, PlaceOrderOutcome, place_order, place_orders,
};
use tally::store::settlement::{self, Begun, Filled, JobEnd, JobRef, OperatorError};
use tally::store::slots::Shard;
use tally::store::transfers::{Movement, MovementOutcome, Refusal, move_money};
use tally::store::wallet::{self, Applied, WalletKind};

use crate::helpers::{
    BALANCE_LIMIT_CENTS, TestApp, assert_problem, eventually, pending_count, read_settle_job,
    redis_snapshot, spawn_app_with, spawn_exchange, spawn_workers, stream_entries,
    test_worker_settings,
};

/// An app on one shard (see the module's comment).
async fn spawn_app() -> TestApp {
    spawn_app_with(|settings| settings.redis.shards = 1).await
}

/// The one shard.
fn shard0(app: &TestApp) -> Shard {
    app.keys().layout().first()
}

const LIMIT: i64 = BALANCE_LIMIT_CENTS;

fn bank() -> AccountId {
    SystemAccount::Bank.id()
}

fn exchange() -> AccountId {
    SystemAccount::Exchange.id()
}

fn account_id(text: &str) -> AccountId {
    AccountId::parse(text).unwrap()
}

fn new_account(balance: &str) -> NewAccount {
    NewAccount {
        id: AccountId::new_customer(),
        name: AccountName::parse("limit").unwrap(),
        opening_balance: Amount::parse(balance).unwrap(),
        idempotency: None,
        idempotency_ttl_secs: 60,
    }
}

/// An order of `quantity` ABAN at 4.00, without an Idempotency-Key.
fn order(account: &AccountId, quantity: &str) -> PlaceOrder {
    crate::scripts::order(account, quantity, None)
}

/// The keys whose type, expiry or contents differ between two snapshots.
fn changed_keys(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .cloned()
        .collect()
}

/// The newest journal entry.
async fn last_journal_entry(app: &TestApp) -> BTreeMap<String, String> {
    app.journal().await.pop().expect("the journal has an entry")
}

// ---------------------------------------------------------------------------
// The scripts, called directly.

#[tokio::test(flavor = "multi_thread")]
async fn create_account_refuses_an_opening_balance_that_would_take_the_bank_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    // @bank has funded openings down to 1.00 short of the limit.
    app.set_balance_cents("@bank", -LIMIT + 100).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = create_account(&mut conn, app.keys(), &new_account("1.01")).await;
    assert!(
        matches!(&refused, Err(CreateAccountError::BalanceLimit(id)) if *id == bank()),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");

    // Exactly to the limit is within it.
    create_account(&mut conn, app.keys(), &new_account("1.00"))
        .await
        .unwrap();
    assert_eq!(app.balance_cents("@bank").await, -LIMIT);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_advance_refuses_an_advance_that_would_take_either_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("borrower", "0").await;
    let advance = |amount: &str| NewAdvance {
        id: uuid::Uuid::now_v7().to_string(),
        account_id: account_id(&customer),
        amount: Amount::parse(amount).unwrap(),
        period_ms: 60_000,
        now_ms: now_ms(),
        idempotency: None,
        idempotency_ttl_secs: 60,
    };

    // @bank, which lends it.
    app.set_balance_cents("@bank", -LIMIT + 100).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = advances::create(&mut conn, app.keys(), &advance("1.01")).await;
    assert!(
        matches!(&refused, Err(AdvanceError::BalanceLimit(id)) if *id == bank()),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");

    // The customer, who receives it.
    app.set_balance_cents("@bank", 0).await;
    app.set_balance_cents(&customer, LIMIT - 100).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = advances::create(&mut conn, app.keys(), &advance("1.01")).await;
    assert!(
        matches!(&refused, Err(AdvanceError::BalanceLimit(id)) if id.as_str() == customer),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");

    advances::create(&mut conn, app.keys(), &advance("1.00"))
        .await
        .unwrap();
    assert_eq!(app.balance_cents(&customer).await, LIMIT);
}

#[tokio::test(flavor = "multi_thread")]
async fn transfer_refuses_a_bank_transaction_that_would_take_either_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("c", "10.00").await;
    let movement = |payer: AccountId, payee: AccountId, amount: &str| Movement {
        id: uuid::Uuid::now_v7().to_string(),
        kind: "bank_transaction",
        payer,
        payee,
        amount: Amount::parse(amount).unwrap(),
        canonical_request: String::new(),
        memo: "limit".to_owned(),
        at_ms: now_ms(),
        idempotency: None,
        idempotency_ttl_secs: 60,
    };
    // @bank pays (a credit) near its negative end, @bank is paid (a debit)
    // near its positive end, and @bank pays a customer near the positive end.
    let cases = [
        (
            "@bank",
            -LIMIT + 100,
            bank(),
            account_id(&customer),
            "@bank",
        ),
        ("@bank", LIMIT - 100, account_id(&customer), bank(), "@bank"),
        (
            customer.as_str(),
            LIMIT - 100,
            bank(),
            account_id(&customer),
            customer.as_str(),
        ),
    ];
    for (set, cents, payer, payee, named) in cases {
        app.set_balance_cents("@bank", 0).await;
        app.set_balance_cents(&customer, 1_000).await;
        app.set_balance_cents(set, cents).await;
        let balances = (
            app.balance_cents("@bank").await,
            app.balance_cents(&customer).await,
        );
        let before = redis_snapshot(&mut conn).await;
        let movement = movement(payer, payee, "1.01");
        let outcome = move_money(&mut conn, app.keys(), &movement).await.unwrap();
        match &outcome {
            MovementOutcome::Fail {
                refusal: Refusal::BalanceLimit,
                reason,
            } => assert!(reason.contains(named), "{reason} names {named}"),
            other => panic!("expected a balance-limit refusal, got {other:?}"),
        }
        assert_eq!(
            (
                app.balance_cents("@bank").await,
                app.balance_cents(&customer).await
            ),
            balances,
            "no balance moved"
        );
        // What a refusal writes by design (the report shows failed attempts;
        // the transaction's record answers a second run of the call), and
        // nothing else.
        let after = redis_snapshot(&mut conn).await;
        assert_eq!(
            changed_keys(&before, &after),
            BTreeSet::from([
                app.keys().journal(shard0(&app)),
                app.keys().journal_index(shard0(&app)),
                app.keys().events(shard0(&app)),
                app.keys().transaction(&movement.id),
                // The customer who asked: the refusal is on its list.
                app.keys()
                    .account_entries(&AccountId::parse(&customer).unwrap()),
            ])
        );
        let entry = last_journal_entry(&app).await;
        let fields = ["status", "amount", "requested"].map(|name| entry[name].as_str());
        assert_eq!(fields, ["failed", "0", "101"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn place_orders_refuses_an_order_that_would_take_the_exchange_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("buyer", "100.00").await;
    let customer_id = account_id(&customer);
    app.set_balance_cents("@exchange", LIMIT - 100).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = place_order(&mut conn, app.keys(), &order(&customer_id, "1")).await; // 4.00
    assert!(
        matches!(&refused, Err(PlaceOrderError::BalanceLimit(id)) if *id == exchange()),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");
}

/// Each order of a group is checked on its own, counting what the orders
/// before it credited @exchange: one that would pass is refused, and the
/// next, which fits, is placed.
#[tokio::test(flavor = "multi_thread")]
async fn place_orders_counts_the_orders_before_it_in_the_group() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("buyer", "100.00").await;
    let customer_id = account_id(&customer);
    app.set_balance_cents("@exchange", LIMIT - 1_000).await; // room for 10.00
    let group = [
        order(&customer_id, "2"),   // 8.00: fits
        order(&customer_id, "1"),   // 4.00: fits alone, not after the 8.00
        order(&customer_id, "0.5"), // 2.00: fits, and closes the batch at 10.00
    ];
    let outcomes = place_orders(&mut conn, app.keys(), &group).await.unwrap();
    assert!(matches!(outcomes[0], Ok(PlaceOrderOutcome::Pending)));
    assert!(
        matches!(&outcomes[1], Err(PlaceOrderError::BalanceLimit(id)) if *id == exchange()),
        "{:?}",
        outcomes[1]
    );
    assert!(matches!(outcomes[2], Ok(PlaceOrderOutcome::Settling(id)) if id == group[2].batch_id));
    assert_eq!(app.balance_cents("@exchange").await, LIMIT);
    assert_eq!(app.balance_cents(&customer).await, 9_000);
    let refused: bool = conn
        .exists(app.keys().order(&group[1].order_id))
        .await
        .unwrap();
    assert!(!refused, "the refused order was not written");
}

#[tokio::test(flavor = "multi_thread")]
async fn place_orders_refuses_a_customer_balance_already_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("buyer", "0").await;
    // Out of range by hand: spending 4.00 still leaves it past the limit.
    app.set_balance_cents(&customer, LIMIT + 1_000).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = place_order(&mut conn, app.keys(), &order(&account_id(&customer), "1")).await;
    assert!(
        matches!(&refused, Err(PlaceOrderError::BalanceLimit(id)) if id.as_str() == customer),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");
}

/// A failed batch of two orders by one customer: 4.00 then 8.00.
async fn failed_batch_of_two(app: &TestApp, customer: &AccountId) -> BatchId {
    let mut conn = app.redis().await;
    place_order(&mut conn, app.keys(), &order(customer, "1"))
        .await
        .unwrap();
    let closing = order(customer, "2");
    place_order(&mut conn, app.keys(), &closing).await.unwrap();
    let stream_id = read_settle_job(&mut conn, app.keys(), "test").await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &closing.batch_id,
        worker: "test",
    };
    assert_eq!(
        settlement::dead_letter_batch(&mut conn, app.keys(), &job, "gone", 1, false)
            .await
            .unwrap(),
        JobEnd::Done
    );
    closing.batch_id
}

#[tokio::test(flavor = "multi_thread")]
async fn refund_batch_refuses_a_refund_that_would_take_either_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("buyer", "100.00").await;
    let batch_id = failed_batch_of_two(&app, &account_id(&customer)).await;

    // The customer: each refund fits alone (4.00, 8.00 into 10.00 of room),
    // not both.
    app.set_balance_cents(&customer, LIMIT - 1_000).await;
    let before = redis_snapshot(&mut conn).await;
    let refused =
        settlement::refund_batch(&mut conn, app.keys(), &batch_id, "x", false, false).await;
    assert!(
        matches!(&refused, Err(OperatorError::BalanceLimit(_, id)) if id.as_str() == customer),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing refunded");

    // @exchange, which pays the refunds back.
    app.set_balance_cents(&customer, 0).await;
    app.set_balance_cents("@exchange", -LIMIT + 1_100).await;
    let before = redis_snapshot(&mut conn).await;
    let refused =
        settlement::refund_batch(&mut conn, app.keys(), &batch_id, "x", false, false).await;
    assert!(
        matches!(&refused, Err(OperatorError::BalanceLimit(_, id)) if *id == exchange()),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing refunded");

    app.set_balance_cents("@exchange", 1_200).await;
    app.set_balance_cents(&customer, LIMIT - 1_200).await;
    assert_eq!(
        settlement::refund_batch(&mut conn, app.keys(), &batch_id, "x", false, false)
            .await
            .unwrap(),
        (2, 1_200)
    );
    assert_eq!(app.balance_cents(&customer).await, LIMIT);
}

/// A batch of 12.00 settling, its job read by the test consumer and its
/// attempt counted: ready for `finish_batches`.
async fn batch_to_finish(app: &TestApp, customer: &AccountId) -> (BatchId, String) {
    let mut conn = app.redis().await;
    let placed = order(customer, "3");
    place_order(&mut conn, app.keys(), &placed).await.unwrap();
    let stream_id = read_settle_job(&mut conn, app.keys(), "test").await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &placed.batch_id,
        worker: "test",
    };
    assert_eq!(
        settlement::begin_attempts(&mut conn, app.keys(), &[job])
            .await
            .unwrap(),
        [Begun::Call { attempts: 1 }]
    );
    (placed.batch_id, stream_id)
}

async fn settle_pending(conn: &mut impl tally::store::Conn) -> usize {
    let keys = Keys::new(1);
    pending_count(
        conn,
        &keys.settle(keys.layout().first()),
        settlement::SETTLE_GROUP,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_batches_refuses_a_settlement_that_would_take_either_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("buyer", "100.00").await;
    let (batch_id, stream_id) = batch_to_finish(&app, &account_id(&customer)).await;
    let filled = [Filled {
        job: JobRef {
            stream_id: &stream_id,
            batch_id: &batch_id,
            worker: "test",
        },
        fill_id: "fill-1",
    }];

    // @bank, which the settlement pays, and @exchange, which pays it.
    for (set, cents, named) in [
        ("@bank", LIMIT - 1_100, bank()),
        ("@exchange", -LIMIT + 1_100, exchange()),
    ] {
        app.set_balance_cents("@bank", 0).await;
        app.set_balance_cents("@exchange", 1_200).await;
        app.set_balance_cents(set, cents).await;
        let before = redis_snapshot(&mut conn).await;
        assert_eq!(
            settlement::finish_batches(&mut conn, app.keys(), "test", &filled)
                .await
                .unwrap(),
            [JobEnd::BalanceLimit(named)]
        );
        // Not even the acknowledgement: the job is still pending (the
        // snapshot holds the stream's pending entries too).
        assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");
        assert_eq!(settle_pending(&mut conn).await, 1);
    }

    app.set_balance_cents("@exchange", 1_200).await;
    app.set_balance_cents("@bank", LIMIT - 1_200).await;
    assert_eq!(
        settlement::finish_batches(&mut conn, app.keys(), "test", &filled)
            .await
            .unwrap(),
        [JobEnd::Done]
    );
    assert_eq!(app.balance_cents("@bank").await, LIMIT);
    assert_eq!(settle_pending(&mut conn).await, 0);
}

/// The batches of one call are checked one by one, counting what the ones
/// before moved: the second is refused and only its job stays pending.
#[tokio::test(flavor = "multi_thread")]
async fn finish_batches_counts_the_batches_before_it_in_the_call() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = account_id(&app.create_account("buyer", "100.00").await);
    let (first_id, first_stream_id) = batch_to_finish(&app, &customer).await;
    let (second_id, second_stream_id) = batch_to_finish(&app, &customer).await;
    app.set_balance_cents("@bank", LIMIT - 2_000).await; // room for one 12.00 batch
    let job = |stream_id, batch_id| JobRef {
        stream_id,
        batch_id,
        worker: "test",
    };
    let filled = [
        Filled {
            job: job(&first_stream_id, &first_id),
            fill_id: "fill-1",
        },
        Filled {
            job: job(&second_stream_id, &second_id),
            fill_id: "fill-2",
        },
    ];
    assert_eq!(
        settlement::finish_batches(&mut conn, app.keys(), "test", &filled)
            .await
            .unwrap(),
        [JobEnd::Done, JobEnd::BalanceLimit(bank())]
    );
    assert_eq!(app.balance_cents("@bank").await, LIMIT - 800);
    assert_eq!(app.balance_cents("@exchange").await, 1_200);
    assert_eq!(app.batch_status(&second_id.to_string()).await, "settling");
    assert_eq!(settle_pending(&mut conn).await, 1, "the second job only");
}

use crate::advances::{WEEK, scheduler_settings};

/// A customer with an advance of 120.00, a week on, with its first
/// installment (10.00) leased: (customer, advance id, the clock). `before_lease`
/// runs once the advance is lent, before its installment is leased.
async fn installment_leased<F: std::future::Future<Output = ()>>(
    app: &TestApp,
    before_lease: impl FnOnce() -> F,
) -> (String, String, ManualClock) {
    let customer = app.create_account("borrower", "0").await;
    let response = app
        .post(
            "/api/v1/advances",
            &json!({"account_id": customer, "amount": "120.00"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    before_lease().await;
    let clock = ManualClock::starting_at(now_ms());
    clock.advance(WEEK);
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (1, 0, 0)
    );
    (customer, created["id"].as_str().unwrap().to_owned(), clock)
}

#[tokio::test(flavor = "multi_thread")]
async fn collect_installment_refuses_a_payment_that_would_take_either_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let (customer, advance_id, _) = installment_leased(&app, || async {}).await;
    let collect = |conn: &mut tally::store::connection::Conn| {
        let (advance_id, customer) = (advance_id.clone(), account_id(&customer));
        let mut conn = conn.clone();
        let keys = app.keys().clone();
        async move {
            advances::collect(
                &mut conn,
                &keys,
                &advance_id,
                &customer,
                1,
                "0-1",
                "test",
                1_000,
            )
            .await
            .unwrap()
        }
    };

    // @bank, which the installment pays; then the customer, out of range by
    // hand, whom paying 10.00 would leave out of range.
    for (set, cents, named) in [
        ("@bank", LIMIT - 900, bank()),
        (customer.as_str(), LIMIT + 5_000, account_id(&customer)),
    ] {
        app.set_balance_cents("@bank", 0).await;
        app.set_balance_cents(&customer, 12_000).await;
        app.set_balance_cents(set, cents).await;
        let before = redis_snapshot(&mut conn).await;
        assert_eq!(collect(&mut conn).await, Collected::BalanceLimit(named));
        assert_eq!(
            redis_snapshot(&mut conn).await,
            before,
            "nothing written: the lease and the job stay"
        );
    }

    app.set_balance_cents(&customer, 12_000).await;
    app.set_balance_cents("@bank", LIMIT - 1_000).await;
    assert_eq!(collect(&mut conn).await, Collected::Paid(1_000));
    assert_eq!(app.balance_cents("@bank").await, LIMIT);
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_wallet_transaction_rejects_a_move_that_would_take_the_system_side_past_the_limit() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = app.create_account("holder", "10.00").await;
    let customer_id = account_id(&customer);
    // A deposit paid by @bank near its negative end; a card payment to @card
    // near its positive end. No worker runs: the test applies by hand.
    for (kind, system, cents) in [
        (WalletKind::Deposit, "@bank", -LIMIT + 100),
        (WalletKind::CardPayment, "@card", LIMIT - 100),
    ] {
        let body = json!({"kind": kind.as_str(), "amount": "1.01"});
        let response = app
            .post(&format!("/api/v1/accounts/{customer}/transactions"), &body)
            .await;
        assert_eq!(response.status(), 202);
        let txn_id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.set_balance_cents(system, cents).await;
        let before = redis_snapshot(&mut conn).await;
        let applied = wallet::apply(&mut conn, app.keys(), &customer_id, &txn_id, kind, "test")
            .await
            .unwrap();
        assert!(
            matches!(&applied, Applied::Rejected(reason) if reason.contains(system) && reason.contains("largest amount")),
            "{applied:?}"
        );
        assert_eq!(
            (
                app.balance_cents(system).await,
                app.balance_cents(&customer).await
            ),
            (cents, 1_000),
            "no balance moved"
        );
        // What a rejection writes by design (the transaction leaves the queue
        // marked rejected, journaled with amount 0, on the error stream), and
        // nothing else: the counterpart's record is untouched.
        let after = redis_snapshot(&mut conn).await;
        let expected = [
            app.keys().wallet_queue(&customer_id),
            app.keys().wallet_transaction(&txn_id),
            app.keys().account(&customer_id), // its count of applied transactions
            app.keys().journal(shard0(&app)),
            app.keys().journal_index(shard0(&app)),
            app.keys().events(shard0(&app)),
            app.keys().wallet_errors(shard0(&app)),
            app.keys().account_entries(&customer_id), // the rejection, on its list
            app.keys().wallet_applied(shard0(&app)),  // for retention, once past its window
        ];
        assert_eq!(changed_keys(&before, &after), BTreeSet::from(expected));
        let entry = last_journal_entry(&app).await;
        let fields = ["status", "amount", "requested"].map(|name| entry[name].as_str());
        assert_eq!(fields, ["failed", "0", "101"]);
    }
}

// ---------------------------------------------------------------------------
// Over HTTP.

/// Asserts a 422 `balance-limit` problem whose detail names `account`.
async fn assert_balance_limit(response: reqwest::Response, account: &str) -> Value {
    let problem = assert_problem(response, 422, account).await;
    assert_eq!(problem["type"], "/problems/balance-limit", "{problem}");
    problem
}

#[tokio::test(flavor = "multi_thread")]
async fn an_opening_balance_that_would_take_the_bank_past_the_limit_is_a_422() {
    let app = spawn_app().await;
    app.set_balance_cents("@bank", -LIMIT + 100).await;
    let before = app.snapshot().await;
    let response = app
        .post(
            "/api/v1/accounts",
            &json!({"name": "flood", "balance": "1.01"}),
        )
        .await;
    let problem = assert_balance_limit(response, "@bank").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("90071992547409.91"),
        "{problem}"
    );
    assert_eq!(app.snapshot().await, before, "nothing written");
    assert_eq!(app.create_account("fits", "1.00").await.len(), 36);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_advance_that_would_take_the_bank_past_the_limit_is_a_422() {
    let app = spawn_app().await;
    let customer = app.create_account("borrower", "0").await;
    app.set_balance_cents("@bank", -LIMIT + 100).await;
    let before = app.snapshot().await;
    let body = json!({"account_id": customer, "amount": "1.20"});
    assert_balance_limit(app.post("/api/v1/advances", &body).await, "@bank").await;
    assert_eq!(app.snapshot().await, before, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bank_transaction_that_would_take_the_bank_past_the_limit_is_a_422_and_moves_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("c", "0").await;
    app.set_balance_cents("@bank", -LIMIT + 100).await;
    let before = app.snapshot().await;
    let body = json!({"account_id": customer, "amount": "1.01", "direction": "credit", "reason": "salary"});
    let problem = assert_balance_limit(
        app.post_with_key("/api/v1/bank-transactions", "b1", &body)
            .await,
        "@bank",
    )
    .await;
    assert!(problem["transaction_id"].is_string(), "{problem}");
    assert_eq!(
        (
            app.balance_cents("@bank").await,
            app.balance_cents(&customer).await
        ),
        (-LIMIT + 100, 0)
    );
    // The refusal is journaled with amount 0 (the report shows failed
    // attempts) and kept for the key's replays; no balance changed.
    let after = app.snapshot().await;
    let transaction = app
        .keys()
        .transaction(problem["transaction_id"].as_str().unwrap());
    let expected = [
        app.keys().journal(shard0(&app)),
        app.keys().journal_index(shard0(&app)),
        app.keys().events(shard0(&app)),
        app.keys().idempotency(
            shard0(&app),
            "bank_transaction",
            &format!("{}/b1", app.admin_key_id()),
        ),
        transaction,
        // The customer who asked: the refusal is on its list.
        app.keys()
            .account_entries(&AccountId::parse(&customer).unwrap()),
    ];
    assert_eq!(changed_keys(&before, &after), BTreeSet::from(expected));
    let entry = last_journal_entry(&app).await;
    assert_eq!(
        ["status", "amount"].map(|name| entry[name].as_str()),
        ["failed", "0"]
    );

    // A replay of the key answers the same refusal, code and all.
    let replayed = assert_balance_limit(
        app.post_with_key("/api/v1/bank-transactions", "b1", &body)
            .await,
        "@bank",
    )
    .await;
    assert_eq!(replayed["transaction_id"], problem["transaction_id"]);
    assert_eq!(app.snapshot().await, after, "a replay writes nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_that_would_take_the_exchange_past_the_limit_is_a_422() {
    let app = spawn_app().await;
    let customer = app.create_account("buyer", "100.00").await;
    app.set_balance_cents("@exchange", LIMIT - 100).await;
    let before = app.snapshot().await;
    assert_balance_limit(app.place_order(&customer, "ABAN", "1").await, "@exchange").await;
    assert_eq!(app.snapshot().await, before, "nothing written");
}

// ---------------------------------------------------------------------------
// Through the workers.

/// The exchange filled the batch, but settling it would take @bank past the
/// limit: the batch is dead-lettered with the fill in its error, nothing
/// moves, a refund needs the operator's word that it was not filled, and a
/// retry once @bank is back in range settles the same fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filled_batch_that_would_take_the_bank_past_the_limit_is_dead_lettered_until_retried() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let customer = app.create_account("buyer", "100.00").await;
    app.set_balance_cents("@bank", LIMIT - 1_100).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let batch_id = app.place_batch(&customer, "3").await; // 12.00
    eventually("the batch is dead-lettered", || async {
        app.batch_status(&batch_id).await == "failed"
    })
    .await;
    let batch = app.batch(&batch_id).await;
    let error = batch["last_error"].as_str().unwrap();
    assert!(
        error.contains("filled") && error.contains("@bank") && error.contains("retry"),
        "{error}"
    );
    assert_eq!(batch["may_be_filled"], true, "{batch}");
    let fill_id = exchange
        .order(&batch_id)
        .await
        .unwrap()
        .fill
        .unwrap()
        .fill_id;
    assert!(error.contains(&fill_id), "{error} names fill {fill_id}");
    assert_eq!(app.balance_cents("@bank").await, LIMIT - 1_100);
    assert_eq!(app.balance("@exchange").await, "12.00");
    let mut conn = app.redis().await;
    let dead = stream_entries(&mut conn, &app.keys().settle_dead(shard0(&app))).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["batch_id"], batch_id);
    assert_eq!(settle_pending(&mut conn).await, 0, "acknowledged");
    let refund = app
        .post(
            &format!("/api/v1/batches/{batch_id}/refund"),
            &json!({"note": "x"}),
        )
        .await;
    assert_problem(refund, 409, "filled").await;

    app.set_balance_cents("@bank", LIMIT - 1_200).await;
    let retry = app
        .post(&format!("/api/v1/batches/{batch_id}/retry"), &json!({}))
        .await;
    assert!(retry.status().is_success(), "{}", retry.status());
    eventually("the retried batch settles", || async {
        app.batch_status(&batch_id).await == "settled"
    })
    .await;
    assert_eq!(app.balance_cents("@bank").await, LIMIT);
    assert_eq!(app.balance("@exchange").await, "0.00");
    // Bought once: the retry's call got the same fill.
    let order = exchange.order(&batch_id).await.unwrap();
    assert!(order.calls >= 2, "{order:?}");
    assert_eq!(order.fill.unwrap().fill_id, fill_id);
    let settled: String = conn
        .hget(
            app.keys().batch(&BatchId::parse(&batch_id).unwrap()),
            "fill_id",
        )
        .await
        .unwrap();
    assert_eq!(settled, fill_id);
    workers.stop().await;
}

/// Collecting would take @bank past the limit: the job is dead-lettered with
/// the reason, the installment stays leased (processing, not failed: the
/// customer could pay), and once the lease expires with @bank back in range
/// it is collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_installment_that_would_take_the_bank_past_the_limit_waits_for_its_lease_to_expire() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(Faults::default()).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    // @bank has 9.00 of room; the first installment is 10.00.
    let (customer, advance_id, clock) =
        installment_leased(&app, || app.set_balance_cents("@bank", LIMIT - 900)).await;
    let mut conn = app.redis().await;
    eventually("the job is dead-lettered", || async {
        let dead = stream_entries(
            &mut app.redis().await,
            &app.keys().installments_dead(shard0(&app)),
        )
        .await;
        !dead.is_empty()
    })
    .await;
    let dead = stream_entries(&mut conn, &app.keys().installments_dead(shard0(&app))).await;
    assert_eq!(dead[0]["installment"], format!("{advance_id}:1"));
    assert!(dead[0]["error"].contains("@bank"), "{:?}", dead[0]);
    let advance = app
        .get_json(&format!("/api/v1/advances/{advance_id}"))
        .await;
    assert_eq!(advance["installments"][0]["status"], "processing");
    assert_eq!(advance["paid"], "0.00");
    assert_eq!(
        (
            app.balance_cents("@bank").await,
            app.balance_cents(&customer).await
        ),
        (LIMIT - 900, 12_000)
    );

    app.set_balance_cents("@bank", 0).await;
    clock.advance(scheduler_settings().lease + Duration::from_secs(1));
    assert_eq!(
        schedule_once(&app.store, &clock, &scheduler_settings())
            .await
            .unwrap(),
        (0, 1, 0),
        "the expired lease is queued again"
    );
    eventually("the installment is paid", || async {
        let advance = app
            .get_json(&format!("/api/v1/advances/{advance_id}"))
            .await;
        advance["installments"][0]["status"] == "paid"
    })
    .await;
    assert_eq!(app.balance_cents(&customer).await, 11_000);
    workers.stop().await;
}

// ---------------------------------------------------------------------------
// The audit.

/// Balances out of range, with everything else in order (they sum to zero
/// and match a journal entry made to match): the audit fails on the range
/// alone, and names both accounts.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_names_every_balance_outside_the_limit() {
    let app = spawn_app().await;
    let customer = app.create_account("whale", "0").await;
    let mut conn = app.redis().await;
    let past = LIMIT + 1;
    let _: String = conn
        .xadd(
            app.keys().journal(shard0(&app)),
            "*",
            &[
                ("at", now_ms().to_string()),
                ("kind", "opening_balance".to_owned()),
                ("debit", "@bank".to_owned()),
                ("credit", customer.clone()),
                ("amount", past.to_string()),
                ("ref", customer.clone()),
                ("status", "completed".to_owned()),
                ("reason", String::new()),
            ],
        )
        .await
        .unwrap();
    app.set_balance_cents(&customer, past).await;
    app.set_balance_cents("@bank", -past).await;

    let report = tally::audit::run(&app.store).await.unwrap();
    assert_eq!(report.balances_sum_cents, 0);
    assert!(report.mismatched_accounts.is_empty(), "{report}");
    assert!(!report.is_clean(), "{report}");
    let named: BTreeSet<String> = report
        .out_of_range_accounts
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert_eq!(
        named,
        BTreeSet::from([customer.clone(), "@bank".to_owned()])
    );
    let printed = report.to_string();
    assert!(
        printed.contains(&format!(
            "{customer}: balance 90071992547409.92 is out of range"
        )),
        "{printed}"
    );
    assert!(printed.contains("audit FAILED"), "{printed}");
}
