"""``python -m coupling_dist.plan``: see ``coupling_dist/stages/plan/``."""
from .cli import run_tool
from .stages.plan.entry import add_arguments, main

if __name__ == "__main__":  # the same guard as every entry shim
    raise SystemExit(run_tool("plan", main, add_arguments))
