"""``python -m coupling_dist.pipeline``: see ``coupling_dist/stages/pipeline/``."""
from .cli import run_driver
from .stages.pipeline.entry import main

if __name__ == "__main__":  # required: the stages run as child processes of this one
    raise SystemExit(run_driver("pipeline", main))
