//! The HTTP layer against a stranger: idle, slow and surplus connections
//! cannot stop the service for others; ambiguous JSON and cross-site form
//! posts are refused and write nothing; answers are never sniffed, cached or
//! shared with other sites unless an origin is listed; on shutdown, idle
//! connections close at once and requests in flight finish.
//!
//! Waits are bounded by [`HANG_BOUND`] only to fail on a hang, never to time
//! the server.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, CACHE_CONTROL, CONTENT_TYPE, ORIGIN, X_CONTENT_TYPE_OPTIONS,
};
use serde_json::json;
use tally::app::Application;
use tally::config::{ApiSettings, LedgerSettings, OriginList, RedisSettings, ServeArgs};
use tally::exchange::sim::Faults;
use tally::redis_server::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{
    TestApp, assert_problem, eventually, spawn_app, spawn_app_with, spawn_exchange, spawn_workers,
    test_worker_settings,
};

/// Generous bound on one wait: it fails a test that hangs, nothing more.
const HANG_BOUND: Duration = Duration::from_secs(5);

/// Long enough that no timeout but the one a test is about closes anything.
const NEVER_MS: u64 = 600_000;

fn socket_addr(app: &TestApp) -> SocketAddr {
    app.address
        .trim_start_matches("http://")
        .parse()
        .expect("the app's address is host:port")
}

/// The server runs in this process, so each connection costs two descriptors.
fn raise_open_files_limit(connections: usize) {
    let soft = tally::http_server::raise_open_files_limit(2 * connections)
        .expect("the open files limit can be read and raised");
    assert!(
        soft >= 2 * connections as u64 + 1_024,
        "this test needs an open files limit above {}; the hard limit allows {soft}",
        2 * connections + 1_024
    );
}

/// `count` connections that never send a byte, opened one after another so
/// that the server accepts them in this order.
async fn open_idle_connections(address: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let connection = tokio::time::timeout(HANG_BOUND, TcpStream::connect(address))
            .await
            .expect("connecting does not hang")
            .expect("the connection opens");
        connections.push(connection);
    }
    connections
}

/// Whether the server closed `connection` (which never sent anything, so
/// nothing is waiting to be read on an open one).
fn is_closed(connection: &TcpStream) -> bool {
    match connection.try_read(&mut [0u8; 1]) {
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        Ok(read) => {
            assert_eq!(read, 0, "an idle connection got bytes it never asked for");
            true
        }
    }
}

