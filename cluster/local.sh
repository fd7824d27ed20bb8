#!/usr/bin/env bash
# A single-node Ray head for development: every port (GCS, raylet, dashboard, job API)
# on 127.0.0.1, token auth as Ray sets it up, usage stats off (DESIGN §6).
#
#   cluster/local.sh start|stop|status
#
# Beside another Ray on the same machine, move this head's ports and temp dir (its own
# temp dir also keeps a plain `ray.init()` elsewhere from joining it), e.g.
#   RAY_PORT=6390 RAY_DASHBOARD_PORT=8275 RAY_TEMP_DIR=/tmp/ray-dev \
#   RAY_START_ARGS="--dashboard-agent-listen-port=52375 --runtime-env-agent-port=52376" cluster/local.sh start
# `stop` ends this head's process group only, never another Ray instance.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
# Token auth stays on; its clients (`ray status` here, `ray job submit`) must say so too.
export RAY_AUTH_MODE=token
# Job entrypoints (`python -m jobs.X`) and workers run with the project's venv first on PATH.
export PATH="$PWD/.venv/bin:$PATH"
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
STATE=${RAY_HEAD_STATE:-runs/ray-head-$PORT}  # the head's pid file and log
case "${1:-}" in
  start)
    mkdir -p "$STATE"
    # shellcheck disable=SC2086  # RAY_START_ARGS holds several flags
    setsid "$RAY" start --head --block --port="$PORT" --node-ip-address=127.0.0.1 \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats \
      ${RAY_TEMP_DIR:+--temp-dir="$RAY_TEMP_DIR"} ${RAY_START_ARGS:-} >"$STATE/head.log" 2>&1 &
    echo $! >"$STATE/pid"
    for _ in $(seq 120); do
      # up once the GCS answers and the dashboard (job API) accepts connections
      if "$RAY" status --address "127.0.0.1:$PORT" >/dev/null 2>&1 &&
        (exec 3<>"/dev/tcp/127.0.0.1/$DASHBOARD_PORT") 2>/dev/null; then
        # Ray leaves its token (the cluster's one credential) readable by every user: owner only
        if [ -f "$HOME/.ray/auth_token" ]; then chmod 600 "$HOME/.ray/auth_token"; fi
        echo "dashboard and job API: http://127.0.0.1:$DASHBOARD_PORT (loopback only; never expose it)"
        echo "clients need the token Ray wrote to ~/.ray/auth_token: export RAY_AUTH_MODE=token"
        exit 0
      fi
      kill -0 "$(cat "$STATE/pid")" 2>/dev/null || { cat "$STATE/head.log" >&2; exit 1; }
      sleep 1
    done
    echo "the head did not come up within 120 s; see $STATE/head.log" >&2
    exit 1
    ;;
  stop)
    [ -f "$STATE/pid" ] || { echo "no head started from here on port $PORT" >&2; exit 1; }
    pid=$(cat "$STATE/pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    # SIGTERM first; what is still up after 5 s (the raylet drains for ~15 s, the blocking
    # `ray start` outlives everything) is killed: a development head keeps no state worth the wait
    for _ in $(seq 5); do
      [ "$(ps -eo pgid=,stat= | awk -v g="$pid" '$1 == g && $2 !~ /^Z/' | wc -l)" -le 1 ] && break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE/pid"
    ;;
  status) "$RAY" status --address "127.0.0.1:$PORT" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
