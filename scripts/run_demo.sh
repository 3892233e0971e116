#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the whole pipeline on configs/demo.yaml
# (CPU, the real SmolLM2-135M as tokenizer/teacher/scorer, bundled real text; ~15 min). Extra args are config overrides, e.g. run.dir=runs/x.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m coupling_dist.pipeline --config configs/demo.yaml "$@"
