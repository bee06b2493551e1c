#!/usr/bin/env bash
# The whole test suite, from a fresh machine: makes sure PostgreSQL is up, then runs format
# and lint checks and every test. Each database test gets its own throwaway database.
set -euo pipefail
cd "$(dirname "$0")/.."

PGHOST_ADDR="${TALLY_TEST_PG_HOST:-127.0.0.1}"
PGPORT_NUM="${TALLY_TEST_PG_PORT:-5432}"
# The tests create (and drop) one database per test on this server.
export DATABASE_URL="${TALLY_TEST_DATABASE_URL:-postgres://postgres@${PGHOST_ADDR}:${PGPORT_NUM}/postgres}"

pg_up() { pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT_NUM" 2>/dev/null; }

if ! pg_up; then
  echo "tests/run.sh: PostgreSQL is not answering at ${PGHOST_ADDR}:${PGPORT_NUM}; starting the local cluster" >&2
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for version in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
  echo "tests/run.sh: FAILED: PostgreSQL is not reachable at ${PGHOST_ADDR}:${PGPORT_NUM} (set TALLY_TEST_DATABASE_URL to use another server)" >&2
  exit 1
fi

# The official OpenAI and Anthropic Python SDKs, for tests/sdk_compat.rs: a cached venv, whose
# packages are reinstalled only when tests/sdk/requirements.txt changes.
if ! command -v python3 >/dev/null 2>&1; then
  echo "tests/run.sh: FAILED: python3 is required (the SDK compatibility test runs the official OpenAI and Anthropic Python SDKs)" >&2
  exit 1
fi
SDK_VENV="${TALLY_SDK_VENV:-$HOME/.cache/tally/sdk-venv}"
SDK_REQUIREMENTS="tests/sdk/requirements.txt"
if [ ! -x "$SDK_VENV/bin/python" ]; then
  echo "tests/run.sh: creating the SDK venv at $SDK_VENV" >&2
  mkdir -p "$(dirname "$SDK_VENV")"
  python3 -m venv "$SDK_VENV" || {
    echo "tests/run.sh: FAILED: python3 -m venv $SDK_VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  }
fi
sdk_hash="$(sha256sum "$SDK_REQUIREMENTS" | cut -d' ' -f1)"
if [ "$(cat "$SDK_VENV/.tally-requirements.sha256" 2>/dev/null || true)" != "$sdk_hash" ]; then
  echo "tests/run.sh: installing $SDK_REQUIREMENTS into $SDK_VENV" >&2
  "$SDK_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$SDK_REQUIREMENTS" || {
    echo "tests/run.sh: FAILED: pip install -r $SDK_REQUIREMENTS" >&2
    exit 1
  }
  echo "$sdk_hash" >"$SDK_VENV/.tally-requirements.sha256"
fi
export TALLY_SDK_PYTHON="$SDK_VENV/bin/python"

# A real Prometheus server for tests/dashboards.rs (every dashboard query must return data).
if [ -z "${TALLY_PROMETHEUS_BIN:-}" ]; then
  if ! command -v prometheus >/dev/null 2>&1; then
    echo "tests/run.sh: installing Debian's prometheus package (tests/dashboards.rs scrapes tally with it)" >&2
    { apt-get update && apt-get install -y prometheus; } || {
      echo "tests/run.sh: FAILED: apt-get install -y prometheus (install Prometheus, or set TALLY_PROMETHEUS_BIN to its binary)" >&2
      exit 1
    }
  fi
  TALLY_PROMETHEUS_BIN="$(command -v prometheus)" || {
    echo "tests/run.sh: FAILED: prometheus is not on PATH after installing it" >&2
    exit 1
  }
fi
export TALLY_PROMETHEUS_BIN

# A Kafka-protocol broker for the pipeline tests: tansu from crates.io, built once and cached
# (about 15 minutes the first time), started here on a free port and stopped at the end. Tests
# that start and stop a broker of their own (outages) use the same binary.
TANSU_ROOT="${TALLY_TANSU_ROOT:-$HOME/.cache/tally/tansu}"
export TALLY_TANSU_BIN="$TANSU_ROOT/bin/tansu"
if [ ! -x "$TALLY_TANSU_BIN" ]; then
  echo "tests/run.sh: installing the tansu broker into $TANSU_ROOT (cached; about 15 minutes)" >&2
  cargo install tansu --version 0.6.0 --locked --features postgres,dynostore --root "$TANSU_ROOT" || {
    echo "tests/run.sh: FAILED: cargo install tansu" >&2
    exit 1
  }
fi
kafka_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
broker_log="$(mktemp)"
"$TALLY_TANSU_BIN" broker \
  --listener-url "tcp://127.0.0.1:${kafka_port}" \
  --advertised-listener-url "tcp://127.0.0.1:${kafka_port}" \
  --storage-engine "memory://tansu/" >"$broker_log" 2>&1 &
broker_pid=$!
stop_broker() { kill "$broker_pid" 2>/dev/null || true; wait "$broker_pid" 2>/dev/null || true; rm -f "$broker_log"; }
trap stop_broker EXIT
for _ in $(seq 1 60); do
  (exec 3<>"/dev/tcp/127.0.0.1/${kafka_port}") 2>/dev/null && break
  sleep 0.5
done
if ! (exec 3<>"/dev/tcp/127.0.0.1/${kafka_port}") 2>/dev/null; then
  echo "tests/run.sh: FAILED: the tansu broker did not start on 127.0.0.1:${kafka_port}" >&2
  cat "$broker_log" >&2
  stop_broker
  exit 1
fi
export TALLY_TEST_KAFKA_BROKERS="127.0.0.1:${kafka_port}"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"; stop_broker' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one per binary, doc tests last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tally: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
