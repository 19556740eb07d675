#!/usr/bin/env bash
# One task of a several-task job, as tools/launch.sh has srun start it on each node: runs its arguments and,
# when they fail, ends the whole job step, so that ranks blocked in a collective do not wait for a peer that
# is gone. That is `srun --kill-on-bad-exit`, except for the exit status of a planned stop (SIGUSR1/SIGTERM,
# last.pth saved): with --kill-on-bad-exit the first rank to exit with it kills the others, rank 0 perhaps
# still writing last.pth, and srun then reports their deaths (143) instead, so the job is not requeued.
# shellcheck source=tools/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

# srun passes signals to every process of the task, the payload included: this shell only waits for it.
trap : USR1 TERM
"$@"
status=$?
if [[ $status -ne 0 && $status -ne $FASTSEG_REQUEUE_EXIT ]]; then
    echo "task ${SLURM_PROCID:-?} on ${SLURMD_NODENAME:-$(hostname)} failed (exit $status): ending job step" \
        "${SLURM_JOB_ID:-?}.${SLURM_STEP_ID:-?}" >&2
    # This shell is part of the step and ends with it; a busy controller may time out, so try again.
    for attempt in 1 2 3; do
        scancel --signal=KILL "${SLURM_JOB_ID:-}.${SLURM_STEP_ID:-}" && break
        [[ $attempt -eq 3 ]] || sleep 5
    done
fi
exit "$status"
