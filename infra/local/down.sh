#!/usr/bin/env bash
# Stop the local services that infra/local/up.sh started (MLflow, then the S3 server), by
# the pid files in the state dir; idempotent (nothing running is not an error).
#
#   bash infra/local/down.sh         # same VLFORGE_LOCAL_DIR as up.sh (default <repo>/.local-infra)
#
# Each server runs in its own session, so its whole process group (MLflow's workers too)
# gets SIGTERM, then SIGKILL after 15 s. mlflow.db and the logs stay; the env file goes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${VLFORGE_LOCAL_DIR:-$ROOT/.local-infra}

# alive PID: the process exists and is not a zombie waiting for its parent.
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }

# left PID GROUP: some live process remains (the process group PID when GROUP is 1, else PID alone).
left() {
  local p
  if [ "$2" = 1 ]; then
    for p in $(pgrep -g "$1" 2>/dev/null); do alive "$p" && return 0; done
    return 1
  fi
  alive "$1"
}

stop() {
  local name=$1 pattern=$2 pid group=1 i
  pid=$(cat "$DIR/$name.pid" 2>/dev/null) || { echo "$name not running"; return 0; }
  if ! [[ $pid =~ ^[0-9]+$ ]] || ! alive "$pid" \
     || ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"; then
    echo "$name not running (stale pid file)"
    rm -f "$DIR/$name.pid"
    return 0
  fi
  [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || group=0
  local target=$pid
  [ "$group" = 1 ] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    left "$pid" "$group" || break
    sleep 0.1
  done
  if left "$pid" "$group"; then
    echo "$name (pid $pid) still running 15 s after SIGTERM; sending SIGKILL" >&2
    kill -KILL -- "$target" 2>/dev/null || true
  fi
  rm -f "$DIR/$name.pid"
  echo "$name stopped (pid $pid)"
}

[ -d "$DIR" ] || { echo "nothing to stop: no state dir $DIR"; exit 0; }
stop mlflow "mlflow server"
stop s3 "moto.server"
rm -f "$DIR/env"
