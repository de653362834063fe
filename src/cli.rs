//! The subcommands. Each returns the process exit code.

use std::process::ExitCode;

use anyhow::Context;
use futures::FutureExt;
use tokio::sync::watch;

use crate::app::{Application, shutdown_signal};
use crate::config::{
    BatchAction, BenchScenario, Command, DevArgs, ExchangeSimArgs, RedisSettings, ServeArgs,
    WorkerArgs,
};
use crate::domain::BatchId;
use crate::exchange::sim::{ExchangeSim, Faults};
use crate::redis_server::RedisServer;
use crate::store::{Store, orders, settlement};

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(args) => worker(args).await,
        Command::ExchangeSim(args) => exchange_sim(args).await,
        Command::Dev(args) => dev(args).await,
        Command::Batches { redis, action } => batches(&redis, action).await,
        Command::Scheduler { redis, scheduler } => {
            let store = Store::connect(&redis)?;
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
    }
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
    let store = Store::connect(&args.redis)?;
    store
        .ensure_system_accounts()
        .await
        .context("preparing Redis")?;
    crate::workers::run_workers(
        store,
        &args.worker,
        args.ledger.journal_retention,
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
    } = args;
    worker
        .validate_with(&serve.redis)
        .map_err(anyhow::Error::msg)?;
    raise_open_files_limit(serve.api.connections_max);
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
    let retention = serve.ledger.journal_retention;
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
    result.map(|()| ExitCode::SUCCESS)
}

async fn batches(redis: &RedisSettings, action: BatchAction) -> anyhow::Result<ExitCode> {
    let store = Store::connect(redis)?;
    let mut conn = store.conn().await?;
    let parse = |id: &str| BatchId::parse(id).map_err(anyhow::Error::from);
    match action {
        BatchAction::List { limit } => {
            for id in settlement::failed_batches(&mut conn, 0, limit).await? {
                if let Some(batch) = orders::get_batch(&mut conn, &id).await? {
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
            settlement::requeue_failed_batch(&mut conn, &parse(&batch_id)?).await?;
            println!("batch {batch_id} is back on the settle stream");
        }
        BatchAction::Refund {
            batch_id,
            note,
            exchange_confirmed_unfilled,
        } => {
            let batch_id = parse(&batch_id)?;
            let (orders, cents) =
                settlement::refund_batch(&mut conn, &batch_id, &note, exchange_confirmed_unfilled)
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
    let store = Store::connect(redis)?;
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
