//! The subcommands. Each returns the process exit code.

use std::process::ExitCode;

use anyhow::Context;

use crate::app::{Application, shutdown_signal};
use crate::config::{Command, DevArgs, RedisSettings, ServeArgs};
use crate::redis_server::RedisServer;
use crate::store::Store;

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => dev(args).await,
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
    let app = Application::build(args).await?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Everything in one process. With no TALLY_REDIS_URL, a private redis-server
/// (AOF on) runs under `--data-dir` for as long as this does.
async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let mut serve_args = args.serve;
    let private_redis = match serve_args.redis.redis_url {
        Some(_) => None,
        None => {
            let server = RedisServer::start_durable(&args.data_dir, args.dev_redis_port).await?;
            tracing::info!(
                url = %server.url(),
                data_dir = %args.data_dir.display(),
                "private redis-server started; inspect it with `redis-cli -p {}`",
                server.port()
            );
            serve_args.redis.redis_url = Some(server.url());
            Some(server)
        }
    };
    let app = Application::build(serve_args).await?;
    let served = app.run_until_stopped(shutdown_signal()).await;
    if let Some(server) = private_redis {
        server.stop().await?;
        tracing::info!("private redis-server stopped");
    }
    served?;
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
