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
