#!/usr/bin/env bash
# Runs the whole test suite against real redis-servers the tests start
# themselves, three times: on a standalone Redis; on one again with the sagas
# a cluster runs; and with every app on a 3-master Redis Cluster on loopback.
# Installs redis-server (and redis-cli), and chromium for the console's
# browser tests, first where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
scripts/ensure-chromium.sh
cargo test --locked "$@"
# Again, with every operation over two shards run as its saga, as on a
# Redis Cluster (a standalone Redis otherwise runs it as one script).
TALLY_SAGAS=always cargo test --locked --test api "$@"
# Again, every app on a 3-master Redis Cluster (tests of what only one node
# shows, such as a restart on its AOF, still start a redis-server of their own).
TALLY_TEST_REDIS=cluster cargo test --locked --test api "$@"
