"""``python -m coupling_dist.preprocess``: see ``coupling_dist/stages/preprocess/``."""
from .cli import run_entry
from .stages.preprocess.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("preprocess", main))
