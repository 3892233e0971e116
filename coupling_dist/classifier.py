"""``python -m coupling_dist.classifier``: see ``coupling_dist/stages/classifier/``."""
from .cli import run_entry
from .stages.classifier.entry import main

if __name__ == "__main__":  # required: spawned processes re-import the main module
    raise SystemExit(run_entry("classifier", main))
