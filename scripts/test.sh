#!/usr/bin/env bash
# Runs the whole test suite against real redis-servers the tests start
# themselves. Installs redis-server first where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
cargo test --locked "$@"
