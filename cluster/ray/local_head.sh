#!/usr/bin/env bash
# A local Ray head bound to loopback (for trying `ray job submit` on one machine).
#   cluster/ray/local_head.sh start|stop
# then, in any shell (the venv need not be activated):
#   export RAY_AUTH_MODE=token
#   .venv/bin/ray job submit --address http://127.0.0.1:8265 -- python -m coupling_dist.stage_b --config configs/tiny.yaml
#
# The head keeps Ray's token authentication on (RAY_AUTH_MODE=token; the token lives in
# ~/.ray/auth_token, made on the first start), so a client must send it: RAY_AUTH_MODE=token is the
# one variable it needs. The head runs with this checkout's environment -- the venv's bin/ first on
# PATH (a job's entrypoint `python ...` is run by the head, with the head's PATH), PYTHONPATH = this
# checkout, and scripts/env.sh -- so jobs find torch and coupling_dist whatever the submitting
# shell has activated. Relative paths in a job's command line (configs/tiny.yaml) are relative to
# this checkout.
# Optional: COUPLING_DIST_VENV (default .venv), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265),
# RAY_AGENT_PORT, RAY_NUM_CPUS, RAY_TEMP_DIR.
# `stop` is `ray stop`: it stops every Ray process of this user on the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source scripts/env.sh
VENV=${COUPLING_DIST_VENV:-$ROOT/.venv}
RAY=$VENV/bin/ray
if [ ! -x "$RAY" ]; then
  echo "error: $RAY not found: run \`bash scripts/setup.sh\` first (or set COUPLING_DIST_VENV to the venv)" >&2
  exit 2
fi
export VIRTUAL_ENV=$VENV
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE=token
DASH=${RAY_DASHBOARD_PORT:-8265}
case "${1:-}" in
  start)
    "$RAY" get-auth-token --generate >/dev/null 2>&1  # makes ~/.ray/auth_token only when there is none
    args=(--head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" --dashboard-host=127.0.0.1
          --dashboard-port="$DASH" --disable-usage-stats)
    [ -n "${RAY_AGENT_PORT:-}" ] && args+=(--dashboard-agent-listen-port="$RAY_AGENT_PORT")
    [ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
    [ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
    "$RAY" start "${args[@]}"
    cat <<EOF

Ray head on 127.0.0.1 (dashboard http://127.0.0.1:$DASH) with token authentication; jobs run with
$VENV/bin first on PATH, in $ROOT. A client needs this one variable (the token is read from ~/.ray/auth_token):
  export RAY_AUTH_MODE=token
  $VENV/bin/ray job submit --address http://127.0.0.1:$DASH -- python -m coupling_dist.stage_b --config configs/tiny.yaml
EOF
    ;;
  stop) "$RAY" stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
