//! The Lua scripts, called directly against Redis through their wrappers:
//! every verdict, and for every refusal, proof that nothing was written.

use std::collections::HashMap;
use tally::store::keys::Keys;

use redis::AsyncCommands;
use tally::domain::{AccountId, Amount, BatchId, Idempotency, IdempotencyKey, Quantity, Symbol};
use tally::store::accounts::{
    CreateAccountError, CreateAccountOutcome, NewAccount, create_account,
};
use tally::store::orders::{
    PlaceOrder, PlaceOrderError, PlaceOrderOutcome, place_order, place_orders,
};

use tally::store::settlement::{self, Begun, Filled, JobEnd, JobRef, OperatorError};

use crate::helpers::{
    pending_count, read_settle_job, redis_snapshot, spawn_app, spawn_app_on_node,
};

fn new_account(balance: &str, key: Option<&str>) -> NewAccount {
    NewAccount {
        id: Keys::default().new_account_id(key),
        name: tally::domain::AccountName::parse("script").unwrap(),
        opening_balance: Amount::parse(balance).unwrap(),
        idempotency: key
            .map(|key| Idempotency::new(IdempotencyKey::parse(key).unwrap(), &["script", balance])),
        idempotency_ttl_secs: 60,
    }
}

/// An order of `quantity` ABAN at 4.00, against a minimum of 10.00.
pub(crate) fn order(account_id: &AccountId, quantity: &str, key: Option<&str>) -> PlaceOrder {
    let quantity = Quantity::parse(quantity).unwrap();
    let price = Amount::parse("4.00").unwrap();
    PlaceOrder {
        order_id: Keys::default().new_order_id(account_id),
        account_id: account_id.clone(),
        symbol: Symbol::parse("ABAN").unwrap(),
        quantity,
        price,
        cost: tally::domain::order_cost(price, quantity).unwrap(),
        exchange_minimum: Amount::parse("10.00").unwrap(),
        batch_id: Keys::default().new_batch_id(&Symbol::parse("ABAN").unwrap()),
        idempotency: key.map(|key| {
            Idempotency::new(
                IdempotencyKey::parse(key).unwrap(),
                &[&quantity.units().to_string()],
            )
        }),
        idempotency_ttl_secs: 60,
        created_at_ms: tally::store::now_ms(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_account_creates_replays_and_refuses() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let new = new_account("7.00", Some("k"));
    let created = create_account(&mut conn, &Keys::default(), &new)
        .await
        .unwrap();
    assert!(matches!(created, CreateAccountOutcome::Created(ref id) if *id == new.id));
    // The opening balance is journaled and told to accounting in the same step.
    let events = app.all_entries(Keys::events).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "account.opened");
    assert_eq!(events[0]["account_id"], new.id.as_str());
    assert_eq!(events[0]["amount"], "700");

    let before = redis_snapshot(&mut conn).await;
    // Same key, same request (a fresh id, as a retrying client would draw): replayed.
    let retry = NewAccount {
        id: Keys::default().new_account_id(Some("k")),
        ..new_account("7.00", Some("k"))
    };
    let replayed = create_account(&mut conn, &Keys::default(), &retry)
        .await
        .unwrap();
    assert!(matches!(replayed, CreateAccountOutcome::Replayed(ref id) if *id == new.id));
    // Same key, another request: refused.
    let other = create_account(&mut conn, &Keys::default(), &new_account("8.00", Some("k"))).await;
    assert!(matches!(
        other,
        Err(CreateAccountError::IdempotencyConflict(_))
    ));
    // The same id again: ids are drawn per request, so this is the same call
    // run a second time (a resent call); it answers as the first run did.
    let again = NewAccount {
        id: new.id.clone(),
        ..new_account("1.00", None)
    };
    let exists = create_account(&mut conn, &Keys::default(), &again).await;
    assert!(
        matches!(&exists, Ok(CreateAccountOutcome::Created(id)) if *id == new.id),
        "{exists:?}"
    );
    assert_eq!(
        redis_snapshot(&mut conn).await,
        before,
        "refusals and replays write nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn place_order_buckets_batches_replays_and_refuses() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let rich = new_account("100.00", None);
    create_account(&mut conn, &Keys::default(), &rich)
        .await
        .unwrap();

    let pending = place_order(
        &mut conn,
        &Keys::default(),
        &order(&rich.id, "1", Some("o1")),
    )
    .await
    .unwrap();
    assert_eq!(pending, PlaceOrderOutcome::Pending);
    let closing = order(&rich.id, "2", None);
    let settling = place_order(&mut conn, &Keys::default(), &closing)
        .await
        .unwrap();
    assert_eq!(settling, PlaceOrderOutcome::Settling(closing.batch_id));

    let before = redis_snapshot(&mut conn).await;
    let retry = place_order(
        &mut conn,
        &Keys::default(),
        &order(&rich.id, "1", Some("o1")),
    )
    .await
    .unwrap();
    assert!(matches!(retry, PlaceOrderOutcome::Replayed(_)));
    let conflict = place_order(
        &mut conn,
        &Keys::default(),
        &order(&rich.id, "2", Some("o1")),
    )
    .await;
    assert!(matches!(
        conflict,
        Err(PlaceOrderError::IdempotencyConflict(_))
    ));
    let nobody = place_order(
        &mut conn,
        &Keys::default(),
        &order(&AccountId::new_customer(), "1", None),
    )
    .await;
    assert!(matches!(nobody, Err(PlaceOrderError::AccountNotFound)));
    let too_much = place_order(&mut conn, &Keys::default(), &order(&rich.id, "100", None)).await;
    match too_much {
        Err(PlaceOrderError::InsufficientFunds { balance }) => {
            assert_eq!(balance.to_string(), "88.00")
        }
        other => panic!("expected insufficient funds, got {other:?}"),
    }
    assert_eq!(
        redis_snapshot(&mut conn).await,
        before,
        "refusals and replays write nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_for_exactly_the_balance_succeeds() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let exact = new_account("12.00", None);
    create_account(&mut conn, &Keys::default(), &exact)
        .await
        .unwrap();
    let placed = place_order(&mut conn, &Keys::default(), &order(&exact.id, "3", None))
        .await
        .unwrap();
    assert!(matches!(placed, PlaceOrderOutcome::Settling(_)));
    assert_eq!(app.balance(exact.id.as_str()).await, "0.00");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_of_orders_is_placed_one_by_one_each_with_its_own_verdict() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let rich = new_account("100.00", None);
    let poor = new_account("1.00", None);
    create_account(&mut conn, &Keys::default(), &rich)
        .await
        .unwrap();
    create_account(&mut conn, &Keys::default(), &poor)
        .await
        .unwrap();

    let group = [
        order(&rich.id, "1", Some("g1")), // pending: 4.00 in the bucket
        order(&poor.id, "1", None),       // refused: 1.00 < 4.00
        order(&AccountId::new_customer(), "1", None), // refused: no such account
        order(&rich.id, "1", Some("g1")), // same key, same request: replayed
        order(&rich.id, "2", Some("g1")), // same key, another request: conflict
        order(&rich.id, "1.5", None),     // 6.00: closes a batch with the first
    ];
    let outcomes = place_orders(&mut conn, &Keys::default(), &group)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 6);
    assert!(matches!(outcomes[0], Ok(PlaceOrderOutcome::Pending)));
    assert!(matches!(
        outcomes[1],
        Err(PlaceOrderError::InsufficientFunds { .. })
    ));
    assert!(matches!(outcomes[2], Err(PlaceOrderError::AccountNotFound)));
    assert!(matches!(outcomes[3], Ok(PlaceOrderOutcome::Replayed(id)) if id == group[0].order_id));
    assert!(matches!(
        outcomes[4],
        Err(PlaceOrderError::IdempotencyConflict(_))
    ));
    assert!(matches!(outcomes[5], Ok(PlaceOrderOutcome::Settling(id)) if id == group[5].batch_id));
    assert_eq!(app.balance(rich.id.as_str()).await, "90.00");
    assert_eq!(app.balance(poor.id.as_str()).await, "1.00");
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0]["orders"],
        format!("{},{}", group[0].order_id, group[5].order_id)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_closes_the_stored_bucket_and_leaves_what_follows_pending() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let rich = new_account("100.00", None);
    create_account(&mut conn, &Keys::default(), &rich)
        .await
        .unwrap();
    let stored = order(&rich.id, "1", None);
    place_order(&mut conn, &Keys::default(), &stored)
        .await
        .unwrap(); // 4.00 waits from an earlier call

    let group = [
        order(&rich.id, "1", None),   // 8.00 pending
        order(&rich.id, "1", None),   // 12.00: closes the batch with the stored order
        order(&rich.id, "0.5", None), // 2.00: a new bucket epoch
        order(&rich.id, "1", None),   // 6.00 pending
    ];
    let outcomes = place_orders(&mut conn, &Keys::default(), &group)
        .await
        .unwrap();
    assert!(matches!(outcomes[0], Ok(PlaceOrderOutcome::Pending)));
    assert!(matches!(outcomes[1], Ok(PlaceOrderOutcome::Settling(id)) if id == group[1].batch_id));
    assert!(matches!(outcomes[2], Ok(PlaceOrderOutcome::Pending)));
    assert!(matches!(outcomes[3], Ok(PlaceOrderOutcome::Pending)));

    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0]["orders"],
        format!(
            "{},{},{}",
            stored.order_id, group[0].order_id, group[1].order_id
        )
    );
    let symbol = Symbol::parse("ABAN").unwrap();
    let bucket: HashMap<String, String> =
        conn.hgetall(Keys::default().bucket(&symbol)).await.unwrap();
    assert_eq!(
        (
            bucket["value"].as_str(),
            bucket["count"].as_str(),
            bucket["epoch"].as_str()
        ),
        ("600", "2", "1")
    );
    let waiting: Vec<String> = conn
        .lrange(Keys::default().bucket_orders(&symbol), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        waiting,
        [group[2].order_id.to_string(), group[3].order_id.to_string()]
    );
    let later: HashMap<String, String> = conn
        .hgetall(Keys::default().order(&group[3].order_id))
        .await
        .unwrap();
    assert_eq!(later["epoch"], "1");
    assert_eq!(app.balance("@exchange").await, "18.00");
    assert_eq!(app.balance(rich.id.as_str()).await, "82.00");
    assert!(tally::audit::run(&app.store).await.unwrap().is_clean());
}

