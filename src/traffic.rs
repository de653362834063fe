//! `tally gen N`: sends N random deposits, withdrawals, card payments and
//! orders through the HTTP API, with a progress bar and a summary.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Requests to send.
    pub count: usize,
    /// The API's base URL.
    #[arg(long, env = "TALLY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Accounts to spread the requests over (created with 100.00 when missing).
    #[arg(long, default_value_t = 20)]
    pub accounts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// An `admin` API key (it opens accounts and places orders for them);
    /// `tally dev` prints one and writes it to `.tally/dev-keys.env`.
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    pub key: String,
}

/// A client that sends `key` as its bearer token with every request.
pub fn authorized_client(key: &str) -> anyhow::Result<reqwest::Client> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
        .context("the API key is not a valid header value")?;
    // Never printed in a Debug dump of the client or a request.
    value.set_sensitive(true);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .pool_idle_timeout(CLIENT_IDLE_MAX)
        .build()?)
}

/// How long a client keeps an idle connection for its next request. The
/// server closes one idle for `TALLY_KEEP_ALIVE_TIMEOUT_MS` (4 s by
/// default); a client that kept it longer could send on a connection the
/// server is closing, and fail a request that never reached it.
pub const CLIENT_IDLE_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Most requests one run sends.
pub const GEN_COUNT_MAX: usize = 1_000_000;
const KINDS: [&str; 4] = ["deposit", "withdrawal", "card_payment", "order"];

pub async fn run(args: GenArgs) -> anyhow::Result<bool> {
    if args.count > GEN_COUNT_MAX || args.accounts == 0 || args.concurrency == 0 {
        bail!("count must be at most {GEN_COUNT_MAX}; accounts and concurrency at least 1");
    }
    let base = args.url.trim_end_matches('/').to_owned();
    let client = authorized_client(&args.key)?;
    let accounts = Arc::new(ensure_accounts(&client, &base, args.accounts).await?);
    let started = Instant::now();
    let mut outcomes: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
    let mut done = 0;
    let mut requests = futures::stream::iter(0..args.count)
        .map(|_| {
            let (client, base, accounts) = (client.clone(), base.clone(), accounts.clone());
            async move { send_one(&client, &base, &accounts).await }
        })
        .buffer_unordered(args.concurrency);
    while let Some((kind, outcome)) = requests.next().await {
        *outcomes.entry((kind, outcome)).or_default() += 1;
        done += 1;
        if done % (args.count / 50).max(1) == 0 || done == args.count {
            let filled = done * 40 / args.count;
            eprint!(
                "\r[{}{}] {done}/{}",
                "#".repeat(filled),
                ".".repeat(40 - filled),
                args.count
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let total = |outcome: &str| {
        outcomes
            .iter()
            .filter(|((_, o), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    println!(
        "summary: {} requests in {elapsed:.1} s ({:.0}/s)",
        args.count,
        args.count as f64 / elapsed
    );
    println!(
        "  accepted {}, refused {}, failed {}",
        total("accepted"),
        total("refused"),
        total("failed")
    );
    for kind in KINDS {
        let count = |outcome: &str| outcomes.get(&(kind, outcome)).copied().unwrap_or(0);
        println!(
            "  {kind:<13} accepted {:>6}  refused {:>6}  failed {:>6}",
            count("accepted"),
            count("refused"),
            count("failed")
        );
    }
    println!(
        "(wallet transactions are applied by the workers; rejections show in their status and in transactions:errors)"
    );
    Ok(total("failed") == 0)
}

async fn ensure_accounts(
    client: &reqwest::Client,
    base: &str,
    wanted: usize,
) -> anyhow::Result<Vec<String>> {
    let page: Value = client
        .get(format!("{base}/api/v1/accounts?limit={}", wanted.min(100)))
        .send()
        .await
        .with_context(|| format!("reaching {base}"))?
        .json()
        .await?;
    let mut accounts: Vec<String> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["id"].as_str().map(str::to_owned))
        .take(wanted)
        .collect();
    while accounts.len() < wanted {
        let body = json!({"name": format!("gen {}", accounts.len()), "balance": "100.00"});
        let created: Value = client
            .post(format!("{base}/api/v1/accounts"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        accounts.push(
            created["id"]
                .as_str()
                .context("account created")?
                .to_owned(),
        );
    }
    Ok(accounts)
}

async fn send_one(
    client: &reqwest::Client,
    base: &str,
    accounts: &[String],
) -> (&'static str, &'static str) {
    let kind = KINDS[fastrand::usize(..KINDS.len())];
    let account = &accounts[fastrand::usize(..accounts.len())];
    let amount = format!("{}.{:02}", fastrand::u32(1..50), fastrand::u32(0..100));
    let request = if kind == "order" {
        let quantity = ["0.5", "1", "2", "3"][fastrand::usize(..4)];
        let body = json!({"account_id": account, "symbol": "ABAN", "quantity": quantity});
        client.post(format!("{base}/api/v1/orders")).json(&body)
    } else {
        let body =
            json!({"kind": kind, "amount": amount, "description": "tally gen", "merchant": "gen"});
        client
            .post(format!("{base}/api/v1/accounts/{account}/transactions"))
            .json(&body)
    };
    let outcome = match request.send().await {
        Ok(response) if response.status().is_success() => "accepted",
        Ok(response) if response.status().is_client_error() => "refused",
        _ => "failed",
    };
    (kind, outcome)
}
