"""``python -m coupling_dist.pipeline``: see ``coupling_dist/stages/pipeline/``."""
import functools
import sys

from .cli import run_driver
from .stages.pipeline.entry import main, split_force

if __name__ == "__main__":  # required: the stages run as child processes of this one
    force, argv = split_force(sys.argv[1:])  # --force STAGE: re-run it and what depends on it
    raise SystemExit(run_driver("pipeline", functools.partial(main, force=tuple(force)), argv))
