//! Who may do what: every route against every kind of caller, keys made and
//! revoked over the CLI and HTTP, rate limits, and idempotency keys scoped
//! per API key.

use std::time::Duration;
use tally::store::keys::Keys;

use redis::AsyncCommands;
use serde_json::{Value, json};
use tally::access::{GeneratedKey, Pepper, Role};
use tally::store::api_keys::{KeyRecord, create_api_key};

use crate::helpers::{TEST_PEPPER, TestApp, spawn_app_with};

/// Who sends a request in the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    NoKey,
    Malformed,
    Unknown,
    Revoked,
    Expired,
    OwnCustomer,
    OtherCustomer,
    Role(Role),
}

/// What a route allows.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Readers (read, ops, bank, admin); everyone else 403.
    Readers,
    /// Readers, and the customer who owns the resource; another customer
    /// gets the 404 of a missing resource.
    ReadersAndOwner,
    /// These roles only; everyone else 403.
    Roles(&'static [Role]),
    /// The owning customer as the payer, or admin; everyone else 403.
    Payer,
    /// Readers; customers get the 404 of a missing resource (a system
    /// account is no customer's).
    ReadersCustomersHidden,
    /// A write on the owner's account path: the owner, bank and admin; another
    /// customer gets the 404 of a missing account; other roles 403.
    OwnerWrite,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Allowed,
    Unauthenticated,
    Forbidden,
    Hidden,
}

const READERS: [Role; 4] = [Role::Read, Role::Ops, Role::Bank, Role::Admin];

fn expect(rule: Rule, who: Who) -> Expect {
    let role = match who {
        Who::NoKey | Who::Malformed | Who::Unknown | Who::Revoked | Who::Expired => {
            return Expect::Unauthenticated;
        }
        Who::OwnCustomer | Who::OtherCustomer => Role::Customer,
        Who::Role(role) => role,
    };
    let allowed = |yes: bool| {
        if yes {
            Expect::Allowed
        } else {
            Expect::Forbidden
        }
    };
    match rule {
        Rule::Readers => allowed(READERS.contains(&role)),
        Rule::Roles(roles) => allowed(roles.contains(&role)),
        Rule::ReadersAndOwner => match who {
            Who::OwnCustomer => Expect::Allowed,
            Who::OtherCustomer => Expect::Hidden,
            _ => allowed(READERS.contains(&role)),
        },
        Rule::ReadersCustomersHidden => match who {
            Who::OwnCustomer | Who::OtherCustomer => Expect::Hidden,
            _ => allowed(READERS.contains(&role)),
        },
        Rule::Payer => match who {
            Who::OwnCustomer => Expect::Allowed,
            _ => allowed(role == Role::Admin),
        },
        Rule::OwnerWrite => match who {
            Who::OwnCustomer => Expect::Allowed,
            Who::OtherCustomer => Expect::Hidden,
            _ => allowed(matches!(role, Role::Bank | Role::Admin)),
        },
    }
}

/// A key stored with `change` applied to its record (expired, revoked).
async fn stored_key(app: &TestApp, role: Role, change: impl FnOnce(&mut KeyRecord)) -> String {
    let pepper = Pepper::new(TEST_PEPPER).unwrap();
    let generated = GeneratedKey::new(role, &pepper);
    let mut record = KeyRecord {
        id: generated.id.clone(),
        role,
        account: None,
        secret_hash: generated.secret_hash.clone(),
        created_at_ms: tally::store::now_ms(),
        expires_at_ms: None,
        revoked_at_ms: None,
        label: None,
        reads_per_s: None,
        writes_per_s: None,
    };
    change(&mut record);
    create_api_key(&mut app.redis().await, &Keys::default(), &record)
        .await
        .unwrap();
    generated.plaintext
}

