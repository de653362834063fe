#!/usr/bin/env bash
# Runs the whole test suite against real redis-servers the tests start
# themselves, twice: as a standalone Redis runs tally, then with the sagas
# a cluster runs. Installs redis-server first where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
cargo test --locked "$@"
# Again, with every operation over two shards run as its saga, as on a
# Redis Cluster (a standalone Redis otherwise runs it as one script).
TALLY_SAGAS=always cargo test --locked --test api "$@"
