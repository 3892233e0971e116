#!/usr/bin/env bash
# Run the test suite on a fresh machine (sets itself up). Default: everything but slow tests.
#   bash scripts/test.sh            # default suite (< 20 min on 2 cores)
#   bash scripts/test.sh --slow     # slow tests only (real SLURM cluster, real small LM, Ray jobs)
#   bash scripts/test.sh -k name    # extra pytest args pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
marker="not slow"
if [ "${1:-}" = "--slow" ]; then marker="slow"; shift; fi
exec .venv/bin/python -m pytest -m "$marker" "$@"
