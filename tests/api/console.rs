//! The operator's console at `/ops`, clicked through in a real headless
//! Chromium ([`crate::browser`]) against the real API, workers and
//! exchange-sim.

use std::time::Duration;

use serde_json::{Value, json};
use tally::access::Role;

use crate::browser::Browser;
use crate::helpers::{
    DOWN, TestApp, TestExchange, TestWorkers, UP, assert_problem, eventually, spawn_app,
    spawn_app_with, spawn_exchange, spawn_workers, test_worker_settings,
};

/// How old the overview's snapshot may be in the test that compares it.
const SNAPSHOT_MS: u64 = 100;

/// Where the overview's screenshot goes when this is set (README's PNG is
/// made with it: see README, "The operator's console").
const SCREENSHOT_ENV: &str = "TALLY_CONSOLE_SCREENSHOT";

/// A form body.
fn form(fields: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// A browser signed in to the console with a new key of `role`.
async fn signed_in(app: &TestApp, role: Role) -> Browser {
    let mut browser = Browser::start(1280, 900).await;
    browser.open(&app.url("/ops")).await;
    assert_eq!(
        browser.count("input[name=key]").await,
        1,
        "the sign-in page"
    );
    let key = app.key(role, None).await;
    browser.fill("#key", &key).await;
    browser.click_and_wait("form button[type=submit]").await;
    assert_eq!(
        browser
            .text("#viewer-role")
            .await
            .map(|text| text.starts_with(role.as_str())),
        Some(true),
        "{}",
        browser.body_text().await
    );
    browser
}

/// A batch of ABAN the exchange-sim failed (`attempts_max` 1, exchange
/// down), with the workers that failed it.
async fn failed_batch(
    app: &TestApp,
    exchange: &TestExchange,
    customers: &[(&str, &str)],
) -> (TestWorkers, Vec<String>, String) {
    let settings = tally::config::WorkerSettings {
        attempts_max: 1,
        ..test_worker_settings(exchange)
    };
    let workers = spawn_workers(app, settings);
    let mut accounts = Vec::new();
    let mut batch = None;
    for (index, (name, quantity)) in customers.iter().enumerate() {
        let account = app.create_account(name, "100.00").await;
        let response = app.place_order(&account, "ABAN", quantity).await;
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.unwrap();
        if index + 1 == customers.len() {
            batch = order["batch_id"].as_str().map(str::to_owned);
        }
        accounts.push(account);
    }
    let batch = batch.expect("the last order closed a batch");
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    (workers, accounts, batch)
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_in_the_overview_shows_the_balances_the_api_does() {
    let app = spawn_app_with(|settings| settings.api.console.snapshot_ms = SNAPSHOT_MS).await;
    let screenshot = std::env::var_os(SCREENSHOT_ENV);
    let exchange = spawn_exchange(UP).await;
    let workers = spawn_workers(&app, test_worker_settings(&exchange));
    let mut customers = Vec::new();
    for (name, quantity) in [("ana", "1"), ("ben", "2"), ("cy", "0.5")] {
        let account = app.create_account(name, "250.00").await;
        assert_eq!(
            app.place_order(&account, "ABAN", quantity).await.status(),
            201
        );
        customers.push(account);
    }
    if screenshot.is_some() {
        // Traffic for the charts, which sample every 10 s.
        traffic(&app, &customers, Duration::from_secs(35)).await;
    }
    // Nothing moves from here on; the snapshot the page shows is read after.
    workers.stop().await;
    tally::audit::record(&app.store).await.unwrap();
    tokio::time::sleep(2 * Duration::from_millis(SNAPSHOT_MS)).await;

    let mut browser = signed_in(&app, Role::Ops).await;
    for account in ["@bank", "@exchange", "@card", "@transit"] {
        let shown = browser
            .text(&format!("[data-account=\"{account}\"]"))
            .await
            .unwrap_or_else(|| panic!("{account} is shown"));
        assert_eq!(shown, app.balance(account).await, "{account}");
    }
    let mut total = 0;
    for customer in &customers {
        total += app.balance_cents(customer).await;
    }
    let total = tally::domain::format_units(total, 2);
    assert_eq!(browser.text("#customers-total").await.unwrap(), total);
    let audit = browser
        .eval("document.getElementById('audit').dataset.clean")
        .await;
    assert_eq!(audit, json!("true"), "{}", browser.body_text().await);
    assert!(
        browser
            .text("#audit")
            .await
            .unwrap()
            .contains(&format!("customers held {total}"))
    );
    assert_eq!(browser.count("tr[data-stream]").await, 4);

    if let Some(path) = screenshot {
        let png = browser.screenshot().await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(&path, png).unwrap();
    }
}

/// Orders and transfers among `customers` for `length`, a few a second.
async fn traffic(app: &TestApp, customers: &[String], length: Duration) {
    let deadline = tokio::time::Instant::now() + length;
    let mut round = 0usize;
    while tokio::time::Instant::now() < deadline {
        let customer = &customers[round % customers.len()];
        let quantity = ["0.1", "0.25", "0.05"][round % 3];
        let _ = app.place_order(customer, "ABAN", quantity).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(40 + (round % 7) as u64 * 20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_exchange_failed_is_retried_from_the_console_and_settles() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, _, batch) = failed_batch(&app, &exchange, &[("unlucky", "3")]).await;

    let mut browser = signed_in(&app, Role::Ops).await;
    browser.open(&app.url("/ops/batches")).await;
    assert_eq!(
        browser.count(&format!("tr[data-batch=\"{batch}\"]")).await,
        1
    );
    browser
        .open(&app.url(&format!("/ops/batches/{batch}")))
        .await;
    assert_eq!(browser.text("#batch-status").await.unwrap(), "failed");
    browser.click_and_wait("#retry").await;
    let effect = browser.text("#effect").await.unwrap();
    assert!(
        effect.contains("asks the exchange again for 3 ABAN (12.00)"),
        "{effect}"
    );

    exchange.set_faults(UP).await;
    browser.click_and_wait("#confirm").await;
    assert!(browser.text("#done").await.unwrap().contains(&batch));
    eventually("the retried batch settles", || async {
        app.batch_status(&batch).await == "settled"
    })
    .await;
    let filled = exchange.order(&batch).await.unwrap();
    assert!(filled.fill.is_some() && filled.calls == 2, "{filled:?}");

    browser.open(&app.url("/ops/log")).await;
    let logged = format!("tr[data-action=\"retry\"][data-target=\"{batch}\"]");
    assert_eq!(
        browser.count(&logged).await,
        1,
        "{}",
        browser.body_text().await
    );
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_from_the_console_credits_every_customer_exactly_once() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    // 4.00 + 2.00 wait in the bucket; 6.00 closes a batch of 12.00.
    let customers = [("x", "1"), ("y", "0.5"), ("z", "1.5")];
    let (workers, accounts, batch) = failed_batch(&app, &exchange, &customers).await;
    workers.stop().await;

    let mut browser = signed_in(&app, Role::Ops).await;
    browser
        .open(&app.url(&format!("/ops/batches/{batch}/refund")))
        .await;
    let effect = browser.text("#effect").await.unwrap();
    assert_eq!(
        effect,
        "This credits 3 accounts 12.00 in all (3 orders), debits @exchange 12.00."
    );
    browser.fill("#note", "exchange gone for the day").await;
    browser.click_and_wait("#confirm").await;
    assert!(browser.text("#done").await.unwrap().contains("refunded"));
    for account in &accounts {
        assert_eq!(app.balance(account).await, "100.00");
    }
    assert_eq!(app.balance("@exchange").await, "0.00");

    // The same form sent again (a double click, a reload) moves nothing.
    let csrf = browser
        .eval("document.querySelector('input[name=csrf]').value")
        .await;
    let again = browser
        .eval(&format!(
            "fetch('/ops/batches/{batch}/refund', {{method: 'POST', body: new URLSearchParams({{csrf: {csrf}, note: 'again'}})}}).then(r => r.status)"
        ))
        .await;
    assert_eq!(again, json!(409));
    for account in &accounts {
        assert_eq!(app.balance(account).await, "100.00");
    }
    assert_eq!(app.journal_count("refund").await, 3, "one refund per order");

    browser.open(&app.url("/ops/log")).await;
    let logged = format!("tr[data-action=\"refund\"][data-target=\"{batch}\"]");
    assert_eq!(browser.count(&logged).await, 1);
    let row = browser.text(&logged).await.unwrap();
    assert!(row.contains("credits 3 accounts 12.00 in all"), "{row}");
    assert!(row.contains("exchange gone for the day"), "{row}");
    let report = tally::audit::run(&app.store).await.unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_key_sees_no_buttons_and_its_forged_posts_are_refused() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, _, batch) = failed_batch(&app, &exchange, &[("unlucky", "3")]).await;
    workers.stop().await;
    let mut browser = signed_in(&app, Role::Read).await;
    let mut operator = signed_in(&app, Role::Ops).await;
    let reader = app.client_with(&app.key(Role::Read, None).await);
    let before = ledger_snapshot(&app).await;

    browser.open(&app.url("/ops/batches")).await;
    assert_eq!(
        browser.count(&format!("tr[data-batch=\"{batch}\"]")).await,
        1
    );
    assert_eq!(browser.count("input[type=checkbox]").await, 0);
    assert_eq!(browser.count("#retry-selected").await, 0);
    browser
        .open(&app.url(&format!("/ops/batches/{batch}")))
        .await;
    assert_eq!(
        browser.count("#retry").await + browser.count("#refund").await,
        0
    );

    // A form made by hand, with this session's own CSRF token.
    let csrf = browser
        .eval("document.querySelector('input[name=csrf]').value")
        .await;
    for (path, fields) in [
        (format!("/ops/batches/{batch}/retry"), json!({"csrf": csrf})),
        (
            format!("/ops/batches/{batch}/refund"),
            json!({"csrf": csrf, "note": "forged"}),
        ),
        (
            "/ops/batches/retry".to_owned(),
            json!({"csrf": csrf, "id": batch}),
        ),
    ] {
        let status = browser
            .eval(&format!(
                "fetch({}, {{method: 'POST', body: new URLSearchParams({fields})}}).then(r => r.status)",
                json!(path)
            ))
            .await;
        assert_eq!(status, json!(403), "{path}");
    }
    // The same with a read key as a bearer, from a script.
    let response = reader
        .post(app.url(&format!("/ops/batches/{batch}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // An ops session's form without its CSRF token is refused too.
    let status = operator
        .eval(&format!(
            "fetch('/ops/batches/{batch}/retry', {{method: 'POST', body: new URLSearchParams({{csrf: 'forged'}})}}).then(r => r.status)"
        ))
        .await;
    assert_eq!(status, json!(403));
    assert_eq!(ledger_snapshot(&app).await, before, "nothing was written");
}

/// Everything in Redis but the console's sessions, whose idle lapse every
/// request pushes back.
async fn ledger_snapshot(app: &TestApp) -> std::collections::BTreeMap<String, String> {
    let mut snapshot = app.snapshot().await;
    snapshot.retain(|key, _| !key.contains(":console:session:"));
    snapshot
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_session_every_page_is_the_sign_in_page_with_no_figures() {
    let app = spawn_app().await;
    let exchange = spawn_exchange(DOWN).await;
    let (workers, _, batch) = failed_batch(&app, &exchange, &[("unlucky", "3")]).await;
    workers.stop().await;
    let before = app.snapshot().await;

    let stranger = reqwest::Client::new();
    for path in [
        "/ops".to_owned(),
        "/ops?live=1".to_owned(),
        "/ops/batches".to_owned(),
        format!("/ops/batches/{batch}"),
        format!("/ops/batches/{batch}/refund"),
        "/ops/log".to_owned(),
    ] {
        for cookie in [None, Some(format!("tally_ops={}", "ab".repeat(32)))] {
            let mut request = stranger.get(app.url(&path));
            if let Some(cookie) = &cookie {
                request = request.header("Cookie", cookie);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} {cookie:?}");
            let body = response.text().await.unwrap();
            assert!(body.contains("Sign in"), "{path}: {body}");
            for figure in [batch.as_str(), "@bank", "@exchange", "12.00"] {
                assert!(!body.contains(figure), "{path} shows {figure}");
            }
        }
    }
    let response = stranger
        .post(app.url(&format!("/ops/batches/{batch}/retry")))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", "x")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(app.snapshot().await, before, "nothing was written");
    // A wrong key signs no one in.
    let response = stranger
        .post(app.url("/ops/sign-in"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[(
            "key",
            "tally_ops_00000000000000000000000000000000_00",
        )]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().get("set-cookie").is_none());
    // A customer's key is not an operator's.
    let customer = app.create_account("someone", "1.00").await;
    let key = app.key(Role::Customer, Some(&customer)).await;
    let response = stranger
        .post(app.url("/ops/sign-in"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[("key", key.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.headers().get("set-cookie").is_none());

    let mut browser = Browser::start(1280, 900).await;
    browser.open(&app.url("/ops")).await;
    assert_eq!(browser.count("input[name=key]").await, 1);
    assert_eq!(browser.count("#customers-total").await, 0);
}

/// Writes `count` failed batches straight to Redis, spread over the shards,
/// four failing in each millisecond (ties a page cursor must step over);
/// returns their ids in the console's order: failure time, then id.
async fn write_failed_batches(app: &TestApp, count: usize) -> Vec<String> {
    use redis::AsyncCommands;
    let keys = app.keys();
    let shards: Vec<_> = keys.shards().collect();
    let mut conn = app.redis().await;
    let base = 1_700_000_000_000i64;
    let mut written = Vec::new();
    for index in 0..count {
        let shard = shards[index % shards.len()];
        let id = tally::domain::BatchId::from_uuid(keys.new_id_in(shard));
        let failed_at = base + (index / 4) as i64;
        let _: () = conn
            .hset_multiple(
                keys.batch(&id),
                &[
                    ("id", id.to_string()),
                    ("symbol", "ABAN".to_owned()),
                    ("quantity", "300000000".to_owned()),
                    ("value", "1200".to_owned()),
                    ("status", "failed".to_owned()),
                    ("attempts", "1".to_owned()),
                    ("created_at", failed_at.to_string()),
                ],
            )
            .await
            .unwrap();
        let _: () = conn
            .zadd(keys.failed_batches(shard), id.to_string(), failed_at)
            .await
            .unwrap();
        let _: () = conn
            .zadd(keys.batches(shard), id.to_string(), failed_at)
            .await
            .unwrap();
        written.push((failed_at, id.to_string()));
    }
    written.sort();
    written.into_iter().map(|(_, id)| id).collect()
}

/// The batch ids a failed-batches page lists, and its next page's path.
fn batches_on_page(html: &str) -> (Vec<String>, Option<String>) {
    let rows = regex::Regex::new(r#"<tr data-batch="([0-9a-f-]+)">"#).unwrap();
    let next = regex::Regex::new(r#"href="(/ops/batches\?[^"]+)" id="next-page""#).unwrap();
    let ids = rows
        .captures_iter(html)
        .map(|found| found[1].to_owned())
        .collect();
    (ids, next.captures(html).map(|found| found[1].to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_batches_page_by_cursor_with_no_gap_or_duplicate() {
    let app = spawn_app_with(|settings| settings.api.console.page_size = 7).await;
    let written = write_failed_batches(&app, 45).await;
    let operator = app.client_with(&app.key(Role::Ops, None).await);
    let mut listed = Vec::new();
    let mut path = Some("/ops/batches".to_owned());
    let mut pages = 0;
    while let Some(next) = path.take() {
        let response = operator.get(app.url(&next)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{next}");
        let (ids, after) = batches_on_page(&response.text().await.unwrap());
        assert!(ids.len() <= 7);
        listed.extend(ids);
        path = after;
        pages += 1;
        assert!(pages <= 10, "paging ends");
    }
    assert_eq!(listed, written, "every failed batch once, in order");

    // Every batch, newest first.
    let mut listed = Vec::new();
    let mut path = Some("/ops/batches?status=all".to_owned());
    let mut pages = 0;
    while let Some(next) = path.take() {
        let response = operator
            .get(app.url(&next.replace("&amp;", "&")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{next}");
        let (ids, before) = batches_on_page(&response.text().await.unwrap());
        listed.extend(ids);
        path = before;
        pages += 1;
        assert!(pages <= 10, "paging ends");
    }
    let newest_first: Vec<String> = written.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first, "every batch once, newest first");
    let response = operator
        .get(app.url("/ops/batches?after=not-a-cursor"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// Calls Redis has served of `command` since it started.
async fn command_calls(app: &TestApp, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_open_consoles_share_one_read_of_redis() {
    // One node: its INFO counts every command the app sends.
    let app = crate::helpers::spawn_app_on_node(|_| {}).await;
    let operator = app.client_with(&app.key(Role::Ops, None).await);
    // Only the overview's read sends XPENDING: one per job stream per shard.
    let per_read = 4 * app.keys().shards().count() as u64;
    let before = command_calls(&app, "xpending").await;
    let pages = futures::future::join_all((0..10).map(|_| {
        let request = operator.get(app.url("/ops")).send();
        async move { request.await.unwrap().status() }
    }))
    .await;
    assert!(pages.iter().all(|status| *status == 200), "{pages:?}");
    let reads = (command_calls(&app, "xpending").await - before) / per_read;
    // One read, or two if the shared one lapsed (or the sampler read) meanwhile.
    assert!(
        (1..=2).contains(&reads),
        "{reads} reads of Redis for 10 pages"
    );
}

/// Signs in with `key` without a browser; returns the session's cookie.
async fn session_cookie(app: &TestApp, key: &str) -> String {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client
        .post(app.url("/ops/sign-in"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[("key", key)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ops"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    cookie.split(';').next().unwrap().to_owned()
}

async fn get_with_cookie(app: &TestApp, path: &str, cookie: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(app.url(path))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_out_or_revoking_the_key_ends_a_session() {
    let app = spawn_app().await;
    let key = app.key(Role::Ops, None).await;
    let cookie = session_cookie(&app, &key).await;
    let (status, page) = get_with_cookie(&app, "/ops", &cookie).await;
    assert_eq!(status, 200);
    let csrf = regex::Regex::new(r#"name="csrf" value="([0-9a-f]+)""#)
        .unwrap()
        .captures(&page)
        .expect("the page carries its CSRF token")[1]
        .to_owned();
    let signed_out = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url("/ops/sign-out"))
        .header("Cookie", &cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", &csrf)]))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 303);
    assert!(
        signed_out.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert_eq!(
        get_with_cookie(&app, "/ops", &cookie).await.0,
        401,
        "signed out"
    );

    let cookie = session_cookie(&app, &key).await;
    assert_eq!(get_with_cookie(&app, "/ops", &cookie).await.0, 200);
    let key_id = key.split('_').nth(2).unwrap();
    let revoked = app
        .client
        .delete(app.url(&format!("/api/v1/keys/{key_id}")))
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    // Revocation reaches every process within the key cache's second.
    eventually("the revoked key's session ends", || async {
        get_with_cookie(&app, "/ops", &cookie).await.0 == 401
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resolve_dead_letter_replays_discards_answers_twice_alike_and_refuses() {
    use tally::store::dead_letters::{Resolution, ResolveError, resolve};
    use tally::store::keys::StreamKind;
    use tally::store::streams::StreamId;
    let app = spawn_app().await;
    let keys = app.keys().clone();
    let shard = keys.shards().nth(1).unwrap();
    let mut conn = app.redis().await;
    let dead = |kind| keys.job_stream_dead(kind, shard);
    let add = |conn: &mut tally::store::connection::Conn,
               key: String,
               fields: Vec<(&'static str, String)>| {
        let mut conn = conn.clone();
        async move {
            let id: String = redis::AsyncCommands::xadd(&mut conn, key, "*", &fields)
                .await
                .unwrap();
            StreamId::parse(&id).unwrap()
        }
    };
    let event =
        json!({"type": "deposit.completed", "amount": "100", "event_id": "s1-5-0"}).to_string();
    let letter = add(
        &mut conn,
        dead(StreamKind::Events),
        vec![("event", event), ("error", "webhook down".to_owned())],
    )
    .await;

    // Replayed: back on the events stream with its own fields and event id.
    let replayed = resolve(
        &mut conn,
        &keys,
        StreamKind::Events,
        shard,
        letter,
        Resolution::Replay,
    )
    .await
    .unwrap()
    .expect("the new entry's id");
    let entries =
        crate::helpers::stream_entries(&mut conn, &keys.job_stream(StreamKind::Events, shard))
            .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["event_id"], "s1-5-0");
    assert_eq!(entries[0]["type"], "deposit.completed");
    assert!(!entries[0].contains_key("error"));
    assert!(
        crate::helpers::stream_entries(&mut conn, &dead(StreamKind::Events))
            .await
            .is_empty()
    );
    // The same call again answers as it did and writes nothing.
    let before = app.snapshot().await;
    let again = resolve(
        &mut conn,
        &keys,
        StreamKind::Events,
        shard,
        letter,
        Resolution::Replay,
    )
    .await;
    assert_eq!(again.unwrap(), Some(replayed.clone()));
    assert_eq!(app.snapshot().await, before);

    // Another job: its fields go back, the dead-letter notes do not.
    let job = add(
        &mut conn,
        dead(StreamKind::Wallet),
        vec![
            ("transaction_id", "t1".to_owned()),
            ("stream_id", "9-0".to_owned()),
            ("error", "unreadable".to_owned()),
            ("worker", "w".to_owned()),
        ],
    )
    .await;
    resolve(
        &mut conn,
        &keys,
        StreamKind::Wallet,
        shard,
        job,
        Resolution::Replay,
    )
    .await
    .unwrap();
    let entries =
        crate::helpers::stream_entries(&mut conn, &keys.job_stream(StreamKind::Wallet, shard))
            .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].len(), 1, "{:?}", entries[0]);
    assert_eq!(entries[0]["transaction_id"], "t1");

    // Discarded: gone, and nothing queued.
    let job = add(
        &mut conn,
        dead(StreamKind::Installments),
        vec![("installment", "a:1".to_owned())],
    )
    .await;
    assert_eq!(
        resolve(
            &mut conn,
            &keys,
            StreamKind::Installments,
            shard,
            job,
            Resolution::Discard
        )
        .await
        .unwrap(),
        None
    );
    assert!(
        crate::helpers::stream_entries(&mut conn, &dead(StreamKind::Installments))
            .await
            .is_empty()
    );
    assert!(
        crate::helpers::stream_entries(
            &mut conn,
            &keys.job_stream(StreamKind::Installments, shard)
        )
        .await
        .is_empty()
    );
    let wallet_job =
        crate::helpers::stream_ids(&mut conn, &keys.job_stream(StreamKind::Wallet, shard)).await;
    // Each resolved letter waits on the shard's resolved stream, whole, with
    // how it was resolved, for retention to archive it.
    let resolved =
        crate::helpers::stream_entries(&mut conn, &keys.dead_letters_resolved(shard)).await;
    let summary: Vec<(&str, &str, &str)> = resolved
        .iter()
        .map(|entry| {
            (
                entry["resolved_stream"].as_str(),
                entry["resolution"].as_str(),
                entry["replayed_as"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("events", "replayed", replayed.as_str()),
            ("wallet", "replayed", wallet_job[0].as_str()),
            ("installments", "discarded", ""),
        ]
    );
    assert_eq!(resolved[0]["resolved_letter"], letter.to_string());
    assert_eq!(resolved[1]["error"], "unreadable", "the letter whole");
    assert_eq!(resolved[2]["installment"], "a:1");

    // Refusals write nothing.
    let not_json = add(
        &mut conn,
        dead(StreamKind::Events),
        vec![("event", "{not json".to_owned())],
    )
    .await;
    let not_strings = add(
        &mut conn,
        dead(StreamKind::Events),
        vec![("event", json!({"amount": 5}).to_string())],
    )
    .await;
    let settle = add(
        &mut conn,
        dead(StreamKind::Settle),
        vec![("batch_id", "b".to_owned())],
    )
    .await;
    let before = app.snapshot().await;
    for (kind, id) in [
        (StreamKind::Events, not_json),
        (StreamKind::Events, not_strings),
    ] {
        let refused = resolve(&mut conn, &keys, kind, shard, id, Resolution::Replay).await;
        assert!(
            matches!(refused, Err(ResolveError::BadEntry(_))),
            "{refused:?}"
        );
    }
    let missing = StreamId { ms: 1, seq: 0 };
    let refused = resolve(
        &mut conn,
        &keys,
        StreamKind::Wallet,
        shard,
        missing,
        Resolution::Discard,
    )
    .await;
    assert!(matches!(refused, Err(ResolveError::Missing)), "{refused:?}");
    let refused = resolve(
        &mut conn,
        &keys,
        StreamKind::Settle,
        shard,
        settle,
        Resolution::Discard,
    )
    .await;
    assert!(
        matches!(refused, Err(ResolveError::SettleJob)),
        "{refused:?}"
    );
    assert_eq!(app.snapshot().await, before, "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_event_is_replayed_from_the_console_and_another_discarded_with_its_reason() {
    use poem::EndpointExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    // An accounting receiver that fails until told otherwise.
    #[derive(Default)]
    struct Receiver {
        failing: AtomicBool,
        events: Mutex<Vec<Value>>,
    }
    #[poem::handler]
    async fn receive(
        body: String,
        receiver: poem::web::Data<&Arc<Receiver>>,
    ) -> poem::http::StatusCode {
        if receiver.failing.load(Ordering::SeqCst) {
            return poem::http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        receiver
            .events
            .lock()
            .unwrap()
            .push(serde_json::from_str(&body).unwrap());
        poem::http::StatusCode::OK
    }
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
    let route = poem::Route::new()
        .at("/events", poem::post(receive))
        .data(receiver.clone());
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(route));

    let app = spawn_app().await;
    let exchange = spawn_exchange(UP).await;
    let settings = tally::config::WorkerSettings {
        accounting_webhook_url: Some(format!("http://{address}/events")),
        webhook_attempts_max: 1,
        ..test_worker_settings(&exchange)
    };
    let workers = spawn_workers(&app, settings);
    let kept = app.create_account("kept", "1.00").await;
    let dropped = app.create_account("dropped", "2.00").await;
    eventually("both account.opened events are dead", || async {
        app.all_length(tally::store::keys::Keys::events_dead).await == 2
    })
    .await;
    receiver.failing.store(false, Ordering::SeqCst);

    let mut browser = signed_in(&app, Role::Ops).await;
    browser
        .open(&app.url("/ops/dead-letters?stream=events"))
        .await;
    assert_eq!(
        browser.count("tr[data-letter]").await,
        2,
        "{}",
        browser.body_text().await
    );
    let row_of = |account: &str| {
        format!(
            "Array.from(document.querySelectorAll('tr[data-letter]')).find(r => r.textContent.includes('{account}')).dataset.letter"
        )
    };
    let kept_letter = browser
        .eval(&row_of(&kept))
        .await
        .as_str()
        .unwrap()
        .to_owned();
    let dropped_letter = browser
        .eval(&row_of(&dropped))
        .await
        .as_str()
        .unwrap()
        .to_owned();

    browser
        .click_and_wait(&format!("tr[data-letter=\"{kept_letter}\"] button.replay"))
        .await;
    assert!(
        browser
            .text("#effect")
            .await
            .unwrap()
            .contains("back on the events stream")
    );
    eventually("the replayed event is delivered", || async {
        receiver
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|event| event["account_id"] == kept.as_str())
    })
    .await;
    let delivered = receiver.events.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1, "only the replayed one: {delivered:?}");
    assert!(
        delivered[0]["event_id"].as_str().unwrap().starts_with('s'),
        "its first event id"
    );

    browser
        .open(&app.url("/ops/dead-letters?stream=events"))
        .await;
    browser
        .fill(
            &format!("tr[data-letter=\"{dropped_letter}\"] input[name=reason]"),
            "test account, never booked",
        )
        .await;
    browser
        .click_and_wait(&format!(
            "tr[data-letter=\"{dropped_letter}\"] button.discard"
        ))
        .await;
    assert!(browser.text("#done").await.unwrap().contains("discarded"));
    assert_eq!(
        app.all_length(tally::store::keys::Keys::events_dead).await,
        0
    );
    browser.open(&app.url("/ops/log")).await;
    let discarded = browser
        .text(&format!(
            "tr[data-action=\"discard events\"][data-target=\"{dropped_letter}\"]"
        ))
        .await
        .expect("the discard is logged");
    assert!(
        discarded.contains("test account, never booked"),
        "{discarded}"
    );
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn find_leads_to_each_record_by_its_exact_id_and_an_account_shows_its_money() {
    let app = spawn_app().await;
    let operator = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", app.key(Role::Read, None).await)
                    .parse()
                    .unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let get = |path: String| {
        let request = operator.get(app.url(&path)).send();
        async move {
            let response = request.await.unwrap();
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get("location")
                .map(|value| value.to_str().unwrap().to_owned());
            (status, location, response.text().await.unwrap())
        }
    };
    let account = app.create_account("finder", "100.00").await;
    let order: Value = app
        .place_order(&account, "ABAN", "3")
        .await
        .json()
        .await
        .unwrap();
    let batch = order["batch_id"].as_str().unwrap().to_owned();
    let deposit = app
        .post(
            &format!("/api/v1/accounts/{account}/transactions"),
            &json!({"kind": "deposit", "amount": "5.00"}),
        )
        .await;
    assert_eq!(deposit.status(), 202);
    let deposit: Value = deposit.json().await.unwrap();
    let deposit = deposit["id"].as_str().unwrap().to_owned();

    let (status, location, _) = get(format!("/ops/find?id={account}")).await;
    assert_eq!(
        (status, location.as_deref()),
        (303, Some(format!("/ops/accounts/{account}").as_str()))
    );
    let (status, location, _) = get(format!("/ops/find?id={batch}")).await;
    assert_eq!(
        (status, location.as_deref()),
        (303, Some(format!("/ops/batches/{batch}").as_str()))
    );
    let (status, _, page) = get(format!("/ops/find?id={}", order["id"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    assert!(page.contains("<h1>order"), "{page}");
    assert!(
        page.contains(&format!("/ops/batches/{batch}")),
        "links its batch"
    );
    assert!(
        page.contains(&format!("/ops/accounts/{account}")),
        "links its account"
    );
    let (status, _, page) = get(format!("/ops/find?id={deposit}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("<h1>wallet transaction"), "{page}");
    let event = app.event_ids().await.into_iter().next().expect("an event");
    let (status, _, page) = get(format!("/ops/find?id={event}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("<h1>event"), "{page}");
    for unknown in [
        uuid::Uuid::now_v7().to_string(),
        "s99-1-0".to_owned(),
        "nothing".to_owned(),
    ] {
        let (status, _, page) = get(format!("/ops/find?id={unknown}")).await;
        assert_eq!(status, 404, "{unknown}");
        assert!(page.contains("Nothing has the id"), "{page}");
    }

    // By Idempotency-Key, with the id of the API key that sent it.
    let keyed = app
        .post_with_key(
            "/api/v1/orders",
            "console-find-1",
            &json!({"account_id": account, "symbol": "ABAN", "quantity": "1"}),
        )
        .await;
    assert_eq!(keyed.status(), 201);
    let keyed: Value = keyed.json().await.unwrap();
    let key_id = app.admin_key_id();
    let (status, location, _) = get(format!(
        "/ops/find?idempotency_key=console-find-1&key_id={key_id}"
    ))
    .await;
    assert_eq!(status, 303);
    assert_eq!(
        location.unwrap(),
        format!("/ops/find?id={}", keyed["id"].as_str().unwrap())
    );
    let (status, _, _) = get(format!(
        "/ops/find?idempotency_key=never-sent&key_id={key_id}"
    ))
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = get("/ops/find?idempotency_key=x&key_id=not-a-key-id".to_owned()).await;
    assert_eq!(status, 400);

    let (status, _, page) = get(format!("/ops/accounts/{account}")).await;
    assert_eq!(status, 200);
    let balance = regex::Regex::new(r#"id="account-balance">([^<]+)<"#).unwrap();
    assert_eq!(
        balance.captures(&page).unwrap()[1],
        app.balance(&account).await
    );
    assert!(page.contains(&deposit), "lists its wallet transaction");
    let (status, _, _) = get("/ops/accounts/@bank".to_owned()).await;
    assert_eq!(status, 404);
}

/// The `data-ref`s (entries) or `data-order`s of an account page, and its
/// next page's path for that list.
fn account_rows(html: &str, list: &str) -> (Vec<String>, Option<String>) {
    let (row, next) = match list {
        "entries" => (
            r#"<tr data-ref="([^"]*)">"#,
            r#"id="older-entries" href="([^"]+)""#,
        ),
        _ => (
            r#"<tr data-order="([0-9a-f-]+)">"#,
            r#"id="older-orders" href="([^"]+)""#,
        ),
    };
    let rows = regex::Regex::new(row).unwrap();
    let next = regex::Regex::new(next).unwrap();
    (
        rows.captures_iter(html)
            .map(|found| found[1].to_owned())
            .collect(),
        next.captures(html).map(|found| found[1].to_owned()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_page_lists_its_journal_entries_and_orders_by_cursor_newest_first() {
    let app = spawn_app_with(|settings| settings.api.console.page_size = 7).await;
    let account = app.create_account("lister", "100.00").await;
    let other = app.create_account("other", "1.00").await;
    let mut orders = Vec::new();
    for _ in 0..12 {
        let order: Value = app
            .place_order(&account, "ABAN", "1")
            .await
            .json()
            .await
            .unwrap();
        orders.push(order["id"].as_str().unwrap().to_owned());
    }
    let credit =
        json!({"account_id": account, "amount": "1.00", "direction": "credit", "reason": "salary"});
    let credit: Value = app
        .post("/api/v1/bank-transactions", &credit)
        .await
        .json()
        .await
        .unwrap();
    let sent = json!({"src_account_id": account, "dst_account_id": other, "amount": "2.00", "direction": "debit"});
    let sent: Value = app
        .post("/api/v1/transfers", &sent)
        .await
        .json()
        .await
        .unwrap();
    // Refused for lack of funds: on its payer's page only.
    let refused = json!({"src_account_id": other, "dst_account_id": account, "amount": "50.00", "direction": "debit"});
    let refused = assert_problem(
        app.post("/api/v1/transfers", &refused).await,
        422,
        "insufficient",
    )
    .await;
    assert!(app.assert_account_lists().await > 0);

    let operator = app.client_with(&app.key(Role::Read, None).await);
    let mut pages = 0;
    let walk = |list: &'static str| {
        let operator = operator.clone();
        let first = app.url(&format!("/ops/accounts/{account}"));
        let app = &app;
        async move {
            let mut listed = Vec::new();
            let mut next = Some(first);
            let mut pages = 0;
            while let Some(url) = next.take() {
                let response = operator.get(url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let (rows, older) = account_rows(&response.text().await.unwrap(), list);
                assert!(rows.len() <= 7, "a page at most");
                listed.extend(rows);
                next = older.map(|path| app.url(&path));
                pages += 1;
                assert!(pages <= 10, "the cursor moves on");
            }
            (listed, pages)
        }
    };
    let (entries, entry_pages) = walk("entries").await;
    pages += entry_pages;
    let mut expected = vec![
        sent["transaction_id"].as_str().unwrap().to_owned(),
        credit["transaction_id"].as_str().unwrap().to_owned(),
    ];
    expected.extend(orders.iter().rev().cloned());
    expected.push(account.clone()); // the opening balance
    assert_eq!(entries, expected, "every entry once, newest first");
    let (listed_orders, order_pages) = walk("orders").await;
    pages += order_pages;
    let newest_first: Vec<String> = orders.iter().rev().cloned().collect();
    assert_eq!(
        listed_orders, newest_first,
        "every order once, newest first"
    );
    assert_eq!(pages, 3 + 2, "16 entries and 12 orders, 7 a page");

    let other_page = operator
        .get(app.url(&format!("/ops/accounts/{other}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (other_entries, _) = account_rows(&other_page, "entries");
    assert_eq!(
        other_entries,
        [
            refused["transaction_id"].as_str().unwrap(),
            sent["transaction_id"].as_str().unwrap(),
            other.as_str()
        ],
        "the payer sees the transfer it asked for and was refused; its payee did not"
    );

    for bad in [
        "entries_before=junk",
        "entries_before=1-0:99999",
        "orders_before=nope",
    ] {
        let response = operator
            .get(app.url(&format!("/ops/accounts/{account}?{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
}
