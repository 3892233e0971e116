"""``python -m coupling_dist.sample``: see ``coupling_dist/stages/sample/``."""
from .cli import run_entry
from .stages.sample.entry import main

if __name__ == "__main__":  # required: megatron dist_checkpointing and Ray spawn processes
    raise SystemExit(run_entry("sample", main))
