#!/usr/bin/env bash
# A local Ray head bound to loopback (for trying `ray job submit` on one machine).
#   cluster/ray/local_head.sh start|stop
# then: ray job submit --address http://127.0.0.1:8265 -- python -m coupling_dist.pipeline --config configs/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
RAY=.venv/bin/ray
case "${1:-}" in
  start) "$RAY" start --head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
           --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" --disable-usage-stats ;;
  stop) "$RAY" stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
