# Sourced by the scripts: stable caches so JIT-built DeepSpeed ops and tiny assets are built once.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/coupling_dist/torch_extensions}
export COUPLING_DIST_CACHE=${COUPLING_DIST_CACHE:-$HOME/.cache/coupling_dist}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
