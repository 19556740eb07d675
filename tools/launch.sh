# Shared by main.sh, main_distillation.sh, evaluate_efficiency.sh and the Slurm job scripts (sourced, not run):
# which Python runs the project, and running a job's payload so that a Slurm time limit or preemption
# ends in a saved checkpoint and a requeue instead of a lost run. (.env is read by the trainers themselves.)
# shellcheck shell=bash

# Exit status of a trainer that saved last.pth after SIGUSR1/SIGTERM and wants to be run again
# (REQUEUE_EXIT_CODE in fastseg/stopping.py).
FASTSEG_REQUEUE_EXIT=75

# fastseg_default_python DIR: the interpreter for a local run: $PYTHON if set (the job scripts set it),
# else DIR/.venv/bin/python (what `make venv` builds), else python3 from PATH.
fastseg_default_python() {
    if [[ -n ${PYTHON:-} ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -x $1/.venv/bin/python ]]; then
        printf '%s\n' "$1/.venv/bin/python"
    else
        printf '%s\n' python3
    fi
}

# fastseg_select_runtime DIR: sets FASTSEG_LAUNCH (command prefix, an array) and exports PYTHON for a job:
# the apptainer image $CONTAINER (default DIR/container.sif) when it exists, else DIR/.venv, else python3.
fastseg_select_runtime() {
    local dir="$1" container="${CONTAINER:-$1/container.sif}"
    FASTSEG_LAUNCH=()
    if [[ -f $container ]]; then
        if ! command -v apptainer >/dev/null 2>&1; then
            echo "error: $container exists but apptainer is not on PATH; load it (module load apptainer) or set CONTAINER=none" >&2
            return 2
        fi
        FASTSEG_LAUNCH=(apptainer exec --nv "$container")
        export PYTHON=python3 # the image's own interpreter
    elif [[ -x $dir/.venv/bin/python ]]; then
        export PYTHON="$dir/.venv/bin/python"
    else
        export PYTHON=python3
    fi
    echo "runtime: ${FASTSEG_LAUNCH[*]:-host} $PYTHON ($("${FASTSEG_LAUNCH[@]}" "$PYTHON" --version 2>&1))"
}

# fastseg_master_port JOB_ID: the rendezvous port of a job; master_port in fastseg/distributed.py is the
# reference (tests/test_distributed.py checks that both agree).
fastseg_master_port() {
    echo $((10000 + ${1:-0} % 20000))
}

# fastseg_rendezvous: for a job of several tasks, export MASTER_ADDR (the job's first node) and MASTER_PORT
# (from the job id, so two jobs sharing a node do not collide) for torch.distributed, unless already set.
# Resolved here on the host, where scontrol is: inside a container it is usually missing. apptainer and srun
# pass the environment on to every task.
fastseg_rendezvous() {
    [[ ${SLURM_NTASKS:-1} -gt 1 ]] || return 0
    if [[ -z ${MASTER_ADDR:-} ]]; then
        local hosts
        if hosts="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")" && [[ -n $hosts ]]; then
            export MASTER_ADDR="${hosts%%$'\n'*}"
        else
            echo "warning: scontrol could not expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}';" \
                "each task will expand it itself" >&2
        fi
    fi
    if [[ -z ${MASTER_PORT:-} && -n ${SLURM_JOB_ID:-} ]]; then
        MASTER_PORT="$(fastseg_master_port "$SLURM_JOB_ID")"
        export MASTER_PORT
    fi
    echo "rendezvous resolved on the host ${SLURMD_NODENAME:-$(hostname)}:" \
        "MASTER_ADDR=${MASTER_ADDR:-unset} MASTER_PORT=${MASTER_PORT:-unset}"
}

# This directory, for srun_task.sh: absolute, as srun starts the tasks on other nodes.
FASTSEG_TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# fastseg_run_job CMD...: run CMD (with FASTSEG_LAUNCH in front) as the job's payload and return its status.
# With several tasks (sbatch --ntasks-per-node/--ntasks) it goes through srun, one process per task, each
# started by tools/srun_task.sh (a failed task ends the step); the trainer reads SLURM_PROCID/SLURM_NTASKS and
# the MASTER_ADDR/MASTER_PORT exported here to set up DistributedDataParallel.
# `#SBATCH --signal=B:USR1@300` signals only this batch shell, so the signal is passed on to the payload
# (srun forwards it to every task); the ranks agree to stop, exit 75, and the job is requeued
# with the same arguments, where `--resume auto` continues from last.pth.
# SIGTERM (scancel, or preemption) is passed on too, so last.pth is saved, but the job is not requeued:
# a cancelled job stays cancelled, and a preempted one is requeued by Slurm itself where the site wants it.
fastseg_run_job() {
    local cmd=("${FASTSEG_LAUNCH[@]}" "$@")
    if [[ ${SLURM_NTASKS:-1} -gt 1 ]]; then
        # Slurm 22.05's srun does not inherit --cpus-per-task from the batch job: pass it on.
        cmd=(srun ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}
            bash "$FASTSEG_TOOLS/srun_task.sh" "${cmd[@]}")
    fi
    echo "job ${SLURM_JOB_ID:-local} on $(hostname) at $(date -Is) (restart ${SLURM_RESTART_COUNT:-0}): ${cmd[*]}"
    fastseg_rendezvous

    FASTSEG_GOT_TERM=0
    "${cmd[@]}" &
    local child=$! status
    # shellcheck disable=SC2064 # the child's pid is fixed now
    trap "FASTSEG_INTERRUPTED=1; echo \"\$(date -Is) got SIGUSR1: asking the payload to stop (it resumes from last.pth)\"; kill -USR1 $child 2>/dev/null || true" USR1
    # shellcheck disable=SC2064
    trap "FASTSEG_INTERRUPTED=1; FASTSEG_GOT_TERM=1; echo \"\$(date -Is) got SIGTERM: asking the payload to stop (it resumes from last.pth)\"; kill -TERM $child 2>/dev/null || true" TERM
    while :; do
        FASTSEG_INTERRUPTED=0
        wait "$child" && status=0 || status=$?
        # A trapped signal makes `wait` return early (status > 128): wait again for the payload's own
        # status (bash keeps it even when the payload has ended meanwhile).
        [[ $FASTSEG_INTERRUPTED -eq 1 ]] || break
    done
    trap - USR1 TERM

    if [[ $status -eq $FASTSEG_REQUEUE_EXIT && -n ${SLURM_JOB_ID:-} ]]; then
        if [[ $FASTSEG_GOT_TERM -eq 1 ]]; then
            echo "$(date -Is) payload saved last.pth (exit $status); not requeueing after SIGTERM: resubmit to continue"
            return "$status"
        fi
        echo "$(date -Is) payload saved last.pth (exit $status); requeueing job $SLURM_JOB_ID"
        local attempt
        for attempt in 1 2 3; do
            if scontrol requeue "$SLURM_JOB_ID"; then
                return "$status"
            fi
            # A busy controller can time out; the time limit is minutes away still.
            [[ $attempt -eq 3 ]] || sleep 10
        done
        echo "scontrol requeue $SLURM_JOB_ID failed: resubmit this job to continue (it resumes from last.pth)" >&2
    fi
    echo "$(date -Is) payload exited with status $status"
    return "$status"
}
