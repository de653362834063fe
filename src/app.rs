//! Building and running the HTTP API, with an injectable listener address
//! and shutdown signal so that tests bind port 0 and stop it themselves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::ServeArgs;
use crate::http_server::{self, ServerSettings};
use crate::store::Store;

/// How long in-flight requests get to finish after shutdown is signalled.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<AppState>,
}

impl Application {
    /// Connects to Redis, creates the system accounts and binds the listener.
    pub async fn build(settings: ServeArgs) -> anyhow::Result<Self> {
        settings.redis.validate().map_err(anyhow::Error::msg)?;
        let store = Store::connect(&settings.redis)
            .await
            .with_context(|| format!("connecting to Redis at {}", settings.redis.url()))?;
        store
            .ensure_system_accounts()
            .await
            .with_context(|| format!("preparing Redis at {}", settings.redis.url()))?;
        let listener = TcpListener::bind(settings.api.listen)
            .await
            .with_context(|| format!("listening on {}", settings.api.listen))?;
        let local_addr = listener
            .local_addr()
            .context("the listener has a socket address")?;
        let access = crate::access::Authenticator::new(store.clone(), settings.access)?;
        access
            .start()
            .await
            .with_context(|| format!("reading API keys' state at {}", settings.redis.url()))?;
        let replica_acks = crate::store::replica_acks::ReplicaAcks::start(
            &store,
            settings.redis.replica_acks,
            Duration::from_millis(settings.redis.replica_ack_timeout_ms),
        );
        let state = Arc::new(AppState {
            replica_acks,
            orders: crate::orders::OrderGrouper::new(store.clone()),
            access,
            store,
            ledger: settings.ledger,
            api: settings.api,
        });
        Ok(Application {
            listener,
            local_addr,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tracing::info!(address = %self.local_addr, "API listening; Swagger UI at /docs");
        let settings = ServerSettings::from_api(&self.state.api, SHUTDOWN_GRACE);
        http_server::serve(self.listener, api::app(self.state), settings, shutdown).await
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutdown requested");
}
