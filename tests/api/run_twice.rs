//! Every script that creates something is safe to run twice with the same
//! arguments: a Redis Cluster client re-sends a call whose connection dropped
//! (CLUSTER.md), so a call whose reply was lost can run again. The second run
//! answers as the first did and writes nothing. (Orders get the same property
//! from the order saga's steps, issue 17.)

use tally::domain::{AccountId, AccountName, Amount, Idempotency, IdempotencyKey};
use tally::store::accounts::{CreateAccountOutcome, NewAccount, create_account};
use tally::store::advances::{self, NewAdvance};
use tally::store::keys::Keys;
use tally::store::now_ms;
use tally::store::transfers::{Movement, MovementOutcome, Refusal, move_money};
use tally::store::wallet::{self, EnqueueOutcome, NewWalletTransaction, WalletKind};

use crate::helpers::{redis_snapshot, spawn_app, spawn_app_on_node};
use crate::scripts::settling_batch;

fn key(text: &str) -> Option<Idempotency> {
    Some(Idempotency::new(
        IdempotencyKey::parse(text).unwrap(),
        &[text],
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn create_account_run_twice_opens_and_funds_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    for idempotency in [None, key("open-1")] {
        let new = NewAccount {
            id: AccountId::new_customer(),
            name: AccountName::parse("twice").unwrap(),
            opening_balance: Amount::parse("10.00").unwrap(),
            idempotency,
            idempotency_ttl_secs: 60,
        };
        let first = create_account(&mut conn, &Keys::default(), &new)
            .await
            .unwrap();
        assert_eq!(first, CreateAccountOutcome::Created(new.id.clone()));
        let after_first = redis_snapshot(&mut conn).await;
        let second = create_account(&mut conn, &Keys::default(), &new)
            .await
            .unwrap();
        assert_eq!(second, first, "answers as the first run did");
        assert_eq!(
            redis_snapshot(&mut conn).await,
            after_first,
            "writes nothing"
        );
    }
    assert_eq!(
        app.journal_count("opening_balance").await,
        2,
        "funded once each"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transfer_run_twice_moves_once_and_a_refusal_is_journaled_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let a = AccountId::parse(&app.create_account("a", "10.00").await).unwrap();
    // Beside the payer: the one-script transfer (a cross-shard one is the saga's).
    let b = AccountId::parse(&app.create_account_beside("b", "0", a.as_str()).await).unwrap();
    let movement = |amount: &str, idempotency| Movement {
        id: on_shard_of(&app, &a),
        kind: "transfer",
        payer: a.clone(),
        payee: b.clone(),
        amount: Amount::parse(amount).unwrap(),
        canonical_request: format!("a b {amount}"),
        memo: String::new(),
        at_ms: now_ms(),
        idempotency,
        idempotency_ttl_secs: 60,
    };
    let cases = [
        (movement("4.00", None), "moved"),
        (movement("4.00", key("move-1")), "moved"),
        (movement("100.00", None), "refused"),
    ];
    for (movement, what) in cases {
        let first = move_money(&mut conn, &Keys::default(), &movement)
            .await
            .unwrap();
        let after_first = redis_snapshot(&mut conn).await;
        let second = move_money(&mut conn, &Keys::default(), &movement)
            .await
            .unwrap();
        assert_eq!(second, first, "{what}: answers as the first run did");
        assert_eq!(
            redis_snapshot(&mut conn).await,
            after_first,
            "{what}: writes nothing"
        );
    }
    assert_eq!(
        app.balance(a.as_str()).await,
        "2.00",
        "8.00 moved, once each"
    );
    assert_eq!(app.balance(b.as_str()).await, "8.00");
    assert_eq!(
        app.journal_count("transfer").await,
        3,
        "two moves and one refusal"
    );
    let refused = move_money(&mut conn, &Keys::default(), &movement("100.00", None))
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            MovementOutcome::Fail {
                refusal: Refusal::InsufficientFunds,
                ..
            }
        ),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_advance_run_twice_lends_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let customer = AccountId::parse(&app.create_account("borrower", "0").await).unwrap();
    let advance = NewAdvance {
        id: on_shard_of(&app, &customer),
        account_id: customer.clone(),
        amount: Amount::parse("120.00").unwrap(),
        period_ms: 60_000,
        now_ms: now_ms(),
        idempotency: None,
        idempotency_ttl_secs: 60,
    };
    let first = advances::create(&mut conn, &Keys::default(), &advance)
        .await
        .unwrap();
    assert_eq!(first, (advance.id.clone(), false));
    let after_first = redis_snapshot(&mut conn).await;
    let second = advances::create(&mut conn, &Keys::default(), &advance)
        .await
        .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(
        redis_snapshot(&mut conn).await,
        after_first,
        "writes nothing"
    );
    assert_eq!(app.balance(customer.as_str()).await, "120.00", "lent once");
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_wallet_transaction_run_twice_queues_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let account = AccountId::parse(&app.create_account("w", "0").await).unwrap();
    let txn = NewWalletTransaction {
        id: on_shard_of(&app, &account),
        account_id: account,
        kind: WalletKind::Deposit,
        amount: Amount::parse("1.00").unwrap(),
        description: String::new(),
        merchant: String::new(),
        idempotency: None,
        idempotency_ttl_secs: 60,
        at_ms: now_ms(),
        queue_max: 10,
    };
    let first = wallet::enqueue(&mut conn, &Keys::default(), &txn)
        .await
        .unwrap();
    assert_eq!(first, EnqueueOutcome::Queued(txn.id.clone()));
    let after_first = redis_snapshot(&mut conn).await;
    let second = wallet::enqueue(&mut conn, &Keys::default(), &txn)
        .await
        .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(redis_snapshot(&mut conn).await, after_first, "queued once");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_api_key_run_twice_stores_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let pepper = tally::access::Pepper::new(crate::helpers::TEST_PEPPER).unwrap();
    let generated = tally::access::GeneratedKey::new(tally::access::Role::Read, &pepper);
    let record = tally::store::api_keys::KeyRecord {
        id: generated.id.clone(),
        role: tally::access::Role::Read,
        account: None,
        secret_hash: generated.secret_hash.clone(),
        created_at_ms: now_ms(),
        expires_at_ms: None,
        revoked_at_ms: None,
        label: None,
        reads_per_s: None,
        writes_per_s: None,
    };
    tally::store::api_keys::create_api_key(&mut conn, &Keys::default(), &record)
        .await
        .unwrap();
    let after_first = redis_snapshot(&mut conn).await;
    tally::store::api_keys::create_api_key(&mut conn, &Keys::default(), &record)
        .await
        .expect("answers as the first run did");
    assert_eq!(redis_snapshot(&mut conn).await, after_first, "stores once");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_run_twice_counts_once_and_a_settlement_pays_once() {
    use tally::store::settlement::{self, Begun, Filled, JobEnd, JobRef};
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };

    // begin_attempts: the same call (the same attempt token) counts once; a
    // new attempt counts again.
    let first = settlement::begin_attempts_as(&mut conn, &Keys::default(), &[job], "attempt-1")
        .await
        .unwrap();
    assert_eq!(first, [Begun::Call { attempts: 1 }]);
    let after_first = redis_snapshot(&mut conn).await;
    let second = settlement::begin_attempts_as(&mut conn, &Keys::default(), &[job], "attempt-1")
        .await
        .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(
        redis_snapshot(&mut conn).await,
        after_first,
        "counts nothing more"
    );
    let next = settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
        .await
        .unwrap();
    assert_eq!(next, [Begun::Call { attempts: 2 }], "a new attempt counts");

    // finish_batches: settled once, and the same call again answers "settled".
    let filled = [Filled {
        job,
        fill_id: "fill-1",
    }];
    let first = settlement::finish_batches(&mut conn, &Keys::default(), "test", &filled)
        .await
        .unwrap();
    assert_eq!(first, [JobEnd::Done]);
    let after_first = redis_snapshot(&mut conn).await;
    let second = settlement::finish_batches(&mut conn, &Keys::default(), "test", &filled)
        .await
        .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(redis_snapshot(&mut conn).await, after_first, "pays once");
    assert_eq!(app.journal_count("settlement").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wallet_transaction_applied_twice_moves_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let account = AccountId::parse(&app.create_account("w", "5.00").await).unwrap();
    for (kind, amount, expected) in [
        (WalletKind::Deposit, "1.00", wallet::Applied::Completed),
        (
            WalletKind::Withdrawal,
            "100.00",
            wallet::Applied::Rejected("insufficient funds".to_owned()),
        ),
    ] {
        let txn = NewWalletTransaction {
            id: on_shard_of(&app, &account),
            account_id: account.clone(),
            kind,
            amount: Amount::parse(amount).unwrap(),
            description: String::new(),
            merchant: String::new(),
            idempotency: None,
            idempotency_ttl_secs: 60,
            at_ms: now_ms(),
            queue_max: 10,
        };
        wallet::enqueue(&mut conn, &Keys::default(), &txn)
            .await
            .unwrap();
        let at = now_ms();
        let first = wallet::apply_at(
            &mut conn,
            &Keys::default(),
            &account,
            &txn.id,
            kind,
            "test",
            at,
        )
        .await
        .unwrap();
        assert_eq!(first, expected);
        let after_first = redis_snapshot(&mut conn).await;
        let second = wallet::apply_at(
            &mut conn,
            &Keys::default(),
            &account,
            &txn.id,
            kind,
            "test",
            at,
        )
        .await
        .unwrap();
        assert_eq!(second, first, "answers as the first run did");
        assert_eq!(redis_snapshot(&mut conn).await, after_first, "moves once");
        // Another delivery (another moment) only skips it.
        let other = wallet::apply_at(
            &mut conn,
            &Keys::default(),
            &account,
            &txn.id,
            kind,
            "test",
            at + 1,
        )
        .await
        .unwrap();
        assert_eq!(other, wallet::Applied::Skipped);
    }
    assert_eq!(app.balance(account.as_str()).await, "6.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_scheduled_twice_is_scheduled_once() {
    use tally::store::settlement::{self, JobEnd, JobRef};
    // One node of its own in either suite: the refund at the end is the
    // one-script refund a standalone Redis runs (saga_scripts.rs runs the saga's).
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };
    settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
        .await
        .unwrap();
    let first =
        settlement::retry_batch(&mut conn, &Keys::default(), &job, 1_000, "{}", "503", false)
            .await
            .unwrap();
    assert_eq!(first, JobEnd::Done);
    let after_first = redis_snapshot(&mut conn).await;
    let second =
        settlement::retry_batch(&mut conn, &Keys::default(), &job, 1_000, "{}", "503", false)
            .await
            .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(
        redis_snapshot(&mut conn).await,
        after_first,
        "scheduled once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_and_an_operators_requeue_run_twice_act_once() {
    use tally::store::settlement::{self, JobEnd, JobRef};
    // One node of its own in either suite: the refund at the end is the
    // one-script refund a standalone Redis runs (saga_scripts.rs runs the saga's).
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };
    settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
        .await
        .unwrap();

    let at = now_ms();
    let first = settlement::dead_letter_batch_at(
        &mut conn,
        &Keys::default(),
        &job,
        "rejected",
        1,
        false,
        at,
    )
    .await
    .unwrap();
    assert_eq!(first, JobEnd::Done);
    let after_first = redis_snapshot(&mut conn).await;
    let second = settlement::dead_letter_batch_at(
        &mut conn,
        &Keys::default(),
        &job,
        "rejected",
        1,
        false,
        at,
    )
    .await
    .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(
        redis_snapshot(&mut conn).await,
        after_first,
        "dead-lettered once"
    );

    let at = now_ms() + 1;
    settlement::requeue_failed_batch_at(&mut conn, &Keys::default(), &batch_id, at)
        .await
        .unwrap();
    let after_first = redis_snapshot(&mut conn).await;
    settlement::requeue_failed_batch_at(&mut conn, &Keys::default(), &batch_id, at)
        .await
        .expect("answers as the first run did");
    assert_eq!(redis_snapshot(&mut conn).await, after_first, "queued once");
    // Another operator's request (another moment) is refused: not failed.
    assert!(
        settlement::requeue_failed_batch_at(&mut conn, &Keys::default(), &batch_id, at + 1)
            .await
            .is_err()
    );

    // Failed again, then refunded: the same refund run twice pays back once.
    let stream_id = crate::helpers::read_settle_job(&mut conn, app.keys(), "test").await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };
    settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
        .await
        .unwrap();
    settlement::dead_letter_batch(&mut conn, &Keys::default(), &job, "rejected", 1, false)
        .await
        .unwrap();
    let at = now_ms() + 2;
    let first = settlement::refund_batch_at(
        &mut conn,
        &Keys::default(),
        &batch_id,
        "delisted",
        false,
        at,
    )
    .await
    .unwrap();
    assert_eq!(first, (1, 1_200));
    let after_first = redis_snapshot(&mut conn).await;
    let second = settlement::refund_batch_at(
        &mut conn,
        &Keys::default(),
        &batch_id,
        "delisted",
        false,
        at,
    )
    .await
    .unwrap();
    assert_eq!(second, first, "answers as the first run did");
    assert_eq!(
        redis_snapshot(&mut conn).await,
        after_first,
        "refunded once"
    );
    assert_eq!(app.journal_count("refund").await, 1);
}

/// A fresh record id on `account`'s shard, as the API draws one.
fn on_shard_of(app: &crate::helpers::TestApp, account: &AccountId) -> String {
    let keys = app.keys();
    keys.new_id_in(keys.account_shard(account)).to_string()
}
