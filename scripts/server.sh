#!/usr/bin/env bash
# The team's MLflow tracking server: PostgreSQL as the backend store, artifacts proxied through
# the server into a local folder, listening on 127.0.0.1 unless told otherwise.
#
# Usage: bash scripts/server.sh [--host HOST] [--port PORT] [--dir DIR] [--app-name basic-auth]
#                               [-- MORE_MLFLOW_SERVER_OPTIONS]
#        bash scripts/server.sh stop [--dir DIR]      # stop the PostgreSQL it started
#
# Settings (an option wins over its variable):
#   MLFLOW_SERVER_HOST  127.0.0.1        MLFLOW_SERVER_PORT  5000
#   MLFLOW_SERVER_DIR   ./.mlflow-server: pgdata/ (the database cluster), run/ (its socket),
#                       artifacts/, and with basic-auth basic_auth.ini, basic_auth.db, secrets
#   DATABASE_URL        postgresql://... of an existing database; when empty, a cluster is
#                       created in $MLFLOW_SERVER_DIR/pgdata on first use (initdb), reachable
#                       only through a Unix socket in $MLFLOW_SERVER_DIR/run, and started
#   PG_PORT             5432: names the socket only (the cluster opens no TCP port)
#   PG_BIN              directory of initdb/pg_ctl (default: PATH, else /usr/lib/postgresql/*/bin)
#   PG_USER             the account PostgreSQL runs as when this script runs as root
#                       (PostgreSQL refuses root): postgres if it exists, else nobody
#   MLFLOW_AUTH_ADMIN_PASSWORD   the basic-auth admin password on first start (default: a
#                       random one, saved in $MLFLOW_SERVER_DIR/admin_password)
#   PYTHON              python3
#
# The server runs in the foreground; Ctrl-C (or SIGTERM) stops it and the PostgreSQL it started.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
HOST="${MLFLOW_SERVER_HOST:-127.0.0.1}"
PORT="${MLFLOW_SERVER_PORT:-5000}"
DIR="${MLFLOW_SERVER_DIR:-./.mlflow-server}"
PG_PORT="${PG_PORT:-5432}"
APP_NAME=""
ACTION="start"
EXTRA=()

die() { echo "server.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    stop) ACTION="stop"; shift ;;
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    --app-name) APP_NAME="${2:?--app-name needs a value}"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case "$PORT" in ''|*[!0-9]*) die "port must be a number (got '$PORT')" ;; esac
case "$APP_NAME" in ''|basic-auth) ;; *) die "--app-name must be basic-auth (got '$APP_NAME')" ;; esac

umask 077  # the store, artifacts and secrets are the server's: others go through HTTP
if [ "$ACTION" = "start" ]; then  # before anything starts: uvicorn would exit 0 on a busy port
  "$PYTHON" -c "import socket, sys; socket.create_server((sys.argv[1], int(sys.argv[2]))).close()" \
    "$HOST" "$PORT" 2>/dev/null || die "cannot listen on $HOST:$PORT (in use?): pick --port"
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PGDATA="$DIR/pgdata"
SOCKET_DIR="$DIR/run"

# PostgreSQL refuses to run as root: run its commands as PG_USER then.
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
  PG_USER="${PG_USER:-$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)}"
  AS_PG=(runuser -u "$PG_USER" --)
fi

find_pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then [ -x "$PG_BIN/initdb" ] && echo "$PG_BIN"; return; fi
  if command -v initdb >/dev/null 2>&1; then  # the real folder: PATH may hold only links
    dirname "$(readlink -f "$(command -v initdb)")"; return
  fi
  local found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$found" ] && [ -x "$found/initdb" ] && { echo "$found"; return; }
  return 1
}

pg_ctl_cmd() { "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" "$@"; }

if [ "$ACTION" = "stop" ]; then
  PG_BIN="$(find_pg_bin)" || die "PostgreSQL binaries not found (set PG_BIN)"
  [ -f "$PGDATA/postmaster.pid" ] || { echo "server.sh: no PostgreSQL running in $PGDATA"; exit 0; }
  pg_ctl_cmd -m fast -w stop
  exit 0
fi

STARTED_PG=""
stop_pg() {
  if [ -n "$STARTED_PG" ]; then
    pg_ctl_cmd -m fast -w stop >/dev/null 2>&1 || true
    STARTED_PG=""
  fi
}

# SQLAlchemy reads a bare postgresql:// as psycopg 3; the dev extras install psycopg2.
driver="psycopg2"
"$PYTHON" -c "import psycopg2" 2>/dev/null || driver="psycopg"
if [ -n "${DATABASE_URL:-}" ]; then
  BACKEND_URI="$(echo "$DATABASE_URL" | sed -E "s#^postgres(ql)?://#postgresql+$driver://#")"
