//! HTTP itself: a method a path does not take gets 405 with `Allow`, and a
//! request hyper cannot parse gets an answer the client can read.

use reqwest::Method;
use reqwest::header::ALLOW;

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test(flavor = "multi_thread")]
async fn a_method_the_path_does_not_take_gets_405_with_the_methods_it_does() {
    let app = spawn_app().await;
    let account = app.create_account("ada", "1.00").await;
    let cases = [
        (Method::TRACE, "/api/v1/prices".to_owned(), "GET, HEAD"),
        (Method::DELETE, "/api/v1/orders".to_owned(), "POST"),
        (
            Method::PUT,
            "/api/v1/accounts".to_owned(),
            "GET, HEAD, POST",
        ),
        (
            Method::DELETE,
            format!("/api/v1/accounts/{account}"),
            "GET, HEAD",
        ),
        (
            Method::PATCH,
            format!("/api/v1/accounts/{account}/transactions"),
            "GET, HEAD, POST",
        ),
        (Method::GET, "/api/v1/keys/some-key-id".to_owned(), "DELETE"),
        // A POST without a JSON body: 405 for the method, not 415 for the body.
        (Method::POST, "/api/v1/prices".to_owned(), "GET, HEAD"),
        (Method::POST, "/health".to_owned(), "GET, HEAD"),
        (Method::DELETE, "/openapi.yaml".to_owned(), "GET, HEAD"),
        (Method::POST, "/docs/".to_owned(), "GET, HEAD"),
    ];
    for (method, path, allowed) in cases {
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()[ALLOW], allowed, "{method} {path}");
        let problem = assert_problem(response, 405, allowed).await;
        assert_eq!(problem["type"], "/problems/method-not-allowed");
    }

    // HEAD is listed with GET because poem serves it with the GET endpoint.
    for path in ["/api/v1/prices", "/health", "/openapi.yaml"] {
        let head = app.client.head(app.url(path)).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
    }
    // An unknown path is still 404, whatever the method.
    let missing = app
        .client
        .delete(app.url("/api/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_problem(missing, 404, "").await;
    // Authentication still comes first.
    let stranger = reqwest::Client::new()
        .delete(app.url("/api/v1/orders"))
        .send()
        .await
        .unwrap();
    assert!(stranger.headers().get(ALLOW).is_none());
    assert_problem(stranger, 401, "API key").await;
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn raw_exchange(app: &crate::helpers::TestApp, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let bound = std::time::Duration::from_secs(5);
    tokio::time::timeout(bound, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8(answer).unwrap()
}

/// hyper refuses these heads before any of our code runs, and answers them
/// itself (`Server::on_error` in hyper 1.12's `proto/h1/role.rs`): a status
/// line, `connection: close`, `content-length: 0` and `date`, no body, then
/// it closes the connection. No hook lets us give that answer a body; this
/// pins what a client gets.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_hyper_cannot_parse_gets_its_bodiless_400_and_a_closed_connection() {
    let app = spawn_app().await;
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "a space in the path",
            b"GET /api/v1/pri ces HTTP/1.1\r\nHost: x\r\n\r\n",
            "400 Bad Request",
        ),
        (
            "a bare CR in a header value",
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            "400 Bad Request",
        ),
        (
            "two different Content-Length headers",
            b"POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\
              Content-Length: 3\r\n\r\n{}",
            "400 Bad Request",
        ),
        (
            "a header section past the read buffer",
            &[
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".as_slice(),
                &[b'a'; tally::http_server::READ_BUFFER_MAX_BYTES + 1],
                b"\r\n\r\n",
            ]
            .concat(),
            "431 Request Header Fields Too Large",
        ),
    ];
    for (what, request, status) in cases {
        let answer = raw_exchange(&app, request).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect(what);
        let mut lines = head.split("\r\n");
        assert_eq!(
            lines.next(),
            Some(format!("HTTP/1.1 {status}").as_str()),
            "{what}"
        );
        let mut headers: Vec<&str> = lines.collect();
        headers.sort_unstable();
        assert_eq!(headers.len(), 3, "{what}: {head}");
        assert_eq!(headers[0], "connection: close", "{what}");
        assert_eq!(headers[1], "content-length: 0", "{what}");
        assert!(headers[2].starts_with("date: "), "{what}: {head}");
        assert_eq!(body, "", "{what}: no body, and nothing after it");
    }
}
