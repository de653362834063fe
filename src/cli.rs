//! The subcommands. Each returns the process exit code.

use std::process::ExitCode;

use anyhow::Context;
use futures::FutureExt;
use tokio::sync::watch;

use crate::access::{KeyId, KeyRequest, Role, issue_key};
use crate::app::{Application, shutdown_signal};
use crate::config::{
    BatchAction, BenchScenario, Command, DevArgs, ExchangeSimArgs, KeyAction, KeysArgs,
    RedisSettings, ServeArgs, WorkerArgs,
};
use crate::domain::{AccountId, BatchId};
use crate::exchange::sim::{ExchangeSim, Faults};
use crate::redis_server::{RedisCluster, RedisServer};
use crate::store::{Store, api_keys, orders, settlement};

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(args) => worker(args).await,
        Command::ExchangeSim(args) => exchange_sim(args).await,
        Command::Dev(args) => dev(*args).await,
        Command::Batches { redis, action } => batches(&redis, action).await,
        Command::Scheduler { redis, scheduler } => {
            let store = Store::open(&redis).await?;
            let clock = std::sync::Arc::new(crate::advances::SystemClock);
            crate::advances::run_scheduler(store, clock, scheduler.settings(), shutdown_watch())
                .await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gen(args) => {
            let passed = crate::traffic::run(args).await?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench { scenario } => {
            raise_open_files_limit(crate::config::CONNECTIONS_MAX_DEFAULT);
            let passed = match scenario {
                BenchScenario::Orders(args) => crate::bench::orders(args).await?,
                BenchScenario::Settle(args) => crate::bench::settle(args).await?,
                BenchScenario::Report(args) => crate::bench::report(args).await?,
                BenchScenario::Console(args) => crate::bench::console(args).await?,
                BenchScenario::Retention(args) => crate::bench::retention(args).await?,
            };
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Openapi { out } => {
            let spec = crate::api::spec_yaml();
            match out {
                Some(path) => std::fs::write(&path, spec)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{spec}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { redis } => audit(&redis).await,
        Command::Migrate { redis } => crate::migrate::run(&redis).await,
        Command::Keys(args) => keys(args).await,
        Command::Archive { action } => archive(action),
    }
}

async fn keys(args: KeysArgs) -> anyhow::Result<ExitCode> {
    let store = Store::open(&args.redis).await?;
    match args.action {
        KeyAction::Create {
            role,
            account,
            expires,
            label,
            reads_per_s,
            writes_per_s,
        } => {
            let pepper = crate::config::pepper_from(args.api_key_pepper.as_deref())?;
            let account = account
                .map(|account| AccountId::parse(&account))
                .transpose()?;
            let request = KeyRequest {
                role,
                account,
                expires_in: expires,
                label,
                reads_per_s,
                writes_per_s,
            };
            let (generated, record) = issue_key(&store, &pepper, request).await?;
            println!("{}", describe_key(&record));
            println!("{}", generated.plaintext);
        }
        KeyAction::List { limit, offset } => {
            let mut conn = store.conn().await?;
            for record in api_keys::list_api_keys(&mut conn, store.keys(), offset, limit).await? {
                println!("{}", describe_key(&record));
            }
        }
        KeyAction::Revoke { id } => {
            let id = KeyId::parse(&id)?;
            let mut conn = store.conn().await?;
            match api_keys::revoke_api_key(&mut conn, store.keys(), &id, crate::store::now_ms())
                .await?
            {
                Some(_) => {
                    println!("key {id} revoked: every API process refuses it within a second")
                }
                None => anyhow::bail!("key {id} not found"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per key: id, role, account, state, label.
fn describe_key(record: &api_keys::KeyRecord) -> String {
    let time = |ms: i64| {
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        humantime::format_rfc3339_seconds(at).to_string()
    };
    let state = match (record.revoked_at_ms, record.expires_at_ms) {
        (Some(at), _) => format!("revoked {}", time(at)),
        (None, Some(at)) if at <= crate::store::now_ms() => format!("expired {}", time(at)),
        (None, Some(at)) => format!("expires {}", time(at)),
        (None, None) => "live".to_owned(),
    };
    format!(
        "{} {} account={} created={} {state} label={:?}",
        record.id,
        record.role,
        record.account.as_ref().map_or("-", AccountId::as_str),
        time(record.created_at_ms),
        record.label.as_deref().unwrap_or("")
    )
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.api.cursor_secret == crate::config::CURSOR_SECRET_DEFAULT {
        // Anyone can read the default in the source and sign cursors with it.
        tracing::warn!(
            "TALLY_CURSOR_SECRET is not set: report cursors are signed with the public development value; set a secret of your own in production"
        );
    }
    raise_open_files_limit(args.api.connections_max);
    let app = Application::build(args).await?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// So that TALLY_CONNECTIONS_MAX, not the descriptor limit, bounds the API's
/// connections. A failure is no reason not to serve: the limit stays as it was.
fn raise_open_files_limit(connections_max: usize) {
    if let Err(err) = crate::http_server::raise_open_files_limit(connections_max) {
        tracing::warn!(error = %err, "could not raise the open files limit");
    }
}

/// A watch that turns true on SIGINT or SIGTERM.
fn shutdown_watch() -> watch::Receiver<bool> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    stopped
}

async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    args.worker
        .validate_with(&args.redis)
        .map_err(anyhow::Error::msg)?;
    if args.worker.accounting_webhook_url.is_some()
        && args.worker.webhook_secret == crate::config::WEBHOOK_SECRET_DEFAULT
    {
        // The receiver could not tell tally's deliveries from anyone's.
        tracing::warn!(
            "TALLY_WEBHOOK_SECRET is not set: webhook deliveries are signed with the public development value; set a secret of your own in production"
        );
    }
    let store = Store::connect(&args.redis)
        .await
        .with_context(|| format!("connecting to Redis at {}", args.redis.url()))?;
    store
        .ensure_system_accounts()
        .await
        .context("preparing Redis")?;
    crate::workers::run_workers(
        store,
        &args.worker,
        crate::retention::Windows::of(&args.ledger),
        shutdown_watch(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn exchange_sim(args: ExchangeSimArgs) -> anyhow::Result<ExitCode> {
    let faults = Faults {
        latency_ms: args.latency_ms,
        fail_rate: args.fail_rate,
        reject_rate: args.reject_rate,
    };
    let sim = ExchangeSim::bind(args.listen, faults).await?;
    sim.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Everything in one process: the API, the settlement workers and, unless
/// TALLY_EXCHANGE_URL names one, an exchange-sim. With no TALLY_REDIS_URL, a
/// private redis-server (AOF on) runs under `--data-dir` for as long as this does.
async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let DevArgs {
        mut serve,
        mut worker,
        scheduler,
        exchange_sim_listen,
        data_dir,
        dev_redis_port,
        cluster,
    } = args;
    worker
        .validate_with(&serve.redis)
        .map_err(anyhow::Error::msg)?;
    if serve.access.api_key_pepper.is_none() {
        serve.access.api_key_pepper = Some(dev_pepper(&data_dir)?);
    }
    // Archived beside the private Redis, unless TALLY_ARCHIVE_DIR says where.
    if worker.archive_dir == std::path::Path::new(crate::config::ARCHIVE_DIR_DEFAULT) {
        worker.archive_dir = data_dir.join("archive");
    }
    raise_open_files_limit(serve.api.connections_max);
    let private_cluster = match (&serve.redis.redis_url, cluster) {
        (None, true) => {
            let cluster = RedisCluster::start(3, 1, &data_dir.join("cluster")).await?;
            let ports: Vec<String> = cluster
                .masters()
                .iter()
                .map(|master| master.port().to_string())
                .collect();
            tracing::info!(
                masters = %ports.join(","),
                "private Redis Cluster started (3 masters, 3 replicas, in memory); inspect it with `redis-cli -c -p {}`",
                ports[0]
            );
            serve.redis.redis_url = Some(cluster.urls());
            Some(cluster)
        }
        _ => None,
    };
    let private_redis = match serve.redis.redis_url {
        Some(_) => None,
        None => {
            let server = RedisServer::start_durable(&data_dir, dev_redis_port).await?;
            tracing::info!(
                url = %server.url(),
                data_dir = %data_dir.display(),
                "private redis-server started; inspect it with `redis-cli -p {}`",
                server.port()
            );
            serve.redis.redis_url = Some(server.url());
            Some(server)
        }
    };
    let stopped = shutdown_watch();
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    if worker.exchange_url.is_none() {
        let sim = ExchangeSim::bind(exchange_sim_listen, Faults::default()).await?;
        worker.exchange_url = Some(sim.url().to_owned());
        let stop = until_stopped(stopped.clone());
        tasks.spawn(async move {
            sim.run_until_stopped(stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let app = Application::build(serve.clone()).await?;
    let store = app.store();
    let pepper = serve.access.pepper()?;
    print_dev_keys(&store, &pepper, &data_dir, app.local_addr()).await?;
    let stop = until_stopped(stopped.clone());
    tasks.spawn(async move {
        app.run_until_stopped(stop)
            .await
            .map_err(anyhow::Error::from)
    });
    let clock = std::sync::Arc::new(crate::advances::SystemClock);
    tasks.spawn(
        crate::advances::run_scheduler(store.clone(), clock, scheduler.settings(), stopped.clone())
            .map(Ok),
    );
    let workers_stopped = stopped.clone();
    let retention = crate::retention::Windows::of(&serve.ledger);
    tasks.spawn(async move {
        crate::workers::run_workers(store, &worker, retention, workers_stopped).await
    });

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined.map_err(anyhow::Error::from).and_then(|task| task) {
            tracing::error!(error = %err, "a dev task failed; stopping");
            result = Err(err);
            tasks.abort_all();
        }
    }
    if let Some(server) = private_redis {
        server.stop().await?;
        tracing::info!("private redis-server stopped");
    }
    // Its redis-servers are killed as it drops.
    drop(private_cluster);
    result.map(|()| ExitCode::SUCCESS)
}

/// `tally dev`'s pepper: `TALLY_API_KEY_PEPPER` if set, else one kept in the
/// data folder (made on first use), so keys outlive a restart of `tally dev`.
fn dev_pepper(data_dir: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("api-key-pepper");
    if let Ok(pepper) = std::fs::read_to_string(&path) {
        return Ok(pepper.trim().to_owned());
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let pepper = crate::access::Pepper::generate_text();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, pepper.as_bytes())?;
    Ok(pepper)
}

/// How long the keys `tally dev` prints stay valid.
const DEV_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 60 * 60);
/// Requests per second the dev admin key may make: `tally gen` runs on it.
const DEV_ADMIN_RATE_PER_S: u32 = 10_000;
/// The demo customer's opening balance, in USD.
const DEV_DEMO_BALANCE: &str = "1000.00";

/// Makes an admin key and a demo customer's key for this run and prints
/// them (also to `<data dir>/dev-keys.env`, readable by the owner only, for
/// scripts). The demo customer is opened once and kept.
async fn print_dev_keys(
    store: &Store,
    pepper: &crate::access::Pepper,
    data_dir: &std::path::Path,
    address: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let demo = dev_demo_account(store).await?;
    let key = |role, account, rate| KeyRequest {
        role,
        account,
        expires_in: Some(DEV_KEY_LIFETIME),
        label: Some("tally dev".to_owned()),
        reads_per_s: rate,
        writes_per_s: rate,
    };
    revoke_earlier_dev_keys(store).await?;
    let (admin, _) = issue_key(
        store,
        pepper,
        key(Role::Admin, None, Some(DEV_ADMIN_RATE_PER_S)),
    )
    .await?;
    let (customer, _) =
        issue_key(store, pepper, key(Role::Customer, Some(demo.clone()), None)).await?;
    {
        use redis::AsyncCommands;
        let mut conn = store.conn().await?;
        let ids = [admin.id.as_str(), customer.id.as_str()];
        let _: () = conn.sadd(crate::store::keys::DEV_KEYS, &ids).await?;
    }
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("dev-keys.env");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(
        &mut file,
        format!(
            "TALLY_ADMIN_KEY={}\nTALLY_CUSTOMER_KEY={}\nTALLY_DEMO_ACCOUNT={demo}\n",
            admin.plaintext, customer.plaintext
        )
        .as_bytes(),
    )?;
    println!(
        "\ntally dev: API keys for this run (valid 30 days, or until the next run; also in {}):\n  \
         admin     {}\n  \
         customer  {}  (account {demo}, the demo customer)\n\
         Try:  curl -H 'Authorization: Bearer {}' http://{address}/api/v1/accounts\n\
         Swagger UI: http://{address}/docs (Authorize, then paste a key)\n\
         Console:    http://{address}/ops (sign in with the admin key)\n",
        path.display(),
        admin.plaintext,
        customer.plaintext,
        admin.plaintext,
    );
    Ok(())
}

/// Revokes the keys an earlier `tally dev` printed: each run's keys replace
/// the last run's, so they do not pile up live.
async fn revoke_earlier_dev_keys(store: &Store) -> anyhow::Result<()> {
    use redis::AsyncCommands;
    let mut conn = store.conn().await?;
    let earlier: Vec<String> = conn.smembers(crate::store::keys::DEV_KEYS).await?;
    for id in earlier.iter().filter_map(|id| KeyId::parse(id).ok()) {
        api_keys::revoke_api_key(&mut conn, store.keys(), &id, crate::store::now_ms()).await?;
    }
    let _: () = conn.del(crate::store::keys::DEV_KEYS).await?;
    Ok(())
}

/// The demo customer's account: opened with an opening balance on the first
/// `tally dev`, and found again (`tally:dev:demo_account`) on later ones.
async fn dev_demo_account(store: &Store) -> anyhow::Result<AccountId> {
    use redis::AsyncCommands;
    let mut conn = store.conn().await?;
    let known: Option<String> = conn.get(crate::store::keys::DEV_DEMO_ACCOUNT).await?;
    if let Some(id) = known.and_then(|id| AccountId::parse(&id).ok())
        && crate::store::accounts::get_account(&mut conn, store.keys(), &id)
            .await?
            .is_some()
    {
        return Ok(id);
    }
    let new = crate::store::accounts::NewAccount {
        id: AccountId::new_customer(),
        name: crate::domain::AccountName::parse("Demo customer")?,
        opening_balance: crate::domain::Amount::parse(DEV_DEMO_BALANCE)?,
        idempotency: None,
        idempotency_ttl_secs: 1,
    };
    crate::store::accounts::create_account(&mut conn, store.keys(), &new).await?;
    let _: () = conn
        .set(crate::store::keys::DEV_DEMO_ACCOUNT, new.id.as_str())
        .await?;
    Ok(new.id)
}

async fn batches(redis: &RedisSettings, action: BatchAction) -> anyhow::Result<ExitCode> {
    let store = Store::open(redis).await?;
    let mut conn = store.conn().await?;
    let parse = |id: &str| BatchId::parse(id).map_err(anyhow::Error::from);
    match action {
        BatchAction::List { limit } => {
            for id in settlement::failed_batches(&mut conn, store.keys(), 0, limit).await? {
                if let Some(batch) = orders::get_batch(&mut conn, store.keys(), &id).await? {
                    println!(
                        "{id} {} {} value {} orders {} attempts {} error: {}",
                        batch.symbol,
                        batch.quantity,
                        batch.value,
                        batch.order_ids.len(),
                        batch.attempts,
                        batch.last_error.unwrap_or_default()
                    );
                }
            }
        }
        BatchAction::Retry { batch_id } => {
            settlement::requeue_failed_batch(&mut conn, store.keys(), &parse(&batch_id)?).await?;
            println!("batch {batch_id} is back on the settle stream");
        }
        BatchAction::Refund {
            batch_id,
            note,
            exchange_confirmed_unfilled,
        } => {
            let batch_id = parse(&batch_id)?;
            let (orders, cents) = settlement::refund_batch(
                &mut conn,
                store.keys(),
                &batch_id,
                &note,
                exchange_confirmed_unfilled,
                store.sagas(),
            )
            .await?;
            println!(
                "batch {batch_id} refunded: {orders} orders, {}",
                crate::domain::format_units(cents, 2)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(redis: &RedisSettings) -> anyhow::Result<ExitCode> {
    let store = Store::open(redis).await?;
    let report = crate::audit::run(&store)
        .await
        .with_context(|| format!("auditing Redis at {}", redis.url()))?;
    println!("{report}");
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `tally archive find`: the lines archived under an id, one JSON per line.
fn archive(action: crate::config::ArchiveAction) -> anyhow::Result<ExitCode> {
    let crate::config::ArchiveAction::Find { id, dir, shards } = action;
    let keys = crate::store::keys::Keys::new(shards);
    let archive = crate::archive::Archive::new(&dir);
    // A UUID names its shard, as does a journal entry's `ms-seq.shard`; a
    // bare `ms-seq` may be on any.
    let shard_of = |id: &str| match id.split_once('.') {
        Some((_, shard)) => shard
            .parse()
            .ok()
            .and_then(|shard| keys.layout().shard(shard)),
        None => uuid::Uuid::try_parse(id)
            .is_ok()
            .then(|| keys.shard_of_text_id(id)),
    };
    let shards: Vec<_> = keys.shards().collect();
    let found = archive.find(&id, &shards, shard_of)?;
    if found.is_empty() {
        eprintln!("nothing archived under {id} in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    for line in found {
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(ExitCode::SUCCESS)
}
