#!/usr/bin/env bash
# A team's MLflow tracking server, started by the project: PostgreSQL (Debian's package) as the
# backend store and `mlflow server` with proxied artifacts, both on 127.0.0.1 only.
#
#   scripts/mlflow-server.sh start    # (make mlflow-server) initialise once, start both, wait for /health
#   scripts/mlflow-server.sh stop     # (make mlflow-server-stop) stop both; data are kept
#   scripts/mlflow-server.sh status
#   scripts/mlflow-server.sh optuna-url  # the Optuna storage on the same PostgreSQL, for
#                                        # python -m pipeline.tune --storage "$(scripts/mlflow-server.sh optuna-url)"
#
# Everything lives in $MLFLOW_SERVER_DIR (default: .mlflow-server/ in the repository, ignored by
# git): the PostgreSQL cluster, its generated password (never printed, never in git), the
# artifact folder, logs and pids. Ports: $MLFLOW_PORT (5000) for MLflow, $MLFLOW_PG_PORT (55432)
# for PostgreSQL. Run as root (CI), the cluster belongs to Debian's `postgres` user.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$(mkdir -p "${MLFLOW_SERVER_DIR:-$ROOT/.mlflow-server}" && cd "${MLFLOW_SERVER_DIR:-$ROOT/.mlflow-server}" && pwd)"
PORT="${MLFLOW_PORT:-5000}"
PG_PORT="${MLFLOW_PG_PORT:-55432}"
PG="$DIR/postgres"            # owned by the cluster's user
MLFLOW="${MLFLOW_BIN:-$(command -v mlflow || echo "$ROOT/.venv/bin/mlflow")}"
BINDIR="$( (ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true) | sort -V | tail -n 1)"
[ -n "$BINDIR" ] || BINDIR="$(dirname "$(command -v pg_ctl 2>/dev/null || echo /missing/pg_ctl)")"

as_owner() {  # PostgreSQL refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

health() { curl -fsS --max-time 2 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; }

start() {
  [ -x "$BINDIR/pg_ctl" ] || { echo "error: PostgreSQL not found; install Debian's postgresql package (apt-get install postgresql)" >&2; exit 1; }
  if [ ! -f "$DIR/password" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$DIR/password")
  fi
  if [ ! -f "$PG/data/PG_VERSION" ]; then
    echo "initialising a PostgreSQL cluster in $PG/data"
    mkdir -p "$PG/run"
    cp "$DIR/password" "$PG/pwfile"
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$PG"; fi
    as_owner test -w "$PG" || { echo "error: the postgres user cannot reach $PG (every folder above it must be searchable)" >&2; exit 1; }
    as_owner "$BINDIR/initdb" -D "$PG/data" -U mlflow --pwfile="$PG/pwfile" --auth=scram-sha-256 -E UTF8 >"$PG/initdb.log"
    rm -f "$PG/pwfile"
    printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n" "$PG_PORT" "$PG/run" \
      | as_owner tee -a "$PG/data/postgresql.conf" >/dev/null
  fi
  if ! as_owner "$BINDIR/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then
    if ! as_owner "$BINDIR/pg_ctl" -D "$PG/data" -l "$PG/postgres.log" -w -t 60 start >/dev/null; then
      echo "error: PostgreSQL did not start (is port $PG_PORT taken? set MLFLOW_PG_PORT); from $PG/postgres.log:" >&2
      tail -n 5 "$PG/postgres.log" >&2
      exit 1
    fi
  fi
  export PGPASSWORD; PGPASSWORD="$(cat "$DIR/password")"
  for db in mlflow optuna; do  # MLflow's store, and the hyperparameter studies' (pipeline.tune)
    if ! psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
      psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -qc "CREATE DATABASE $db" >/dev/null
    fi
  done
  if health; then echo "MLflow server already answers at http://127.0.0.1:$PORT"; return; fi
  mkdir -p "$DIR/artifacts"
  # Its own session, so `stop` can end the whole group (mlflow starts huey job consumers beside it).
  setsid "$MLFLOW" server --backend-store-uri "postgresql://mlflow:$PGPASSWORD@127.0.0.1:$PG_PORT/mlflow" \
    --artifacts-destination "$DIR/artifacts" --host 127.0.0.1 --port "$PORT" >"$DIR/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$DIR/mlflow.pid"
  for _ in $(seq 1 180); do
    if health; then
      echo "MLflow server on http://127.0.0.1:$PORT (PostgreSQL 127.0.0.1:$PG_PORT, artifacts in $DIR/artifacts)"
      echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
      return
    fi
    kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || { echo "error: mlflow server exited; see $DIR/mlflow.log" >&2; tail -n 20 "$DIR/mlflow.log" >&2; exit 1; }
    sleep 1
  done
  echo "error: MLflow server did not answer /health within 180 s; see $DIR/mlflow.log" >&2
  exit 1
}

stop() {
  if [ -f "$DIR/mlflow.pid" ]; then
    pid="$(cat "$DIR/mlflow.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/mlflow.pid"
  fi
  if [ -f "$PG/data/PG_VERSION" ] && as_owner "$BINDIR/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then
    as_owner "$BINDIR/pg_ctl" -D "$PG/data" -m fast -w stop >/dev/null
  fi
  echo "MLflow server and PostgreSQL stopped (data kept in $DIR)"
}

status() {
  if health; then echo "MLflow: answering on http://127.0.0.1:$PORT"; else echo "MLflow: not answering on port $PORT"; fi
  if [ -f "$PG/data/PG_VERSION" ] && as_owner "$BINDIR/pg_ctl" -D "$PG/data" status >/dev/null 2>&1; then
    echo "PostgreSQL: running on 127.0.0.1:$PG_PORT"; else echo "PostgreSQL: stopped"; fi
}

optuna_url() {  # holds the password: for --storage, never for a log
  [ -f "$DIR/password" ] || { echo "error: no server in $DIR (make mlflow-server first)" >&2; exit 1; }
  echo "postgresql+psycopg://mlflow:$(cat "$DIR/password")@127.0.0.1:$PG_PORT/optuna"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  optuna-url) optuna_url ;;
  *) echo "usage: $0 start|stop|status|optuna-url" >&2; exit 2 ;;
esac