async fn send(
    app: &TestApp,
    authorization: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    // A client of its own: TestApp's sends the admin key with everything.
    let mut request = reqwest::Client::new().request(method.parse().unwrap(), app.url(path));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    if method == "POST" {
        request = request.json(body.unwrap_or(&json!({})));
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_every_kind_of_caller_as_designed_and_refusals_write_nothing() {
    let app = spawn_app_with(|settings| settings.access.auth_failure_burst = 100_000).await;
    let own = app.create_account("own", "1000.00").await;
    let other = app.create_account("other", "1000.00").await;
    let own_order: Value = app
        .place_order(&own, "ABAN", "3")
        .await
        .json()
        .await
        .unwrap();
    let batch = own_order["batch_id"].as_str().unwrap().to_owned();
    let own_order = own_order["id"].as_str().unwrap().to_owned();
    let advance: Value = app
        .post(
            "/api/v1/advances",
            &json!({"account_id": own, "amount": "12.00"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let advance = advance["id"].as_str().unwrap().to_owned();
    let txn: Value = app
        .post(
            &format!("/api/v1/accounts/{own}/transactions"),
            &json!({"kind": "deposit", "amount": "1.00"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let txn = txn["id"].as_str().unwrap().to_owned();

    let mut callers = vec![
        (Who::NoKey, None),
        (Who::Malformed, Some("Bearer not-a-key".to_owned())),
        (Who::Unknown, {
            let pepper = Pepper::new(TEST_PEPPER).unwrap();
            Some(format!(
                "Bearer {}",
                GeneratedKey::new(Role::Admin, &pepper).plaintext
            ))
        }),
        (Who::Revoked, {
            let key = app.key(Role::Admin, None).await;
            let id = tally::access::KeyId::parse(key.split('_').nth(2).unwrap()).unwrap();
            let revoked = tally::store::api_keys::revoke_api_key(
                &mut app.redis().await,
                &Keys::default(),
                &id,
                1,
            )
            .await
            .unwrap();
            assert_eq!(revoked, Some(1));
            Some(format!("Bearer {key}"))
        }),
        (Who::Expired, {
            let now = tally::store::now_ms();
            let key = stored_key(&app, Role::Admin, |key| key.expires_at_ms = Some(now - 1)).await;
            Some(format!("Bearer {key}"))
        }),
        (
            Who::OwnCustomer,
            Some(format!(
                "Bearer {}",
                app.key(Role::Customer, Some(&own)).await
            )),
        ),
        (
            Who::OtherCustomer,
            Some(format!(
                "Bearer {}",
                app.key(Role::Customer, Some(&other)).await
            )),
        ),
    ];
    for role in [
        Role::Read,
        Role::Metrics,
        Role::Ops,
        Role::Bank,
        Role::Admin,
    ] {
        let key = app.key(role, None).await;
        callers.push((Who::Role(role), Some(format!("Bearer {key}"))));
    }

    let victim = app.key(Role::Read, None).await;
    let victim = victim.split('_').nth(2).unwrap().to_owned();
    let bank_admin: &[Role] = &[Role::Bank, Role::Admin];
    let ops_admin: &[Role] = &[Role::Ops, Role::Admin];
    let admin: &[Role] = &[Role::Admin];
    let prices: &[Role] = &[
        Role::Customer,
        Role::Read,
        Role::Ops,
        Role::Bank,
        Role::Admin,
    ];
    let metrics: &[Role] = &[
        Role::Metrics,
        Role::Read,
        Role::Ops,
        Role::Bank,
        Role::Admin,
    ];
    let routes: Vec<(&str, String, Option<Value>, Rule)> = vec![
        ("GET", "/api/v1/accounts".into(), None, Rule::Readers),
        (
            "POST",
            "/api/v1/accounts".into(),
            Some(json!({"name": "n", "balance": "1.00"})),
            Rule::Roles(bank_admin),
        ),
        (
            "GET",
            format!("/api/v1/accounts/{own}"),
            None,
            Rule::ReadersAndOwner,
        ),
        (
            "GET",
            "/api/v1/accounts/@bank".into(),
            None,
            Rule::ReadersCustomersHidden,
        ),
        (
            "POST",
            "/api/v1/orders".into(),
            Some(json!({"account_id": own, "symbol": "ABAN", "quantity": "1"})),
            Rule::Payer,
        ),
        (
            "GET",
            format!("/api/v1/orders/{own_order}"),
            None,
            Rule::ReadersAndOwner,
        ),
        ("GET", "/api/v1/prices".into(), None, Rule::Roles(prices)),
        ("GET", "/api/v1/buckets".into(), None, Rule::Readers),
        (
            "GET",
            format!("/api/v1/batches/{batch}"),
            None,
            Rule::Readers,
        ),
        (
            "GET",
            "/api/v1/batches?status=failed".into(),
            None,
            Rule::Readers,
        ),
        (
            "POST",
            format!("/api/v1/batches/{batch}/retry"),
            None,
            Rule::Roles(ops_admin),
        ),
        (
            "POST",
            format!("/api/v1/batches/{batch}/refund"),
            Some(json!({})),
            Rule::Roles(ops_admin),
        ),
        (
            "POST",
            "/api/v1/transfers".into(),
            Some(
                json!({"src_account_id": own, "dst_account_id": other, "amount": "1.00", "direction": "debit"}),
            ),
            Rule::Payer,
        ),
        (
            "POST",
            "/api/v1/transfers".into(),
            Some(
                json!({"src_account_id": other, "dst_account_id": own, "amount": "1.00", "direction": "credit"}),
            ),
            Rule::Payer,
        ),
        (
            "POST",
            "/api/v1/bank-transactions".into(),
            Some(
                json!({"account_id": own, "amount": "1.00", "direction": "credit", "reason": "r"}),
            ),
            Rule::Roles(bank_admin),
        ),
        ("GET", "/api/v1/transactions".into(), None, Rule::Readers),
        (
            "POST",
            format!("/api/v1/accounts/{own}/transactions"),
            Some(json!({"kind": "deposit", "amount": "1.00"})),
            Rule::Roles(bank_admin),
        ),
        (
            "POST",
            format!("/api/v1/accounts/{own}/transactions"),
            Some(json!({"kind": "withdrawal", "amount": "1.00"})),
            Rule::OwnerWrite,
        ),
        (
            "POST",
            format!("/api/v1/accounts/{own}/transactions"),
            Some(json!({"kind": "card_payment", "amount": "1.00", "merchant": "m"})),
            Rule::OwnerWrite,
        ),
        (
            "GET",
            format!("/api/v1/accounts/{own}/transactions"),
            None,
            Rule::ReadersAndOwner,
        ),
        (
            "GET",
            format!("/api/v1/accounts/{own}/transactions/{txn}"),
            None,
            Rule::ReadersAndOwner,
        ),
        (
            "POST",
            "/api/v1/advances".into(),
            Some(json!({"account_id": own, "amount": "12.00"})),
            Rule::Roles(bank_admin),
        ),
        (
            "GET",
            format!("/api/v1/advances/{advance}"),
            None,
            Rule::ReadersAndOwner,
        ),
        (
            "GET",
            format!("/api/v1/accounts/{own}/advances"),
            None,
            Rule::ReadersAndOwner,
        ),
        ("GET", "/api/v1/audit".into(), None, Rule::Readers),
        ("GET", "/api/v1/keys".into(), None, Rule::Roles(admin)),
        (
            "POST",
            "/api/v1/keys".into(),
            Some(json!({"role": "read"})),
            Rule::Roles(admin),
        ),
        (
            "DELETE",
            format!("/api/v1/keys/{victim}"),
            None,
            Rule::Roles(admin),
        ),
        ("GET", "/metrics".into(), None, Rule::Roles(metrics)),
        ("GET", "/api/v1/no-such-route".into(), None, Rule::Readers),
    ];

    let mut checked = 0;
    for (method, path, body, rule) in &routes {
        for (who, authorization) in &callers {
            let expected = match (path.as_str(), who) {
                // Unknown routes need a key, and then answer 404 to anyone.
                ("/api/v1/no-such-route", Who::OwnCustomer | Who::OtherCustomer | Who::Role(_)) => {
                    Expect::Hidden
                }
                _ => expect(*rule, *who),
            };
            let before = app.snapshot().await;
            let response = send(&app, authorization.as_deref(), method, path, body.as_ref()).await;
            let status = response.status().as_u16();
            let what = format!("{method} {path} as {who:?}: {status}");
            let www_authenticate = response.headers().get("www-authenticate").cloned();
            let content_type = response.headers().get("content-type").cloned();
            let answer = response.text().await.unwrap();
            let refused = expected != Expect::Allowed;
            if refused {
                assert_eq!(
                    content_type.as_ref().map(|value| value.to_str().unwrap()),
                    Some("application/problem+json"),
                    "{what} {answer}"
                );
                assert_eq!(app.snapshot().await, before, "{what}: nothing written");
            }
            match expected {
                Expect::Unauthenticated => {
                    assert_eq!(status, 401, "{what} {answer}");
                    let challenge = www_authenticate.expect("401 carries WWW-Authenticate");
                    assert!(challenge.to_str().unwrap().starts_with("Bearer"), "{what}");
                }
                Expect::Forbidden => assert_eq!(status, 403, "{what} {answer}"),
                Expect::Hidden => {
                    assert_eq!(status, 404, "{what} {answer}");
                    assert!(answer.contains("/problems/not-found"), "{what} {answer}");
                }
                Expect::Allowed => assert!(
                    ![401, 403, 404].contains(&status) && status < 500,
                    "{what} {answer}"
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes.len() * callers.len());
    assert_eq!(app.get("/api/v1/audit").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_customers_resource_answers_exactly_as_a_missing_one() {
    let app = crate::helpers::spawn_app().await;
    let own = app.create_account("own", "10.00").await;
    let other = app.create_account("other", "10.00").await;
    let client = app.client_with(&app.key(Role::Customer, Some(&own)).await);
    let missing = "0190a0b0-0000-7000-8000-000000000000";
    let problem = |path: String| {
        let client = client.clone();
        let url = app.url(&path);
        async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 404);
            response.json::<Value>().await.unwrap()
        }
    };
    let theirs = problem(format!("/api/v1/accounts/{other}")).await;
    let nobodys = problem(format!("/api/v1/accounts/{missing}")).await;
    assert_eq!(
        theirs["detail"].as_str().unwrap().replace(&other, "ID"),
        nobodys["detail"].as_str().unwrap().replace(missing, "ID")
    );
    assert_eq!(theirs["type"], nobodys["type"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_are_scoped_by_api_key() {
    let app = crate::helpers::spawn_app().await;
    let account = app.create_account("a", "100.00").await;
    let first = app.client_with(&app.key(Role::Admin, None).await);
    let second = app.client_with(&app.key(Role::Admin, None).await);
    let order = |client: &reqwest::Client, quantity: &str| {
        client
            .post(app.url("/api/v1/orders"))
            .header("Idempotency-Key", "same-text")
            .json(&json!({"account_id": account, "symbol": "ABAN", "quantity": quantity}))
            .send()
    };
    let a: Value = order(&first, "1").await.unwrap().json().await.unwrap();
    // Another key with the same text and another body: no 409, no replay of
    // the first key's order: a fresh order of its own.
    let response = order(&second, "2").await.unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let b: Value = response.json().await.unwrap();
    assert_ne!(a["id"], b["id"]);
    // Within one key the key still works as before.
    let replay = order(&first, "1").await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(replayed["id"], a["id"]);
    assert_eq!(order(&first, "2").await.unwrap().status(), 409);
    assert_eq!(
        app.balance(&account).await,
        "88.00",
        "4.00 + 8.00, once each"
    );
}

/// Over HTTP a key cannot revoke itself (the last admin key would take the
/// API with it); it still works afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_cannot_revoke_itself_over_http() {
    let app = crate::helpers::spawn_app().await;
    let before = app.snapshot().await;
    let own = format!("/api/v1/keys/{}", app.admin_key_id());
    let response = app.client.delete(app.url(&own)).send().await.unwrap();
    let problem = crate::helpers::assert_problem(response, 409, "cannot revoke itself").await;
    assert_eq!(problem["type"], "/problems/own-key");
    assert_eq!(app.snapshot().await, before);
    assert_eq!(app.get("/api/v1/keys").await.status(), 200, "still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_over_http_are_shown_once_listed_without_secrets_and_revoked() {
    let app = crate::helpers::spawn_app().await;
    let account = app.create_account("a", "1.00").await;
    let response = app
        .post(
            "/api/v1/keys",
            &json!({"role": "customer", "account_id": account, "label": "phone"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("tally_customer_{id}_")), "{key}");
    let customer = app.client_with(&key);
    let own = customer
        .get(app.url(&format!("/api/v1/accounts/{account}")))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);

    let listed = app
        .get("/api/v1/keys?limit=100")
        .await
        .text()
        .await
        .unwrap();
    assert!(listed.contains(&id) && !listed.contains(&key[key.len() - 64..]));

    // 400 breaks the spec; 422 keeps to it but pairs a role and an account wrongly.
    for (bad, status) in [
        (json!({"role": "customer"}), 422),
        (json!({"role": "read", "account_id": account}), 422),
        (json!({"role": "customer", "account_id": "@bank"}), 400),
        (json!({"role": "root"}), 400),
        (json!({"role": "read", "expires_in_secs": 0}), 400),
        (json!({"role": "read", "expires_in_secs": 316_224_001}), 400),
        (json!({"role": "read", "reads_per_s": 0}), 400),
        (json!({"role": "read", "label": "a\nb"}), 400),
    ] {
        let before = app.snapshot().await;
        let response = app.post("/api/v1/keys", &bad).await;
        assert_eq!(response.status(), status, "{bad}");
        assert_eq!(app.snapshot().await, before, "{bad}");
    }

    let revoked = app
        .client
        .delete(app.url(&format!("/api/v1/keys/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let revoked: Value = revoked.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());
    // Every process hears of a revocation within TALLY_API_KEY_CACHE_MS (1 s).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let refused = customer
        .get(app.url(&format!("/api/v1/accounts/{account}")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let missing = app
        .client
        .delete(app.url(&format!("/api/v1/keys/{}", "f".repeat(32))))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_authentications_from_one_address_are_limited() {
    let app = spawn_app_with(|settings| {
        settings.access.auth_failure_burst = 3;
        settings.access.auth_failures_per_s = 1;
    })
    .await;
    // The good key's record is fresh in the API's cache (read within 1 s).
    assert_eq!(app.get("/api/v1/accounts").await.status(), 200);
    let anonymous = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = anonymous
            .get(app.url("/api/v1/accounts"))
            .header("authorization", "Bearer tally_admin_guess")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry_after >= 1);
        }
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    // A good key this process knows is not held back by the guesses from
    // its address; an unknown one is refused without a Redis read.
    assert_eq!(app.get("/api/v1/accounts").await.status(), 200);
    let fresh_key = app.client_with(&app.key(Role::Read, None).await);
    let refused = fresh_key
        .get(app.url("/api/v1/accounts"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
}

/// What `tally keys create` printed: the key, alone on the last line.
fn last_line(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    stdout.lines().last().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_made_with_the_cli_leave_no_byte_of_their_secret_in_redis() {
    let app = crate::helpers::spawn_app().await;
    let account = app.create_account("a", "5.00").await;
    let redis_url = app.redis.url();
    let tally = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["keys", "--redis-url", &redis_url])
            .args(args)
            .env("TALLY_API_KEY_PEPPER", TEST_PEPPER)
            .output()
            .unwrap()
    };
    let mut secrets = Vec::new();
    for args in [
        vec!["create", "--role", "admin", "--label", "first admin"],
        vec![
            "create",
            "--role",
            "customer",
            "--account",
            &account,
            "--expires",
            "30d",
        ],
    ] {
        let key = last_line(&tally(&args));
        assert!(key.starts_with("tally_"), "{key}");
        let response = app
            .client_with(&key)
            .get(app.url(&format!("/api/v1/accounts/{account}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the printed key works");
        secrets.push(key);
    }

    // Every key name and value in Redis, streams and hashes included.
    let mut conn = app.redis().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut everything = keys.join("\n");
    for key in &keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        everything.push_str(&String::from_utf8_lossy(&dump.unwrap_or_default()));
    }
    let snapshot = app.snapshot().await;
    everything.push_str(&format!("{snapshot:?}"));
    for key in &secrets {
        let secret_hex = &key[key.len() - 64..];
        let secret = hex::decode(secret_hex).unwrap();
        // No 8-character run of its hex, and no 4-byte run of its bytes.
        for window in secret_hex.as_bytes().windows(8) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !everything.contains(window),
                "a piece of the secret is in Redis"
            );
        }
        for window in secret.windows(4) {
            assert!(
                !everything
                    .as_bytes()
                    .windows(4)
                    .any(|bytes| bytes == window),
                "bytes of the secret are in Redis"
            );
        }
    }

    let listed = String::from_utf8(tally(&["list"]).stdout).unwrap();
    assert_eq!(
        listed.lines().count(),
        2 + 1,
        "two from the CLI, the test app's admin: {listed}"
    );
    let id = secrets[1].split('_').nth(2).unwrap().to_owned();
    assert!(tally(&["revoke", &id]).status.success());
    assert!(
        String::from_utf8(tally(&["list"]).stdout)
            .unwrap()
            .contains("revoked")
    );
    let without_pepper = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "keys",
            "--redis-url",
            &redis_url,
            "create",
            "--role",
            "read",
        ])
        .env_remove("TALLY_API_KEY_PEPPER")
        .output()
        .unwrap();
    assert!(!without_pepper.status.success());
    assert!(String::from_utf8_lossy(&without_pepper.stderr).contains("TALLY_API_KEY_PEPPER"));
}

/// A `tally serve` process against `app`'s Redis, ready to answer.
async fn serve_process(
    app: &TestApp,
    extra_env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    let port = crate::helpers::free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", &app.redis.url()])
        .env("TALLY_API_KEY_PEPPER", TEST_PEPPER)
        .env("RUST_LOG", "warn")
        .envs(extra_env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    crate::helpers::eventually("tally serve answers", || {
        let url = format!("{base}/ready");
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        }
    })
    .await;
    (child, base)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_revoked_through_one_process_is_refused_by_both_within_a_second() {
    let app = crate::helpers::spawn_app().await;
    // The longest cache a process may be given.
    let env = [("TALLY_API_KEY_CACHE_MS", "1000")];
    let (_one, one) = serve_process(&app, &env).await;
    let (_two, two) = serve_process(&app, &env).await;
    let key = app.key(Role::Read, None).await;
    let reader = app.client_with(&key);
    let admin = app.client_with(&app.admin_key);
    for base in [&one, &two] {
        let response = reader
            .get(format!("{base}/api/v1/accounts"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "both processes know the key");
    }
    let id = key.split('_').nth(2).unwrap();
    let revoked = admin
        .delete(format!("{one}/api/v1/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    // Both processes read the key before the revocation was stored, so a
    // second after it their copies have run out, whatever the timing.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for base in [&one, &two] {
        let response = reader
            .get(format!("{base}/api/v1/accounts"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{base} refuses the revoked key");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_holds_across_two_processes() {
    let app = crate::helpers::spawn_app().await;
    // 5 reads a second with a burst of 5, shared by both processes.
    let env = [
        ("TALLY_RATE_LIMIT_READS_PER_S", "5"),
        ("TALLY_RATE_LIMIT_BURST_S", "1"),
    ];
    let (_one, one) = serve_process(&app, &env).await;
    let (_two, two) = serve_process(&app, &env).await;
    let reader = app.client_with(&app.key(Role::Read, None).await);
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = ([0u64; 2], [0u64; 2]);
    for request in 0..40 {
        let (index, base) = if request % 2 == 0 {
            (0, &one)
        } else {
            (1, &two)
        };
        let response = reader
            .get(format!("{base}/api/v1/prices"))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => ok[index] += 1,
            429 => {
                limited[index] += 1;
                let retry_after: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1);
                let problem: Value = response.json().await.unwrap();
                assert_eq!(problem["type"], "/problems/rate-limited");
            }
            other => panic!("unexpected {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Every token spent was granted by the one bucket in Redis: the burst,
    // plus what refilled meanwhile.
    let allowed = 5.0 + 5.0 * elapsed;
    assert!(
        (ok[0] + ok[1]) as f64 <= allowed.floor() + 1.0,
        "{ok:?} answered in {elapsed:.2} s"
    );
    assert!(
        limited[0] > 0 && limited[1] > 0,
        "both refused: {limited:?}"
    );
    assert!(ok[0] > 0 && ok[1] > 0, "both served: {ok:?}");
}

/// The key scripts, straight against Redis: every answer each can give.
#[tokio::test(flavor = "multi_thread")]
async fn the_key_scripts_answer_every_case_and_refuse_before_writing() {
    use tally::store::api_keys::{KeyCheck, authenticate_key, revoke_api_key};
    use tally::store::rate_limits::{RateLimit, Take, take_rate_tokens};
    let app = crate::helpers::spawn_app().await;
    let mut conn = app.redis().await;
    let pepper = Pepper::new(TEST_PEPPER).unwrap();
    let generated = GeneratedKey::new(Role::Read, &pepper);
    let record = KeyRecord {
        id: generated.id.clone(),
        role: Role::Read,
        account: None,
        secret_hash: generated.secret_hash.clone(),
        created_at_ms: tally::store::now_ms(),
        expires_at_ms: None,
        revoked_at_ms: None,
        label: Some("scripts".to_owned()),
        reads_per_s: Some(2),
        writes_per_s: None,
    };

    // create_api_key: created; run again (a resent call), it answers as the
    // first run did and writes nothing.
    create_api_key(&mut conn, &Keys::default(), &record)
        .await
        .unwrap();
    let before = app.snapshot().await;
    create_api_key(&mut conn, &Keys::default(), &record)
        .await
        .unwrap();
    assert_eq!(app.snapshot().await, before, "a second run writes nothing");

    // authenticate_key: the key's own limit (2/s, burst 2 x 1 s).
    let check = |secret_hash, want| KeyCheck {
        secret_hash,
        class: "reads",
        default_per_s: 1_000,
        burst_s: 1,
        want,
    };
    let (read, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &record.id,
        check(&record.secret_hash, 1),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(read, record);
    assert_eq!(take, Some(Take::Granted(1)));
    // A wrong secret reads the record and takes nothing.
    let wrong = "0".repeat(64);
    let before = app.snapshot().await;
    let (_, take) = authenticate_key(&mut conn, &Keys::default(), &record.id, check(&wrong, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(take, None);
    // Wanting nothing only reads.
    let (_, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &record.id,
        check(&record.secret_hash, 0),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(take, None);
    let bucket = Keys::default().api_key_rate_limit(&record.id, "reads");
    let tat: Option<String> = conn.get(&bucket).await.unwrap();
    assert!(tat.is_some(), "the one token taken is recorded");
    assert_eq!(app.snapshot().await, before, "nothing else was written");
    // The burst is 2: one more, then a refusal with the time until the next.
    let (_, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &record.id,
        check(&record.secret_hash, 1),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(take, Some(Take::Granted(1)));
    let (_, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &record.id,
        check(&record.secret_hash, 1),
    )
    .await
    .unwrap()
    .unwrap();
    let Some(Take::Refused { retry_after }) = take else {
        panic!("refused past the burst: {take:?}");
    };
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(500));
    // An unknown key.
    let unknown = tally::access::KeyId::new();
    let missing = authenticate_key(&mut conn, &Keys::default(), &unknown, check(&wrong, 1))
        .await
        .unwrap();
    assert!(missing.is_none());

    // revoke_api_key: revoked, the same answer again, and an unknown id.
    let epoch = |mut conn: tally::store::connection::Conn| async move {
        tally::store::api_keys::revocation_epoch(&mut conn, &Keys::default())
            .await
            .unwrap()
    };
    let epoch_before = epoch(conn.clone()).await;
    assert_eq!(
        revoke_api_key(&mut conn, &Keys::default(), &record.id, 42)
            .await
            .unwrap(),
        Some(42)
    );
    assert_eq!(
        epoch(conn.clone()).await,
        epoch_before + 1,
        "every process hears of it"
    );
    assert_eq!(
        revoke_api_key(&mut conn, &Keys::default(), &record.id, 99)
            .await
            .unwrap(),
        Some(42)
    );
    assert_eq!(
        epoch(conn.clone()).await,
        epoch_before + 1,
        "the second time moves nothing"
    );
    let before = app.snapshot().await;
    assert_eq!(
        revoke_api_key(&mut conn, &Keys::default(), &unknown, 1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(app.snapshot().await, before);
    // A revoked key takes nothing, even with its secret.
    conn.del::<_, ()>(&bucket).await.unwrap();
    let (read, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &record.id,
        check(&record.secret_hash, 1),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((read.revoked_at_ms, take), (Some(42), None));
    // An expired one neither.
    let expired = GeneratedKey::new(Role::Read, &pepper);
    let expired_record = KeyRecord {
        id: expired.id.clone(),
        secret_hash: expired.secret_hash.clone(),
        expires_at_ms: Some(tally::store::now_ms() - 1),
        ..record.clone()
    };
    create_api_key(&mut conn, &Keys::default(), &expired_record)
        .await
        .unwrap();
    let (_, take) = authenticate_key(
        &mut conn,
        &Keys::default(),
        &expired.id,
        check(&expired.secret_hash, 1),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(take, None);

    // take_rate_tokens: at most a quarter of the burst at once, then refused.
    let limit = RateLimit { per_s: 1, burst: 8 };
    let take = take_rate_tokens(&mut conn, "scripts", limit, 100)
        .await
        .unwrap();
    assert_eq!(take, Take::Granted(2), "a quarter of the burst of 8");
    for _ in 0..3 {
        take_rate_tokens(&mut conn, "scripts", limit, 2)
            .await
            .unwrap();
    }
    let take = take_rate_tokens(&mut conn, "scripts", limit, 1)
        .await
        .unwrap();
    assert!(matches!(take, Take::Refused { retry_after } if retry_after <= Duration::from_secs(1)));

    // release_lock: only its holder releases it.
    let lock = tally::store::keys::AUDIT_RUNNING;
    conn.set::<_, _, ()>(lock, "holder").await.unwrap();
    let release = |token: &'static str| {
        let mut conn = conn.clone();
        async move {
            tally::store::locks::RELEASE_LOCK
                .key(lock)
                .arg(token)
                .invoke_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(release("someone else").await, 0);
    assert_eq!(release("holder").await, 1);
    assert!(!conn.exists::<_, bool>(lock).await.unwrap());
}
