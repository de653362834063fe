//! tally: a Redis-native ledger and settlement service.
//!
//! # Layout
//!
//! - [`access`]: API keys, their roles, and rate limits shared by every API process.
//! - [`config`]: settings from flags and `TALLY_*` variables; every limit named.
//! - [`domain`]: newtypes that validate at the edge (`Amount`, `Quantity`, ids).
//! - [`store`]: Redis: the pool, the key names ([`store::keys`]), one typed
//!   wrapper per Lua script in `lua/`.
//! - [`orders`]: pricing purchase orders, and placing them in grouped calls
//!   (one script, or the order saga).
//! - [`sagas`]: the sweepers that finish cross-shard sagas a crash left.
//! - [`settlement`]: workers that buy batches from the exchange, retry with
//!   backoff, dead-letter, and the operator's retry and refund.
//! - [`advances`]: the scheduler that leases due installments, and their collection.
//! - [`wallet`]: deposits, withdrawals and card payments, applied per account in order.
//! - [`notifier`]: delivers accounting events to the webhook (signed, retried).
//! - [`workers`]: the one generic stream-consumer loop (claim, read, re-claim).
//! - [`exchange`]: `buy_from_exchange` over HTTP, and the `exchange-sim` server.
//! - [`api`]: the poem-openapi HTTP API and its problem+json errors.
//! - [`console`]: the operator's console at `/ops` (server-rendered pages,
//!   sessions, one shared snapshot of the figures).
//! - [`operator`]: what operators do to failed work (retry, refund, replay,
//!   discard), its money effect, and the operator log.
//! - [`app`]: building and running the API (injectable listener and shutdown).
//! - [`http_server`]: the accept loop around hyper that bounds header-read
//!   time, idle keep-alive time and open connections.
//! - [`bench`]: `tally bench`, throughput against this machine's ceilings.
//! - [`traffic`]: `tally gen N`, random traffic through the HTTP API.
//! - [`audit`]: the ledger invariants, checked from what Redis holds, and the
//!   periodic audit the console shows.
//! - [`retention`]: what leaves Redis past its window, into the [`archive`]
//!   (append-only gzip JSON Lines files, each record written once).
//! - [`migrate`]: `tally migrate`, moving data of the single-node key layout
//!   to the sharded one.
//! - [`redis_server`]: a private redis-server for `tally dev` and the tests.
//! - [`cli`]: the subcommands.
//!
//! Every balance change is one Lua script that checks first, then writes the
//! balances, the journal entry and the status in one atomic step.

// ApiError carries its problem+json body inline: built once per refused
// request, its size does not matter, and boxing it would blur every handler.
pub mod access;
pub mod advances;
#[allow(clippy::result_large_err)]
pub mod api;
pub mod app;
pub mod archive;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod exchange;
pub mod http_server;
pub mod migrate;
pub mod notifier;
pub mod operator;
pub mod orders;
pub mod redis_server;
pub mod retention;
pub mod sagas;
pub mod settlement;
pub mod store;
pub mod telemetry;
pub mod traffic;
pub mod wallet;
pub mod workers;
