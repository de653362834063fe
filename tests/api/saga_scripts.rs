//! The transfer and refund sagas' scripts against Redis, one refusal at a
//! time: each answers its refusal and writes nothing (a journaled refusal
//! writes only its record); each later step answers a second run as the
//! first.

use redis::AsyncCommands;
use tally::domain::{AccountId, BatchId, Idempotency, IdempotencyKey, SystemAccount};
use tally::store::now_ms;
use tally::store::refund_saga;
use tally::store::settlement::OperatorError;
use tally::store::transfer_saga::{self, Debited, Decision};
use tally::store::transfers::{Movement, MovementError, MovementOutcome, Refusal};

use crate::helpers::{BALANCE_LIMIT_CENTS, redis_snapshot, spawn_app_with_sagas};

fn refused(debited: Debited) -> Refusal {
    match debited {
        Debited::Ended(MovementOutcome::Fail { refusal, .. }) => refusal,
        other => panic!("not a refusal: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn debit_transfer_refuses_what_it_cannot_debit_and_moves_nothing() {
    let app = spawn_app_with_sagas().await;
    let payer = app.create_account_off("payer", "5.00", &[]).await;
    let payee = app.create_account_off("payee", "0", &[&payer]).await;
    let mut conn = app.redis().await;
    let keys = app.keys();
    let balances = || async {
        (
            app.balance(&payer).await,
            app.balance(&payee).await,
            app.balance("@transit").await,
        )
    };
    let untouched = ("5.00".to_owned(), "0.00".to_owned(), "0.00".to_owned());

    let nobody = AccountId::new_customer().to_string();
    let cases = [
        (
            app.movement(&nobody, &payee, "1.00"),
            true,
            Refusal::AccountNotFound,
        ),
        (
            app.movement(&payer, &payee, "1.00"),
            false,
            Refusal::AccountNotFound,
        ),
        (
            app.movement(&payer, &payee, "5.01"),
            true,
            Refusal::InsufficientFunds,
        ),
    ];
    for (transfer, payee_exists, refusal) in cases {
        let debited = transfer_saga::debit(&mut conn, keys, &transfer, payee_exists)
            .await
            .unwrap();
        assert_eq!(refused(debited), refusal);
        assert_eq!(balances().await, untouched);
        // Its record answers a second run the same way.
        let again = transfer_saga::debit(&mut conn, keys, &transfer, payee_exists)
            .await
            .unwrap();
        assert_eq!(refused(again), refusal);
    }
    // @transit's sub-account on the payer's shard at the top of the range.
    let transit = keys.system_account(
        SystemAccount::Transit,
        keys.account_shard(&AccountId::parse(&payer).unwrap()),
    );
    let _: () = conn
        .hset(&transit, "balance", BALANCE_LIMIT_CENTS)
        .await
        .unwrap();
    let transfer = app.movement(&payer, &payee, "1.00");
    let debited = transfer_saga::debit(&mut conn, keys, &transfer, true)
        .await
        .unwrap();
    assert_eq!(refused(debited), Refusal::BalanceLimit);
    let _: () = conn.hset(&transit, "balance", 0).await.unwrap();

    // An Idempotency-Key used for another request.
    let key = IdempotencyKey::parse("k-1")
        .unwrap()
        .scoped(&app.admin_key_id());
    let first = Movement {
        idempotency: Some(Idempotency::new(key.clone(), &["transfer", "a"])),
        ..app.movement(&payer, &payee, "1.00")
    };
    assert_eq!(
        transfer_saga::move_money(&mut conn, keys, &first)
            .await
            .unwrap(),
        MovementOutcome::Success
    );
    let other = Movement {
        idempotency: Some(Idempotency::new(key, &["transfer", "b"])),
        ..app.movement(&payer, &payee, "2.00")
    };
    let before = redis_snapshot(&mut conn).await;
    assert!(matches!(
        transfer_saga::debit(&mut conn, keys, &other, true).await,
        Err(MovementError::IdempotencyConflict(_))
    ));
    assert_eq!(redis_snapshot(&mut conn).await, before, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn credit_transfer_decides_once_and_a_refusal_credits_nothing() {
    let app = spawn_app_with_sagas().await;
    let payer = app.create_account_off("payer", "5.00", &[]).await;
    let payee = app.create_account_off("payee", "0", &[&payer]).await;
    let mut conn = app.redis().await;
    let keys = app.keys();

    // A payee at the top of the range: refused, and the refusal stands even
    // once there would be room.
    app.set_balance_cents(&payee, BALANCE_LIMIT_CENTS).await;
    let transfer = app.movement(&payer, &payee, "1.00");
    transfer_saga::debit(&mut conn, keys, &transfer, true)
        .await
        .unwrap();
    let decided = transfer_saga::credit(&mut conn, keys, &transfer.id)
        .await
        .unwrap();
    assert_eq!(decided, Some(Decision::Refused("balance_limit".to_owned())));
    app.set_balance_cents(&payee, 0).await;
    let again = transfer_saga::credit(&mut conn, keys, &transfer.id)
        .await
        .unwrap();
    assert_eq!(again, decided, "decided once");
    assert_eq!(app.balance(&payee).await, "0.00");

    // A payee whose account is gone (none is ever deleted; a hand-made case).
    let gone = app.movement(&payer, &payee, "1.00");
    transfer_saga::debit(&mut conn, keys, &gone, true)
        .await
        .unwrap();
    let account = keys.account(&AccountId::parse(&payee).unwrap());
    let kept: std::collections::HashMap<String, String> = conn.hgetall(&account).await.unwrap();
    let _: () = conn.del(&account).await.unwrap();
    let decided = transfer_saga::credit(&mut conn, keys, &gone.id)
        .await
        .unwrap();
    assert_eq!(
        decided,
        Some(Decision::Refused("account_not_found".to_owned()))
    );
    let fields: Vec<(String, String)> = kept.into_iter().collect();
    let _: () = conn.hset_multiple(&account, &fields).await.unwrap();

    // Both voided by the sweeper: the payer has everything back.
    let mut finished = 0;
    for shard in keys.shards() {
        finished += transfer_saga::sweep(&mut conn, keys, shard, now_ms() + 61_000)
            .await
            .unwrap();
    }
    assert_eq!(finished, 2);
    assert_eq!(app.balance(&payer).await, "5.00");
    assert_eq!(app.balance("@transit").await, "0.00");
    // Finishing an unknown or ended transfer writes nothing.
    let before = redis_snapshot(&mut conn).await;
    assert_eq!(
        transfer_saga::complete(&mut conn, keys, &transfer.id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        transfer_saga::complete(&mut conn, keys, &uuid::Uuid::now_v7().to_string())
            .await
            .unwrap(),
        None
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_refund_steps_refuse_a_batch_or_order_in_the_wrong_state_and_write_nothing() {
    let app = spawn_app_with_sagas().await;
    let customer = app.create_account("c", "20.00").await;
    let mut conn = app.redis().await;
    let keys = app.keys();
    // A batch settling (no workers run): not failed.
    let batch = BatchId::parse(&app.place_batch(&customer, "3").await).unwrap();
    let before = redis_snapshot(&mut conn).await;
    let refused = refund_saga::begin(&mut conn, keys, &batch, "x", false, now_ms()).await;
    assert!(
        matches!(refused, Err(OperatorError::NotFailed(..))),
        "{refused:?}"
    );
    // Finishing a refund never begun: refused.
    let refused = refund_saga::complete(&mut conn, keys, &batch).await;
    assert!(
        matches!(refused, Err(OperatorError::NotFailed(..))),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);

    // Failed, and an exchange call may have filled it: only when confirmed.
    let _: () = conn
        .hset_multiple(
            keys.batch(&batch),
            &[("status", "failed"), ("fill_unknown", "1")],
        )
        .await
        .unwrap();
    let before = redis_snapshot(&mut conn).await;
    let refused = refund_saga::begin(&mut conn, keys, &batch, "x", false, now_ms()).await;
    assert!(
        matches!(refused, Err(OperatorError::MayBeFilled(_))),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);

    // Begun; the customer at the top of the range: that shard's step refuses
    // and writes nothing; once there is room it refunds.
    refund_saga::begin(&mut conn, keys, &batch, "x", true, now_ms())
        .await
        .unwrap();
    let orders = refund_saga::batch_orders(&mut conn, keys, &batch)
        .await
        .unwrap();
    let shard = app.shard_of(&customer);
    app.set_balance_cents(&customer, BALANCE_LIMIT_CENTS).await;
    let before = redis_snapshot(&mut conn).await;
    let refused = refund_saga::refund_customers_on(&mut conn, keys, &batch, shard, &orders).await;
    assert!(
        matches!(refused, Err(OperatorError::BalanceLimit(..))),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);
    app.set_balance_cents(&customer, 800).await;

    // An order named with another customer: stale, nothing written.
    // (On the customer's shard, as every pair the saga sends is.)
    let stranger = AccountId::parse(&app.create_account_beside("s", "0", &customer).await).unwrap();
    let forged = vec![(orders[0].0, stranger)];
    let before = redis_snapshot(&mut conn).await;
    let refused = refund_saga::refund_customers_on(
        &mut conn,
        keys,
        &batch,
        keys.account_shard(&forged[0].1),
        &forged,
    )
    .await;
    assert!(
        matches!(refused, Err(OperatorError::StaleOrders(_))),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);

    let (count, cents) = refund_saga::complete(&mut conn, keys, &batch)
        .await
        .unwrap();
    assert_eq!((count, cents), (1, 1_200));
    assert_eq!(app.balance(&customer).await, "20.00");
    assert_eq!(
        app.balance(SystemAccount::Exchange.id().as_str()).await,
        "0.00"
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

/// A transfer left pending longer than its payee's decision is surely kept
/// is not credited by a sweeper (a decision made and expired could pay
/// twice): it stays in `@transit` for an operator, holding up no other.
#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_pending_too_long_is_not_credited_blindly() {
    let app = spawn_app_with_sagas().await;
    let payer = app.create_account_off("payer", "5.00", &[]).await;
    let payee = app.create_account_off("payee", "0", &[&payer]).await;
    let mut conn = app.redis().await;
    let keys = app.keys();
    let old = app.movement(&payer, &payee, "1.00");
    let fresh = app.movement(&payer, &payee, "2.00");
    for transfer in [&old, &fresh] {
        transfer_saga::debit(&mut conn, keys, transfer, true)
            .await
            .unwrap();
    }
    let long_ago = now_ms() - transfer_saga::CREDIT_AGE_MAX_MS - 1;
    let _: () = conn
        .hset(keys.transaction(&old.id), "at", long_ago)
        .await
        .unwrap();
    assert!(
        transfer_saga::credit(&mut conn, keys, &old.id)
            .await
            .is_err()
    );
    let mut finished = 0;
    for shard in keys.shards() {
        finished += transfer_saga::sweep(&mut conn, keys, shard, now_ms() + 61_000)
            .await
            .unwrap();
    }
    assert_eq!(finished, 1, "the fresh one, past the old one");
    assert_eq!(app.balance(&payee).await, "2.00");
    assert_eq!(app.balance("@transit").await, "1.00");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.transfers_in_flight, 1);
}
