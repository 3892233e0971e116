# Sourced by the batch scripts: environment, rendezvous address, preemption handling.
# Expects COUPLING_DIST_HOME (the repo; default: the submit directory).
set -uo pipefail
export COUPLING_DIST_HOME=${COUPLING_DIST_HOME:-$SLURM_SUBMIT_DIR}
cd "$COUPLING_DIST_HOME"
source scripts/env.sh
PY=${PY:-$COUPLING_DIST_HOME/.venv/bin/python}

# Rendezvous: the first node of the allocation, by its NodeAddr (node names need not resolve).
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "[slurm] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST tasks=${SLURM_NTASKS:-1} master=$MASTER_ADDR:$MASTER_PORT"

# Preemption: SLURM signals the batch shell (--signal=B:USR1@T, or scancel --signal=USR1 --batch).
# Forward it to the job's steps; the trainer checkpoints at the next step and exits non-zero;
# then we requeue the job, and the requeued job resumes from the latest sharded checkpoint.
PREEMPTED=0
on_preempt() {
  PREEMPTED=1
  echo "[slurm] preemption signal: forwarding USR1 to the job steps"
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
}
trap on_preempt USR1 TERM

# run_step CMD...: run one srun step in the background and wait for it through signals.
run_step() {
  "$@" &
  local pid=$! rc
  while true; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break  # wait returned because of a trapped signal: keep waiting
  done
  if [ "$PREEMPTED" = 1 ] && [ "$rc" != 0 ]; then
    echo "[slurm] step ended after preemption (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}