/// Two batches closed in one call: the writes the script keeps until its end
/// (closed epochs, the batch index, the journal index) hold both, and the
/// second batch takes only the orders after the first.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_that_closes_two_batches_indexes_both() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let rich = new_account("100.00", None);
    create_account(&mut conn, &Keys::default(), &rich)
        .await
        .unwrap();
    let stored = order(&rich.id, "2", None);
    place_order(&mut conn, &Keys::default(), &stored)
        .await
        .unwrap(); // 8.00 waits from an earlier call

    let group = [
        order(&rich.id, "1", None), // 12.00: closes epoch 0 with the stored order
        order(&rich.id, "2", None), // 8.00 pending in epoch 1
        order(&rich.id, "3", None), // 20.00: closes epoch 1
        order(&rich.id, "0.5", None), // 2.00 pending in epoch 2
    ];
    let outcomes = place_orders(&mut conn, &Keys::default(), &group)
        .await
        .unwrap();
    assert!(matches!(outcomes[0], Ok(PlaceOrderOutcome::Settling(id)) if id == group[0].batch_id));
    assert!(matches!(outcomes[1], Ok(PlaceOrderOutcome::Pending)));
    assert!(matches!(outcomes[2], Ok(PlaceOrderOutcome::Settling(id)) if id == group[2].batch_id));
    assert!(matches!(outcomes[3], Ok(PlaceOrderOutcome::Pending)));

    let symbol = Symbol::parse("ABAN").unwrap();
    let epochs: HashMap<String, String> = conn
        .hgetall(Keys::default().bucket_batches(&symbol))
        .await
        .unwrap();
    assert_eq!(
        epochs,
        HashMap::from([
            ("0".to_owned(), group[0].batch_id.to_string()),
            ("1".to_owned(), group[2].batch_id.to_string()),
        ])
    );
    for closed in [&group[0], &group[2]] {
        let score: Option<f64> = conn
            .zscore(
                Keys::default().batches(crate::helpers::aban_home()),
                closed.batch_id.to_string(),
            )
            .await
            .unwrap();
        assert_eq!(score, Some(closed.created_at_ms as f64));
    }
    let first: Vec<String> = conn
        .lrange(Keys::default().batch_orders(&group[0].batch_id), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        first,
        [stored.order_id.to_string(), group[0].order_id.to_string()]
    );
    let second: Vec<String> = conn
        .lrange(Keys::default().batch_orders(&group[2].batch_id), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        second,
        [group[1].order_id.to_string(), group[2].order_id.to_string()]
    );
    let waiting: Vec<String> = conn
        .lrange(Keys::default().bucket_orders(&symbol), 0, -1)
        .await
        .unwrap();
    assert_eq!(waiting, [group[3].order_id.to_string()]);
    let bucket: HashMap<String, String> =
        conn.hgetall(Keys::default().bucket(&symbol)).await.unwrap();
    assert_eq!(
        (bucket["count"].as_str(), bucket["epoch"].as_str()),
        ("1", "2")
    );
    // Every journal entry (the opening balance and five orders) is in the report's index.
    let journal_entries = app.journal().await.len();
    let indexed = app.journal_index_len().await;
    assert_eq!((journal_entries, indexed), (6, 6));
    assert!(tally::audit::run(&app.store).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread")]
async fn large_round_quantities_are_stored_as_plain_digits() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let whale = new_account("100000000.00", None);
    create_account(&mut conn, &Keys::default(), &whale)
        .await
        .unwrap();
    let large = order(&whale.id, "1000000", None); // 10^14 units, 4,000,000.00 USD
    place_order(&mut conn, &Keys::default(), &large)
        .await
        .unwrap();
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs[0]["quantity_units"], "100000000000000");
    assert_eq!(jobs[0]["quantity"], "1000000.00000000");
    assert_eq!(jobs[0]["value_cents"], "400000000");
    let batch = app.batch(&large.batch_id.to_string()).await;
    assert_eq!(batch["quantity"], "1000000");
    assert_eq!(batch["value"], "4000000.00");
}

