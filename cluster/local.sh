#!/usr/bin/env bash
# A single-node Ray head for development: every port (GCS, raylet, dashboard, job API)
# on 127.0.0.1, token auth as Ray sets it up, usage stats off (DESIGN §6).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
# Job entrypoints (`python -m jobs.X`) and workers run with the project's venv first on PATH.
export PATH="$PWD/.venv/bin:$PATH"
RAY=${RAY:-.venv/bin/ray}
case "${1:-}" in
  start)
    "$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --disable-usage-stats
    echo "dashboard and job API: http://127.0.0.1:8265 (loopback only; never expose it)"
    echo "clients need the token Ray wrote to ~/.ray/auth_token: export RAY_AUTH_MODE=token"
    ;;
  stop) "$RAY" stop ;;
  status) "$RAY" status --address 127.0.0.1:6379 ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
