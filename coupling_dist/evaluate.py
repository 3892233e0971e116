"""``python -m coupling_dist.evaluate``: see ``coupling_dist/stages/evaluate/``."""
from .cli import run_entry
from .stages.evaluate.entry import main

if __name__ == "__main__":  # required: Ray spawns processes
    raise SystemExit(run_entry("evaluate", main))
