#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, makes sure Postgres and Redis answer on
# loopback, then runs pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k api -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DFMOD_VENV:-.venv}

log() { printf '\n== %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import dfmod, pytest, moto, helm_python, kubernetes_validate, playwright, ruff" 2>/dev/null \
   || [[ pyproject.toml -nt "$VENV/.dfmod-installed" ]]; then
  log "installing dfmod with its test extras"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  touch "$VENV/.dfmod-installed"
fi

apt_install() {
  command -v apt-get >/dev/null || { echo "cannot install $*: no apt-get" >&2; return 1; }
  [[ -n "${DFMOD_APT_UPDATED:-}" ]] || { apt-get update -qq; export DFMOD_APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Postgres: the machine's own on 127.0.0.1:5432 if it answers with trust auth, else a private cluster.
pg_ok() { "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null
import sys, psycopg
psycopg.connect(sys.argv[1], connect_timeout=3).close()
PY
}
PG_URL=${DFMOD_TEST_POSTGRES:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
if ! pg_ok "${PG_URL/+psycopg/}"; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "starting the machine's PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    sleep 2
  fi
fi
if ! pg_ok "${PG_URL/+psycopg/}"; then
  log "starting a private PostgreSQL cluster for the tests"
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then apt_install postgresql; fi
  PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  PG_DIR=${TMPDIR:-/tmp}/dfmod-test-pg
  PG_PORT=${DFMOD_TEST_PG_PORT:-55432}
  RUN_AS=()
  if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    RUN_AS=(runuser -u postgres --)
  fi
  if [[ ! -f "$PG_DIR/PG_VERSION" ]]; then
    mkdir -p "$PG_DIR"; [[ $(id -u) == 0 ]] && chown postgres "$PG_DIR"
    "${RUN_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR" -A trust -U postgres >/dev/null
  fi
  "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" -l "$PG_DIR/log" -w start >/dev/null || true
  PG_URL=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres
  pg_ok "${PG_URL/+psycopg/}" || { echo "PostgreSQL did not come up" >&2; exit 1; }
fi
export DFMOD_TEST_POSTGRES=$PG_URL

# --- Redis on 127.0.0.1:6379 (or DFMOD_TEST_REDIS).
REDIS_URL=${DFMOD_TEST_REDIS:-redis://127.0.0.1:6379}
redis_ok() { "$VENV/bin/python" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2).ping()" "$REDIS_URL" 2>/dev/null; }
if ! redis_ok; then
  log "starting Redis"
  command -v redis-server >/dev/null || apt_install redis-server
  port=${REDIS_URL##*:}; port=${port%%/*}
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no >/dev/null
  for _ in $(seq 50); do redis_ok && break; sleep 0.1; done
  redis_ok || { echo "Redis did not come up" >&2; exit 1; }
fi
export DFMOD_TEST_REDIS=$REDIS_URL

# --- Chromium for the review page's browser test (Playwright drives the system browser; its own
# browser download needs the internet).
if ! command -v chromium >/dev/null; then
  log "installing chromium"
  apt_install chromium || echo "could not install chromium: the browser test will fail" >&2
fi
export DFMOD_TEST_CHROMIUM=${DFMOD_TEST_CHROMIUM:-$(command -v chromium || echo /usr/bin/chromium)}

log "ruff check"
"$VENV/bin/ruff" check .

log "running the tests"
exec "$VENV/bin/python" -m pytest "$@"
