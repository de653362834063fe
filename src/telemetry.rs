//! Logging: `tracing` to standard error, as text or one JSON object per line.
//! `RUST_LOG` filters (default `info`; `tally bench` defaults to `warn`, since
//! its output is the figures, and at info the settle workers and the notifier
//! write several lines per order to standard error).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several apps in one process) is harmless.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