/// A batch of one order (3 ABAN), placed through the API (so on a cluster
/// too), as a settle job on the stream, read by a consumer.
pub(crate) async fn settling_batch(app: &crate::helpers::TestApp) -> (BatchId, String) {
    let customer = app.create_account("script", "100.00").await;
    let batch_id = BatchId::parse(&app.place_batch(&customer, "3").await).unwrap();
    let stream_id = read_settle_job(&mut app.redis().await, app.keys(), "test").await;
    (batch_id, stream_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn settlement_scripts_act_only_on_a_batch_in_the_right_state() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };

    // Operators can touch only failed batches.
    let before = redis_snapshot(&mut conn).await;
    assert!(matches!(
        settlement::requeue_failed_batch(&mut conn, &Keys::default(), &batch_id).await,
        Err(OperatorError::NotFailed(..))
    ));
    assert!(matches!(
        settlement::refund_batch(&mut conn, &Keys::default(), &batch_id, "x", false, false).await,
        Err(OperatorError::NotFailed(..))
    ));
    assert_eq!(redis_snapshot(&mut conn).await, before);

    assert_eq!(
        settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
            .await
            .unwrap(),
        [Begun::Call { attempts: 1 }]
    );
    let filled = |fill_id| Filled { job, fill_id };
    assert_eq!(
        settlement::finish_batches(&mut conn, &Keys::default(), "test", &[filled("fill-1")])
            .await
            .unwrap(),
        [JobEnd::Done]
    );
    // Settled: every other ending only acknowledges, and changes nothing.
    let settled = redis_snapshot(&mut conn).await;
    let skipped = JobEnd::Skipped("settled".to_owned());
    assert_eq!(
        settlement::begin_attempts(&mut conn, &Keys::default(), &[job])
            .await
            .unwrap(),
        [Begun::Skipped("settled".to_owned())]
    );
    assert_eq!(
        settlement::finish_batches(&mut conn, &Keys::default(), "test", &[filled("fill-2")])
            .await
            .unwrap(),
        std::slice::from_ref(&skipped)
    );
    assert_eq!(
        settlement::retry_batch(&mut conn, &Keys::default(), &job, 0, "{}", "late", false)
            .await
            .unwrap(),
        skipped
    );
    assert_eq!(
        settlement::dead_letter_batch(&mut conn, &Keys::default(), &job, "late", 9, false)
            .await
            .unwrap(),
        skipped
    );
    assert_eq!(redis_snapshot(&mut conn).await, settled);
    assert_eq!(app.balance("@exchange").await, "0.00");
}

