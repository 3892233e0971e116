"""``python -m coupling_dist.stage_a``: see ``coupling_dist/stages/stage_a/``."""
from .cli import run_entry
from .stages.stage_a.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("stage_a", main))