/// A new client's request, answered within [`HANG_BOUND`].
async fn answered(app: &TestApp, path: &str) -> reqwest::Response {
    tokio::time::timeout(HANG_BOUND, app.get(path))
        .await
        .expect("a new client is answered")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_client_is_answered_while_five_thousand_idle_connections_are_held_open() {
    const IDLE: usize = 5_000;
    raise_open_files_limit(IDLE);
    let app = spawn_app_with(|settings| {
        settings.api.header_read_timeout_ms = NEVER_MS;
        settings.api.keep_alive_timeout_ms = NEVER_MS;
    })
    .await;
    let address = socket_addr(&app);
    // Concurrently, but no faster than the listen backlog takes them.
    let idle: Vec<TcpStream> = futures::stream::iter(0..IDLE)
        .map(|_| TcpStream::connect(address))
        .buffered(64)
        .map(|connection| connection.expect("the connection opens"))
        .collect()
        .await;

    // Accepted after all of them (the backlog is first in, first out).
    let response = answered(&app, "/api/v1/prices").await;
    assert_eq!(response.status(), 200);
    let closed = idle
        .iter()
        .filter(|connection| is_closed(connection))
        .count();
    assert_eq!(closed, 0, "under the bound, no idle connection is closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_connection_bound_the_longest_idle_connections_make_room() {
    const BOUND: usize = 100;
    const IDLE: usize = 400;
    let app = spawn_app_with(|settings| {
        settings.api.connections_max = BOUND;
        settings.api.header_read_timeout_ms = NEVER_MS;
        settings.api.keep_alive_timeout_ms = NEVER_MS;
    })
    .await;
    let idle = open_idle_connections(socket_addr(&app), IDLE).await;

    let response = answered(&app, "/api/v1/prices").await;
    assert_eq!(response.status(), 200);
    // The new client holds one of the BOUND connections, so at most
    // BOUND - 1 of the idle ones stay open.
    eventually(
        "the server closed the idle connections past the bound",
        || {
            let closed = idle
                .iter()
                .filter(|connection| is_closed(connection))
                .count();
            async move { closed > IDLE - BOUND }
        },
    )
    .await;
    let newest = &idle[IDLE - BOUND / 2..];
    assert!(
        newest.iter().all(|connection| !is_closed(connection)),
        "the connections idle longest go first"
    );
}

/// A request with `Expect: 100-continue` that never sends its body: once
/// the `100 Continue` is back, the handler is waiting for it (in flight).
async fn busy_connection(address: SocketAddr, key: &str) -> TcpStream {
    let mut connection = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/v1/accounts HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    connection.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    while !received.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(HANG_BOUND, connection.read(&mut byte))
            .await
            .expect("the server asks for the body")
            .unwrap();
        assert_eq!(read, 1, "the connection stays open");
        received.push(byte[0]);
    }
    assert!(received.starts_with(b"HTTP/1.1 100"), "{received:?}");
    connection
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_connection_is_busy_a_new_one_is_closed_unanswered() {
    const BOUND: usize = 3;
    let app = spawn_app_with(|settings| {
        settings.api.connections_max = BOUND;
        settings.api.request_timeout_ms = NEVER_MS;
    })
    .await;
    let address = socket_addr(&app);
    let mut busy = Vec::new();
    for _ in 0..BOUND {
        busy.push(busy_connection(address, &app.admin_key).await);
    }

    let mut refused = TcpStream::connect(address).await.unwrap();
    // The server may close before this arrives: then writing fails.
    let _ = refused
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(HANG_BOUND, refused.read_to_end(&mut received))
        .await
        .expect("the server closes the surplus connection");
    assert!(received.is_empty(), "no answer: {received:?}");

    // One busy client gives up: its place is free again.
    drop(busy.pop());
    eventually("a new client is answered again", || async {
        let response = tokio::time::timeout(HANG_BOUND, app.client.get(app.url("/health")).send())
            .await
            .expect("no hang");
        response.is_ok_and(|response| response.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_trickling_its_headers_is_cut_at_the_header_read_timeout_unanswered() {
    let app = spawn_app_with(|settings| {
        settings.api.header_read_timeout_ms = 500;
        settings.api.keep_alive_timeout_ms = NEVER_MS;
    })
    .await;
    let connection = TcpStream::connect(socket_addr(&app)).await.unwrap();
    let (mut reader, mut writer) = connection.into_split();
    // One byte every 200 ms, and the head never ends: only the server can
    // end this.
    let trickle = tokio::spawn(async move {
        let head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Trickle: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut received = Vec::new();
    // End of stream or a reset (a byte sent after the close): cut either way.
    let _ = tokio::time::timeout(HANG_BOUND, reader.read_to_end(&mut received))
        .await
        .expect("the server cuts the trickling client");
    assert!(received.is_empty(), "no answer: {received:?}");
    trickle.abort();
}

/// Sends one GET over a fresh connection and reads until the server closes
/// it; returns everything received.
async fn one_request_then_wait_for_close(app: &TestApp) -> String {
    let mut connection = TcpStream::connect(socket_addr(app)).await.unwrap();
    connection
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(HANG_BOUND, connection.read_to_end(&mut received))
        .await
        .expect("the server closes the idle connection")
        .expect("it closes cleanly");
    let received = String::from_utf8(received).unwrap();
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    // HTTP/1.1 keeps the connection open unless told: the server meant to.
    assert!(
        !received.to_ascii_lowercase().contains("connection: close"),
        "{received}"
    );
    received
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keep_alive_connection_idle_past_the_keep_alive_timeout_is_closed() {
    let app = spawn_app_with(|settings| {
        settings.api.keep_alive_timeout_ms = 500;
        settings.api.header_read_timeout_ms = NEVER_MS;
    })
    .await;
    let received = one_request_then_wait_for_close(&app).await;
    assert_eq!(received.matches("HTTP/1.1").count(), 1, "one answer only");
}

/// Pins what `http_server`'s documentation says about hyper 1.x: it arms
/// the header-read timeout also while a keep-alive connection waits for its
/// next request. If a hyper upgrade changes that, the keep-alive timeout is
/// the only idle bound left and this test says so.
#[tokio::test(flavor = "multi_thread")]
async fn hyper_cuts_an_idle_keep_alive_connection_at_the_header_read_timeout() {
    let app = spawn_app_with(|settings| {
        settings.api.header_read_timeout_ms = 500;
        settings.api.keep_alive_timeout_ms = NEVER_MS;
    })
    .await;
    let received = one_request_then_wait_for_close(&app).await;
    assert_eq!(received.matches("HTTP/1.1").count(), 1, "one answer only");
}

/// POSTs `body` as JSON.
async fn post_raw_json(app: &TestApp, path: &str, body: String) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_with_a_key_named_twice_is_refused_at_any_depth_and_writes_nothing() {
    let app = spawn_app().await;
    let customer = app.create_account("Ada", "100.00").await;
    let other = app.create_account("Bob", "0.00").await;
    let cases = [
        (
            "/api/v1/accounts",
            r#"{"name":"Mallory","balance":"1","balance":"1000"}"#.to_owned(),
            "balance",
        ),
        // The same key once unescaped.
        (
            "/api/v1/accounts",
            r#"{"name":"Mallory","balance":"1","bal\u0061nce":"1000"}"#.to_owned(),
            "balance",
        ),
        (
            "/api/v1/accounts",
            r#"{"name":"Mallory","balance":"1","extra":{"note":"a","note":"b"}}"#.to_owned(),
            "note",
        ),
        (
            "/api/v1/transfers",
            format!(
                r#"{{"src_account_id":"{customer}","dst_account_id":"{other}",
                    "amount":"1.00","amount":"99.00","direction":"debit"}}"#
            ),
            "amount",
        ),
        (
            "/api/v1/orders",
            format!(
                r#"{{"account_id":"{customer}","symbol":"ABAN","quantity":"3",
                    "tags":[{{"k":1}},{{"k":1,"k":2}}]}}"#
            ),
            "k",
        ),
    ];
    let before = app.snapshot().await;
    for (path, body, key) in cases {
        let response = post_raw_json(&app, path, body.clone()).await;
        let problem = assert_problem(response, 400, &format!("`{key}`")).await;
        assert_eq!(problem["type"], "/problems/duplicate-key", "{body}");
        assert_eq!(app.snapshot().await, before, "{body} wrote nothing");
    }
    // The first request without its repeat goes through.
    let body = r#"{"name":"Mallory","balance":"1"}"#.to_owned();
    let response = post_raw_json(&app, "/api/v1/accounts", body).await;
    assert_eq!(response.status(), 201);
}

/// A failed batch, with the workers that failed it stopped, so that nothing
/// but the requests of the test writes to Redis.
async fn failed_batch(app: &TestApp) -> String {
    let exchange = spawn_exchange(Faults {
        latency_ms: 0,
        fail_rate: 0.0,
        reject_rate: 1.0,
    })
    .await;
    let workers = spawn_workers(app, test_worker_settings(&exchange));
    let customer = app.create_account("unlucky", "100.00").await;
    let batch = app.place_batch(&customer, "3").await;
    eventually("the batch failed", || async {
        app.batch_status(&batch).await == "failed"
    })
    .await;
    workers.stop().await;
    batch
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_that_is_not_json_gets_415_and_writes_nothing() {
    let app = spawn_app().await;
    let batch = failed_batch(&app).await;
    let retry = format!("/api/v1/batches/{batch}/retry");
    let account = r#"{"name":"Mallory","balance":"1000"}"#;
    let cases: [(&str, Option<&str>, &str); 7] = [
        (
            "/api/v1/accounts",
            Some("application/x-www-form-urlencoded"),
            "name=Mallory&balance=1000",
        ),
        ("/api/v1/accounts", Some("text/plain"), account),
        (
            "/api/v1/accounts",
            Some("multipart/form-data; boundary=x"),
            account,
        ),
        ("/api/v1/accounts", None, account),
        (&retry, None, "{}"),
        (&retry, Some("application/x-www-form-urlencoded"), "a=1"),
        (&retry, Some("text/plain"), "{}"),
    ];
    let before = app.snapshot().await;
    for (path, content_type, body) in cases {
        let mut request = app.client.post(app.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let response = request.send().await.unwrap();
        let problem = assert_problem(response, 415, "application/json").await;
        assert_eq!(
            problem["type"], "/problems/unsupported-media-type",
            "{path} {content_type:?}"
        );
        assert_eq!(
            app.snapshot().await,
            before,
            "{path} {content_type:?} wrote nothing"
        );
    }
    assert_eq!(app.batch_status(&batch).await, "failed");

    // Parameters and case do not matter; a bodiless POST declares no type
    // (its key travels in Authorization, which no cross-site form can set).
    let response = app
        .client
        .post(app.url("/api/v1/accounts"))
        .header(CONTENT_TYPE, "Application/JSON; charset=UTF-8")
        .body(account)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = app.client.post(app.url(&retry)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_ne!(app.batch_status(&batch).await, "failed");
}

/// Asserts the headers every answer carries.
fn assert_not_sniffed_nor_stored(response: &reqwest::Response, what: &str) {
    let headers = response.headers();
    assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{what}");
    assert_eq!(headers[CACHE_CONTROL], "no-store", "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_is_nosniff_and_no_store_and_carries_no_cors_by_default() {
    let app = spawn_app().await;
    let evil = "https://evil.example";
    let prices = app
        .client
        .get(app.url("/api/v1/prices"))
        .header(ORIGIN, evil)
        .send()
        .await
        .unwrap();
    assert_eq!(prices.status(), 200);
    assert_not_sniffed_nor_stored(&prices, "200");
    assert!(prices.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());

    let created = app
        .post(
            "/api/v1/accounts",
            &json!({"name": "Ada", "balance": "1.00"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    assert_not_sniffed_nor_stored(&created, "201");

    let missing = app.get("/api/v1/nothing-here").await;
    assert_eq!(missing.status(), 404);
    assert_not_sniffed_nor_stored(&missing, "404");

    let malformed = post_raw_json(&app, "/api/v1/accounts", "{".to_owned()).await;
    assert_eq!(malformed.status(), 400);
    assert_not_sniffed_nor_stored(&malformed, "400");

    let untyped = app
        .client
        .post(app.url("/api/v1/accounts"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(untyped.status(), 415);
    assert_not_sniffed_nor_stored(&untyped, "415");

    let health = app.get("/health").await;
    assert_not_sniffed_nor_stored(&health, "/health");

    let refused = preflight(&app, evil).await;
    assert!(refused.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert!(
        refused
            .headers()
            .get(ACCESS_CONTROL_ALLOW_METHODS)
            .is_none()
    );
    assert_not_sniffed_nor_stored(&refused, "preflight");
}

/// The preflight a browser sends before a cross-origin JSON POST.
async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/accounts"))
        .header(ORIGIN, origin)
        .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_answers_the_listed_origins_only() {
    let listed = "https://app.example";
    let app = spawn_app_with(|settings| {
        settings.api.cors_allowed_origins = OriginList::parse(listed).unwrap();
    })
    .await;

    let allowed = preflight(&app, listed).await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], listed);
    let methods = allowed.headers()[ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    assert_not_sniffed_nor_stored(&allowed, "listed preflight");
    let prices = app
        .client
        .get(app.url("/api/v1/prices"))
        .header(ORIGIN, listed)
        .send()
        .await
        .unwrap();
    assert_eq!(prices.status(), 200);
    assert_eq!(prices.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], listed);
    // Refusals reach the page too, still as problem+json.
    let missing = app
        .client
        .get(app.url("/api/v1/nothing-here"))
        .header(ORIGIN, listed)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], listed);
    assert_problem(missing, 404, "").await;

    let unlisted = "https://evil.example";
    let refused = preflight(&app, unlisted).await;
    assert!(refused.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    // Answered, but with nothing that lets a browser hand it to the page.
    let prices = app
        .client
        .get(app.url("/api/v1/prices"))
        .header(ORIGIN, unlisted)
        .send()
        .await
        .unwrap();
    assert_eq!(prices.status(), 200);
    assert!(prices.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn on_shutdown_idle_connections_close_at_once_and_a_request_in_flight_finishes() {
    let redis = RedisServer::start_ephemeral().await.unwrap();
    let settings = ServeArgs {
        redis: RedisSettings::for_url(&redis.url()),
        ledger: LedgerSettings::default(),
        api: ApiSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            header_read_timeout_ms: NEVER_MS,
            keep_alive_timeout_ms: NEVER_MS,
            ..ApiSettings::default()
        },
        access: tally::config::AccessSettings {
            api_key_pepper: Some(crate::helpers::TEST_PEPPER.to_owned()),
            ..tally::config::AccessSettings::default()
        },
    };
    let pepper = settings.access.pepper().unwrap();
    let app = Application::build(settings).await.unwrap();
    let key =
        crate::helpers::issue_test_key(&app.store(), &pepper, tally::access::Role::Admin, None)
            .await;
    let address = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let mut idle = TcpStream::connect(address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let mut busy = busy_connection(address, &key).await;

    stop.send(()).unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(HANG_BOUND, idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed at once")
        .unwrap();
    eventually("new connections are refused", || async {
        TcpStream::connect(address).await.is_err()
    })
    .await;
    // The request in flight still gets its answer, and then the close.
    let body = format!("{:<100}", r#"{"name":"Ada","balance":"1.00"}"#);
    busy.write_all(body.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(HANG_BOUND, busy.read_to_end(&mut received))
        .await
        .expect("the request in flight finishes")
        .unwrap();
    let received = String::from_utf8(received).unwrap();
    assert!(received.starts_with("HTTP/1.1 201"), "{received}");
    tokio::time::timeout(HANG_BOUND, server)
        .await
        .expect("the server stops once its connections are done")
        .unwrap()
        .unwrap();
}
