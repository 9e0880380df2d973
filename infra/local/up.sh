#!/usr/bin/env bash
# Start vlforge's local development services on 127.0.0.1 (never other interfaces):
#   * an S3-compatible server (moto's standalone server, in memory) with the buckets
#     vlforge-data, vlforge-runs and mlflow-artifacts;
#   * an MLflow tracking server: runs in SQLite under the state dir, artifacts served
#     through it from s3://mlflow-artifacts in that S3 server.
#
#   bash infra/local/up.sh && source .local-infra/env     # then run jobs / tests against them
#   bash infra/local/down.sh                              # stop both
#
# Settings (environment): VLFORGE_LOCAL_DIR (state dir: logs, pid files, mlflow.db, env;
# default <repo>/.local-infra), VLFORGE_S3_PORT (9000), VLFORGE_MLFLOW_PORT (5000),
# VLFORGE_LOCAL_TIMEOUT (seconds to wait for health, 90), VLFORGE_MLFLOW_WORKERS (1),
# PYTHON (default <repo>/.venv/bin/python, which needs vlforge's dev extras for moto).
# Idempotent: a service already started from this state dir is left running; a port
# held by anything else is an error. The S3 server keeps objects in memory, so they
# (shards, MLflow artifacts) are gone after down.sh, while the runs in mlflow.db remain.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DIR=${VLFORGE_LOCAL_DIR:-$ROOT/.local-infra}
S3_PORT=${VLFORGE_S3_PORT:-9000}
MLFLOW_PORT=${VLFORGE_MLFLOW_PORT:-5000}
TIMEOUT=${VLFORGE_LOCAL_TIMEOUT:-90}
WORKERS=${VLFORGE_MLFLOW_WORKERS:-1}
BUCKETS=(vlforge-data vlforge-runs mlflow-artifacts)
S3_URL="http://127.0.0.1:$S3_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"

if [[ $PY == */* ]]; then
  [ -x "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
else
  PY=$(command -v "$PY" || true)
fi
[ -x "$PY" ] || { echo "up.sh: no python at ${PYTHON:-$ROOT/.venv/bin/python} (run scripts/install.sh or set PYTHON)" >&2; exit 1; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# Fake credentials for the local moto server only: it accepts any. Real keys never go here.
LOCAL_AWS=(AWS_ACCESS_KEY_ID=local-moto-not-a-real-key AWS_SECRET_ACCESS_KEY=local-moto-not-a-real-secret
           AWS_DEFAULT_REGION=us-east-1)

log_tail() { echo "--- last lines of $1 ---" >&2; tail -n 30 "$1" >&2 || true; }

# cmdline NAME: the command line of the live process in DIR/NAME.pid, if any.
cmdline() {
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline"
}

# running NAME PATTERN PORT_PATTERN: true when NAME's pid file names a live process whose command
# line matches PATTERN and PORT_PATTERN; an error when it runs on another port.
running() {
  local args
  args=$(cmdline "$1") && grep -q -- "$2" <<<"$args" || return 1
  grep -Eq -- "$3" <<<"$args" && return 0
  echo "up.sh: $1 already runs from $DIR on another port (pid $(cat "$DIR/$1.pid")); run infra/local/down.sh first" >&2
  exit 1
}

port_free() {
  "$PY" - "$1" <<'PYEOF' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
PYEOF
}

http_ok() {
  "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
PYEOF
}

# wait_healthy NAME URL: poll URL until 200; fail with the log tail if the process dies or time runs out.
wait_healthy() {
  local name=$1 url=$2 pid deadline=$((SECONDS + TIMEOUT))
  pid=$(cat "$DIR/$name.pid")
  until http_ok "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "up.sh: $name (pid $pid) exited before answering $url" >&2
      log_tail "$DIR/$name.log"; rm -f "$DIR/$name.pid"; exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "up.sh: $name not healthy at $url after ${TIMEOUT}s (still running as pid $pid; infra/local/down.sh stops it)" >&2
      log_tail "$DIR/$name.log"; exit 1
    fi
    sleep 0.5
  done
}

# start NAME PORT PATTERN PORT_PATTERN CMD...: start CMD in its own session unless NAME already runs from DIR.
start() {
  local name=$1 port=$2 pattern=$3 port_pattern=$4
  shift 4
  if running "$name" "$pattern" "$port_pattern"; then
    echo "$name already running (pid $(cat "$DIR/$name.pid")) on 127.0.0.1:$port"
    return 0
  fi
  rm -f "$DIR/$name.pid"
  if ! port_free "$port"; then
    echo "up.sh: 127.0.0.1:$port is taken by another process; set VLFORGE_${name^^}_PORT to a free port" >&2
    exit 1
  fi
  (cd "$DIR" && exec setsid "$@" >>"$DIR/$name.log" 2>&1 </dev/null) &
  echo $! >"$DIR/$name.pid"
  echo "$name started (pid $!) on 127.0.0.1:$port, log $DIR/$name.log"
}

S3_MATCH=("moto.server" "-p $S3_PORT( |\$)")
MLFLOW_MATCH=("mlflow server" "--port $MLFLOW_PORT( |\$)")
fresh_s3=1
running s3 "${S3_MATCH[@]}" && fresh_s3=0
start s3 "$S3_PORT" "${S3_MATCH[@]}" \
  env "${LOCAL_AWS[@]}" "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
wait_healthy s3 "$S3_URL/"

env "${LOCAL_AWS[@]}" "$PY" - "$S3_URL" "${BUCKETS[@]}" <<'PYEOF'
import sys
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
have = {b["Name"] for b in s3.list_buckets()["Buckets"]}
for name in sys.argv[2:]:
    if name not in have:
        s3.create_bucket(Bucket=name)
PYEOF
echo "buckets ready: ${BUCKETS[*]}"
if ((fresh_s3)) && [ -s "$DIR/mlflow.db" ] && ! running mlflow "${MLFLOW_MATCH[@]}"; then
  echo "note: $DIR/mlflow.db has runs from an earlier session; their artifacts were in memory and are gone" >&2
fi

start mlflow "$MLFLOW_PORT" "${MLFLOW_MATCH[@]}" \
  env -u MLFLOW_TRACKING_URI "${LOCAL_AWS[@]}" MLFLOW_S3_ENDPOINT_URL="$S3_URL" \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  "$PY" -m mlflow server --backend-store-uri "sqlite:///$DIR/mlflow.db" \
  --artifacts-destination s3://mlflow-artifacts --serve-artifacts \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$WORKERS"
wait_healthy mlflow "$MLFLOW_URL/health"

cat >"$DIR/env" <<ENVEOF
# vlforge local services (written by infra/local/up.sh): source $DIR/env
export VLFORGE_S3_ENDPOINT=$S3_URL
export AWS_ENDPOINT_URL_S3=$S3_URL
export MLFLOW_S3_ENDPOINT_URL=$S3_URL
export MLFLOW_TRACKING_URI=$MLFLOW_URL
# DUMMY credentials for the local moto S3 server ONLY (it accepts any); not real keys.
export AWS_ACCESS_KEY_ID=local-moto-not-a-real-key
export AWS_SECRET_ACCESS_KEY=local-moto-not-a-real-secret
export AWS_DEFAULT_REGION=us-east-1
ENVEOF
echo "S3 $S3_URL, MLflow $MLFLOW_URL; settings: source $DIR/env"
