"""Plans before work: what a run will write (bytes per artifact) and compute (FLOPs per stage).

``run_plan.build_plan`` is the whole run's plan (``python -m coupling_dist.plan``);
``run_plan.check_disk`` is the disk pre-flight of the stages that write (preprocess, stage_a,
pair_store). ``storage`` models the bytes of a shard set, a checkpoint and an export;
``architectures`` reads the frozen LMs' shapes from their configs without loading weights.
"""
