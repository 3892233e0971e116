"""``python -m coupling_dist.pair_store``: see ``coupling_dist/stages/pair_store/``."""
from .cli import run_entry
from .stages.pair_store.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("pair_store", main))
