#!/usr/bin/env bash
# Runs schemathesis (from PyPI, pinned) against the whole system as an outside
# client: builds tally, starts `tally dev` on a fresh temporary data folder and
# free ports, waits for /ready, then tests every operation of the served spec
# with all checks, positive and negative data, and all four phases (examples,
# coverage, fuzzing, stateful), bounded in examples and time. Settings are in
# .ci/schemathesis.toml; every check or phase left out or tuned is named, with
# the reason, in .ci/schemathesis-leave-outs.md.
#
# Installs python3 and python3-venv with apt-get where they are missing, and
# schemathesis into a venv under target/ (not the system). Reports go to
# target/schemathesis/. Exits non-zero on any failure schemathesis reports,
# and on any 429 the admin key got (its rate limit must not shape the run).
#
# Extra arguments go to `schemathesis run`, e.g. `--max-time 30` or
# `--include-path /orders`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

SCHEMATHESIS_VERSION=4.32.5
venv=$root/target/schemathesis-venv
reports=$root/target/schemathesis

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi

# Python with venv (Debian splits ensurepip out into python3-venv).
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "python3 or python3-venv is missing; installing them with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
fi

# schemathesis, pinned, in its own venv; reinstalled only when the pin changes.
if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]; then
  echo "installing schemathesis==$SCHEMATHESIS_VERSION into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

scripts/ensure-redis.sh
cargo build --locked --quiet

# Three free loopback ports (API, private redis-server, exchange-sim), so a
# developer's `tally dev` on 8080/6399/8090 keeps running undisturbed.
read -r api_port redis_port sim_port < <("$venv/bin/python" - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)

data_dir=$(mktemp -d "${TMPDIR:-/tmp}/tally-schemathesis.XXXXXX")
log=$reports/tally-dev.log
mkdir -p "$reports"
rm -f "$reports/junit.xml" "$reports/events.ndjson" "$reports/requests.har"
tally_pid=""
stop() {
  if [ -n "$tally_pid" ] && kill -0 "$tally_pid" 2>/dev/null; then
    kill -TERM "$tally_pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$tally_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$tally_pid" 2>/dev/null || true
    wait "$tally_pid" 2>/dev/null || true
  fi
  rm -rf "$data_dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

# The server limits failed authentications per client address (default 1/s,
# burst 20, then 429); schemathesis's ignored_auth check sends many keyless
# requests from 127.0.0.1 and expects 401 to each. The limit itself is tested
# in tests/api/access.rs.
# A Redis, exchange or pepper from the caller's environment is not used: the
# run gets its own, fresh.
env -u TALLY_REDIS_URL -u TALLY_EXCHANGE_URL -u TALLY_API_KEY_PEPPER \
  TALLY_AUTH_FAILURES_PER_S=100000 \
  TALLY_AUTH_FAILURE_BURST=1000000 \
  NO_COLOR=1 \
  target/debug/tally dev \
  --listen "127.0.0.1:$api_port" \
  --data-dir "$data_dir" \
  --dev-redis-port "$redis_port" \
  --exchange-sim-listen "127.0.0.1:$sim_port" \
  >"$log" 2>&1 &
tally_pid=$!

origin="http://127.0.0.1:$api_port"
ready=""
for _ in $(seq 300); do
  if ! kill -0 "$tally_pid" 2>/dev/null; then
    break
  fi
  # Python rather than curl, which a fresh Debian may lack.
  if [ -s "$data_dir/dev-keys.env" ] && "$venv/bin/python" -c \
    'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$origin/ready" >/dev/null 2>&1; then
    ready=yes
    break
  fi
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "tally dev did not become ready within 60 s; its log:" >&2
  tail -n 50 "$log" >&2
  exit 1
fi
# shellcheck disable=SC1091
. "$data_dir/dev-keys.env"
export TALLY_ADMIN_KEY
echo "tally dev is ready at $origin (data in $data_dir, log in $log)"

# Hypothesis (under schemathesis) keeps its files under target/, not in the tree.
export HYPOTHESIS_STORAGE_DIRECTORY="$reports/hypothesis"
started=$(date +%s)
set +e
"$venv/bin/schemathesis" --config-file .ci/schemathesis.toml run \
  --url "$origin/api/v1" \
  --checks all \
  --mode all \
  --phases examples,coverage,fuzzing,stateful \
  --seed 16 \
  --max-examples 20 \
  --max-time 150 \
  --report junit,ndjson,har \
  --report-junit-path "$reports/junit.xml" \
  --report-ndjson-path "$reports/events.ndjson" \
  --report-har-path "$reports/requests.har" \
  --no-color \
  "$@" \
  "$origin/openapi.yaml"
status=$?
set -e
elapsed=$(($(date +%s) - started))

echo "schemathesis: reports in $reports"

# A summary: each failed operation with its distinct failure kinds (from the
# JUnit report), the requests made by status (from the HAR), and a closing
# "N passed, N failed" over the JUnit test cases (one per operation, and one
# for the stateful phase). No answer may be 429: the admin key's limit is
# 10,000/s and failed authentications are unlimited here, so a 429 would mean
# the harness, not the API, shaped what was tested.
"$venv/bin/python" - "$reports/requests.har" "$reports/junit.xml" "$elapsed" "$status" <<'EOF' || status=1
import collections, json, re, sys
import xml.etree.ElementTree as ET
har, junit, elapsed, status = sys.argv[1:]
ok = True
passed = failed = 0
try:
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is None:
            passed += 1
            continue
        failed += 1
        kinds = sorted(set(re.findall(r"^- (ST\d+ [^\n]+)$", failure.text or "", re.M)))
        print(f"schemathesis: failed {case.get('name')}: {'; '.join(kinds) or failure.get('message')}")
except (OSError, ET.ParseError) as err:
    print(f"schemathesis: could not read {junit}: {err}")
    ok = False
try:
    entries = json.load(open(har))["log"]["entries"]
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    print(f"schemathesis: {len(entries)} requests in {elapsed} s; answers by status: "
          + ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())))
    if statuses.get(429):
        print(f"schemathesis: {statuses[429]} answers were 429 (rate limited): the harness's limits are too low")
        ok = False
except (OSError, ValueError, KeyError) as err:
    print(f"schemathesis: could not read {har}: {err}")
    ok = False
if status != "0" and failed == 0:
    failed = 1  # schemathesis failed with no failed test case (e.g. the spec did not load)
print(f"schemathesis: {passed} passed, {failed} failed")
sys.exit(0 if ok else 1)
EOF

exit "$status"
