#!/usr/bin/env bash
# Brings the whole system up in one process (`tally dev`): a private
# redis-server with AOF under .tally/, the API on 127.0.0.1:8080 (Swagger UI at
# /docs), the settlement workers and an exchange simulator.
# Installs redis-server first where it is missing. Extra flags go to `tally dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-redis.sh
exec cargo run --locked --release -- dev "$@"
