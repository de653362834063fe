use clap::Parser;

/// mimalloc: the request path allocates many small buffers; glibc's malloc
/// showed up at the top of the profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = tally::config::Cli::parse();
    let default_filter = match cli.command {
        tally::config::Command::Bench { .. } => "warn",
        _ => "info",
    };
    tally::telemetry::init(cli.log_format, default_filter);
    let threads = cli.threads.map(usize::from).or_else(|| {
        matches!(cli.command, tally::config::Command::Bench { .. })
            .then(tally::bench::runtime_threads_default)
    });
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.build().expect("starting the tokio runtime");
    match runtime.block_on(tally::cli::run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
