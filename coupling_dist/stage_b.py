"""``python -m coupling_dist.stage_b``: see ``coupling_dist/stages/stage_b/``."""
from .cli import run_entry
from .stages.stage_b.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("stage_b", main))