/// Pending settle jobs of the test consumer.
async fn pending_jobs(conn: &mut impl tally::store::Conn) -> usize {
    pending_count(
        conn,
        &Keys::default().settle(crate::helpers::aban_home()),
        settlement::SETTLE_GROUP,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn group_settlement_scripts_decide_each_job_on_its_own() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let (settled_id, settled_stream_id) = settling_batch(&app).await;
    let (open_id, open_stream_id) = settling_batch(&app).await;
    // A batch id ABAN's home shard could hold, as every job on its stream names.
    let missing_id = Keys::default().new_batch_id(&Symbol::parse("ABAN").unwrap());
    let job = |stream_id, batch_id| JobRef {
        stream_id,
        batch_id,
        worker: "test",
    };
    let settled = job(&settled_stream_id, &settled_id);
    let open = job(&open_stream_id, &open_id);
    let missing = job("0-1", &missing_id);
    let filled = |job, fill_id| Filled { job, fill_id };
    settlement::begin_attempts(&mut conn, &Keys::default(), &[settled])
        .await
        .unwrap();
    settlement::finish_batches(
        &mut conn,
        &Keys::default(),
        "test",
        &[filled(settled, "fill-0")],
    )
    .await
    .unwrap();
    assert_eq!(pending_jobs(&mut conn).await, 1);

    // One read: only the open batch goes to the exchange; the others are acknowledged.
    let before = redis_snapshot(&mut conn).await;
    assert_eq!(
        settlement::begin_attempts(&mut conn, &Keys::default(), &[settled, open, missing])
            .await
            .unwrap(),
        [
            Begun::Skipped("settled".to_owned()),
            Begun::Call { attempts: 1 },
            Begun::Skipped("missing".to_owned())
        ]
    );
    let batch: HashMap<String, String> =
        conn.hgetall(Keys::default().batch(&open_id)).await.unwrap();
    assert_eq!(batch["attempts"], "1");
    assert_eq!(pending_jobs(&mut conn).await, 1);
    let settled_batch: HashMap<String, String> = conn
        .hgetall(Keys::default().batch(&settled_id))
        .await
        .unwrap();
    assert_eq!(
        settled_batch["attempts"], "1",
        "a skipped job is not counted"
    );

    // One group of fills: only the open batch settles, every job is acknowledged.
    let journal_before = app.journal().await.len();
    assert_eq!(app.balance("@exchange").await, "12.00");
    assert_eq!(
        settlement::finish_batches(
            &mut conn,
            &Keys::default(),
            "test",
            &[
                filled(settled, "fill-1"),
                filled(open, "fill-2"),
                filled(missing, "fill-3")
            ]
        )
        .await
        .unwrap(),
        [
            JobEnd::Skipped("settled".to_owned()),
            JobEnd::Done,
            JobEnd::Skipped("missing".to_owned())
        ]
    );
    assert_eq!(pending_jobs(&mut conn).await, 0);
    assert_eq!(app.balance("@exchange").await, "0.00");
    let journal_after = app.journal().await.len();
    assert_eq!(journal_after, journal_before + 1, "one settlement entry");
    let batch: HashMap<String, String> =
        conn.hgetall(Keys::default().batch(&open_id)).await.unwrap();
    assert_eq!(
        (batch["status"].as_str(), batch["fill_id"].as_str()),
        ("settled", "fill-2")
    );
    let settled_batch_after: HashMap<String, String> = conn
        .hgetall(Keys::default().batch(&settled_id))
        .await
        .unwrap();
    assert_eq!(
        settled_batch_after["fill_id"], "fill-0",
        "the first fill stands"
    );
    assert!(
        !conn
            .exists::<_, bool>(Keys::default().batch(&missing_id))
            .await
            .unwrap()
    );
    let settled_count: String = conn
        .hget(
            Keys::default().stats(crate::helpers::aban_home()),
            "batches_settled",
        )
        .await
        .unwrap();
    assert_eq!(settled_count, "2");
    assert_ne!(redis_snapshot(&mut conn).await, before);
    assert!(tally::audit::run(&app.store).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_refuses_keys_that_are_not_the_batchs() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };
    assert_eq!(
        settlement::dead_letter_batch(&mut conn, &Keys::default(), &job, "gone", 1, false)
            .await
            .unwrap(),
        JobEnd::Done
    );

    // The batch's list names an order that is not the batch's (it costs 4.00
    // of the batch's 12.00): the script's own checks refuse, writing nothing.
    let customer = new_account("10.00", None);
    create_account(&mut conn, &Keys::default(), &customer)
        .await
        .unwrap();
    let stray = order(&customer.id, "1", None);
    place_order(&mut conn, &Keys::default(), &stray)
        .await
        .unwrap();
    let _: () = redis::cmd("LSET")
        .arg(Keys::default().batch_orders(&batch_id))
        .arg(0)
        .arg(stray.order_id.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let before = redis_snapshot(&mut conn).await;
    let refused =
        settlement::refund_batch(&mut conn, &Keys::default(), &batch_id, "x", false, false).await;
    assert!(
        matches!(refused, Err(OperatorError::StaleOrders(_))),
        "{refused:?}"
    );
    assert_eq!(redis_snapshot(&mut conn).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_an_unanswered_call_may_have_filled_is_refunded_only_when_confirmed() {
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let (batch_id, stream_id) = settling_batch(&app).await;
    let job = JobRef {
        stream_id: &stream_id,
        batch_id: &batch_id,
        worker: "test",
    };
    // A call that got no answer, then one the exchange answered with a 503.
    assert_eq!(
        settlement::retry_batch(
            &mut conn,
            &Keys::default(),
            &job,
            0,
            "{}",
            "timed out",
            true
        )
        .await
        .unwrap(),
        JobEnd::Done
    );
    assert_eq!(
        settlement::dead_letter_batch(&mut conn, &Keys::default(), &job, "503", 2, false)
            .await
            .unwrap(),
        JobEnd::Done
    );

    let before = redis_snapshot(&mut conn).await;
    let refused =
        settlement::refund_batch(&mut conn, &Keys::default(), &batch_id, "x", false, false).await;
    assert!(
        matches!(refused, Err(OperatorError::MayBeFilled(_))),
        "{refused:?}"
    );
    assert_eq!(
        redis_snapshot(&mut conn).await,
        before,
        "refused: nothing written"
    );
    let (orders, cents) = settlement::refund_batch(
        &mut conn,
        &Keys::default(),
        &batch_id,
        "checked",
        true,
        false,
    )
    .await
    .unwrap();
    assert_eq!((orders, cents), (1, 1200));
    assert!(tally::audit::run(&app.store).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread")]
async fn due_jobs_move_to_the_stream_once() {
    let app = spawn_app().await;
    let mut conn = app.redis().await;
    let _: () = redis::cmd("ZADD")
        .arg(Keys::default().settle_retries(crate::helpers::aban_home()))
        .arg(100)
        .arg(r#"{"batch_id":"b1","attempt":"2"}"#)
        .arg(900)
        .arg(r#"{"batch_id":"b2","attempt":"2"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        settlement::promote_due_jobs(
            &mut conn,
            &Keys::default().settle_retries(crate::helpers::aban_home()),
            &Keys::default().settle(crate::helpers::aban_home()),
            500,
            10
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        settlement::promote_due_jobs(
            &mut conn,
            &Keys::default().settle_retries(crate::helpers::aban_home()),
            &Keys::default().settle(crate::helpers::aban_home()),
            500,
            10
        )
        .await
        .unwrap(),
        0
    );
    let jobs = app.settle_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["batch_id"], "b1");
    assert_eq!(jobs[0]["attempt"], "2");
}

/// One `place_orders.lua` call takes orders of customers on two shards for
/// two symbols, as a standalone Redis groups them: each debit, journal entry
/// and `@exchange` credit lands on its customer's shard, each order in its
/// symbol's bucket. An order that names a shard block the call does not
/// have is refused before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn one_call_places_orders_of_several_shards_and_symbols() {
    use tally::domain::SystemAccount;
    use tally::store::orders::{PLACE_ORDERS, place_orders_input};
    let app = spawn_app_on_node(|_| {}).await;
    let mut conn = app.redis().await;
    let keys = app.keys().clone();
    let a = app.create_account("a", "100.00").await;
    let b = app.create_account_off("b", "100.00", &[&a]).await;
    let (shard_a, shard_b) = (app.shard_of(&a), app.shard_of(&b));
    let exchange_on = |shard| keys.system_account(SystemAccount::Exchange, shard);
    let journal_len = |shard| keys.journal(shard);
    let mut before = Vec::new();
    for shard in [shard_a, shard_b] {
        let exchange: Option<i64> = conn.hget(exchange_on(shard), "balance").await.unwrap();
        let journal: usize = conn.xlen(journal_len(shard)).await.unwrap();
        before.push((exchange.unwrap_or(0), journal));
    }
    let xyz = Symbol::parse("XYZ").unwrap();
    let (a_id, b_id) = (AccountId::parse(&a).unwrap(), AccountId::parse(&b).unwrap());
    let mut for_xyz = order(&b_id, "1", None);
    for_xyz.symbol = xyz.clone();
    for_xyz.batch_id = keys.new_batch_id(&xyz);
    let group = [order(&a_id, "1", None), order(&b_id, "1", None), for_xyz];

    let outcomes = place_orders(&mut conn, &keys, &group).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, Ok(PlaceOrderOutcome::Pending))),
        "{outcomes:?}"
    );
    assert_eq!(app.balance(&a).await, "96.00");
    assert_eq!(app.balance(&b).await, "92.00");
    for ((shard, cents, orders), (exchange, journal)) in [(shard_a, 400, 1), (shard_b, 800, 2)]
        .into_iter()
        .zip(before)
    {
        let now: i64 = conn.hget(exchange_on(shard), "balance").await.unwrap();
        assert_eq!(now - exchange, cents, "@exchange on the customer's shard");
        let len: usize = conn.xlen(journal_len(shard)).await.unwrap();
        assert_eq!(len - journal, orders, "the orders' entries on its journal");
    }
    assert_eq!(app.bucket("ABAN").await["value"], "8.00");
    let xyz_value: i64 = conn.hget(keys.bucket(&xyz), "value").await.unwrap();
    assert_eq!(xyz_value, 400, "XYZ's bucket, on its own home shard");

    // Block 2 of home shards, in a call that has one: refused, nothing written.
    let (script_keys, mut script_args) = place_orders_input(&keys, &[order(&a_id, "1", None)]);
    *script_args.last_mut().unwrap() = "2".to_owned();
    let snapshot = redis_snapshot(&mut conn).await;
    let mut invocation = PLACE_ORDERS.prepare_invoke();
    for key in script_keys {
        invocation.key(key);
    }
    for arg in script_args {
        invocation.arg(arg);
    }
    let refused = invocation.invoke_async::<Vec<String>>(&mut conn).await;
    let err = refused.expect_err("an order naming no block is refused");
    assert!(err.to_string().contains("names no shard block"), "{err}");
    assert_eq!(redis_snapshot(&mut conn).await, snapshot, "nothing written");
}
