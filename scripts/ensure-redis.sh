#!/usr/bin/env bash
# Installs redis-server from Debian/Ubuntu packages when it is missing.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
echo "redis-server is missing; installing it with apt-get" >&2
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
# The package may start a system-wide server; tally runs its own.
command -v redis-server >/dev/null
