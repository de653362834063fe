//! All integration tests, in one binary: each test starts its own
//! redis-server and its own API on port 0.

mod access;
mod accounts;
mod advances;
mod balance_limits;
mod browser;
mod cluster;
mod cluster_faults;
mod concurrency;
mod console;
mod crashes;
mod hardening;
mod helpers;
mod metrics;
mod migrate;
mod operations;
mod order_saga;
mod orders;
mod protocol;
mod refund_saga;
mod replica_acks;
mod retention;
mod run_twice;
mod saga_scripts;
mod scripts;
mod settlement;
mod shards;
mod shared_cluster;
mod soak;
mod streams;
mod transfer_saga;
mod transfers;
mod validation;
mod wallet;
