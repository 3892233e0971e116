"""``python -m coupling_dist.finetune``: see ``coupling_dist/stages/finetune/``."""
from .cli import run_entry
from .stages.finetune.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("finetune", main))
