"""coupling_dist: distributed training of Coupling Models (one-step discrete sequence generation)."""
__version__ = "0.1.0"