else
  PG_BIN="$(find_pg_bin)" || die "PostgreSQL not found: install it (Debian: apt-get install \
postgresql), set PG_BIN to the directory of initdb and pg_ctl, or set DATABASE_URL"
  mkdir -p "$PGDATA" "$SOCKET_DIR"
  chmod 700 "$PGDATA" "$SOCKET_DIR"
  if [ ${#AS_PG[@]} -gt 0 ]; then
    chown "$PG_USER" "$PGDATA" "$SOCKET_DIR"
    chmod o+x "$DIR"  # PG_USER must reach its folders (not read the others)
    "${AS_PG[@]}" test -w "$PGDATA" || die "PostgreSQL runs as '$PG_USER' (not root), who \
cannot reach $PGDATA: use a --dir whose parent folders others may enter (chmod o+x), e.g. under /srv"
  fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    echo "server.sh: creating the database cluster in $PGDATA"
    # Only the owner reaches the socket (its folder is 0700), so local trust is no wider
    # than file permissions.
    "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PGDATA" -U mlflow -E UTF8 --auth=trust >"$DIR/initdb.log" \
      || die "initdb failed; see $DIR/initdb.log"
  fi
  if ! pg_ctl_cmd status >/dev/null 2>&1; then
    pg_ctl_cmd -w -t 60 -l "$PGDATA/postgres.log" \
      -o "-c listen_addresses='' -c unix_socket_directories='$SOCKET_DIR' -p $PG_PORT" start \
      >/dev/null || die "PostgreSQL did not start; see $PGDATA/postgres.log"
    STARTED_PG=1
    trap stop_pg EXIT
  fi
  if ! "${AS_PG[@]}" "$PG_BIN/createdb" -h "$SOCKET_DIR" -p "$PG_PORT" -U mlflow mlflow \
      2>"$DIR/createdb.log"; then
    grep -q "already exists" "$DIR/createdb.log" || die "createdb failed: $(cat "$DIR/createdb.log")"
  fi
  BACKEND_URI="postgresql+$driver://mlflow@/mlflow?host=$SOCKET_DIR&port=$PG_PORT"
fi

ARTIFACTS="$DIR/artifacts"
mkdir -p "$ARTIFACTS"
ARGS=(--host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND_URI"
      --artifacts-destination "$ARTIFACTS" --serve-artifacts)

if [ "$APP_NAME" = "basic-auth" ]; then
  "$PYTHON" -c "import flask_wtf" 2>/dev/null \
    || die "--app-name basic-auth needs MLflow's auth extra: pip install 'mlflow[auth]'"
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini"
    cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$DIR/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    [ -f "$DIR/secret_key" ] || "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$DIR/secret_key"
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$DIR/secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] && [ ! -f "$DIR/basic_auth.db" ]; then
    [ -f "$DIR/admin_password" ] || "$PYTHON" -c "import secrets; print(secrets.token_urlsafe(18))" >"$DIR/admin_password"
    MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$DIR/admin_password")"
    export MLFLOW_AUTH_ADMIN_PASSWORD
    echo "server.sh: basic-auth admin user 'admin', password in $DIR/admin_password"
  fi
  ARGS+=(--app-name basic-auth)
fi

case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *) echo "server.sh: warning: listening on $HOST: whoever reaches it can read and write the \
store$([ "$APP_NAME" = basic-auth ] || echo '; consider --app-name basic-auth') (and TLS in front)" >&2 ;;
esac

url_host="$HOST"; case "$HOST" in 0.0.0.0|::) url_host="$(hostname -f 2>/dev/null || hostname)" ;; esac
echo "server.sh: backend store $(echo "$BACKEND_URI" | sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#')"
echo "server.sh: artifacts in $ARTIFACTS (served through the server)"
echo "export MLFLOW_TRACKING_URI=http://$url_host:$PORT"
[ "$APP_NAME" = "basic-auth" ] && echo "export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=..."

# MLflow's job runner serves its GenAI features (not used here) with many extra processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
"$PYTHON" -m mlflow server "${ARGS[@]}" "${EXTRA[@]}" &
SERVER_PID=$!
STOPPING=""
on_signal() { STOPPING=1; kill -TERM "$SERVER_PID" 2>/dev/null || true; }
trap on_signal INT TERM
status=0
wait "$SERVER_PID" || status=$?
if kill -0 "$SERVER_PID" 2>/dev/null; then wait "$SERVER_PID" || status=$?; fi
stop_pg
if [ -z "$STOPPING" ]; then
  echo "server.sh: mlflow server exited on its own (status $status); see its output above" >&2
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
