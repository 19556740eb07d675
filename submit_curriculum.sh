#!/usr/bin/env bash
# The whole curriculum in one command: one Slurm job per stage, chained with --dependency=afterok.
#
#   bash submit_curriculum.sh                                  # teacher, profiles 1..5, then evaluation
#   bash submit_curriculum.sh --with-student                   # ... then the student's five stages
#   bash submit_curriculum.sh --profiles 1-3 --experiment-id small --sbatch-args "--time=2:00:00"
#   bash submit_curriculum.sh --dry-run -- --curriculum-epochs 40,30,20,15,10   # print the sbatch commands only
#   bash submit_curriculum.sh --baseline                       # + the A/B: one full-resolution stage, same compute
#
# Each teacher stage runs jobscript_slurm.sh (main.sh, train.py) with --previous-model-path auto, so it
# starts from the best.pth of the stage before. The student (jobscript_slurm_distillation.sh) is taught
# by the teacher's last best.pth. The last job runs evaluate_efficiency.sh over every stage's best.pth.
# A job that fails cancels the jobs after it (--kill-on-invalid-dep); fix the cause and submit again with
# the same --experiment-id and --profiles from the failed stage on: finished stages are not retrained.
# Time limits are handled inside each job: it stops, requeues itself and resumes from last.pth, and the jobs
# after it keep waiting for it.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: submit_curriculum.sh [options] [-- arguments for train.py / train_distillation.py]

  --profiles LIST          stages to run, consecutive: 1-5 (default), 1,2,3 or 2-4 (a gap is refused)
  --experiment-id ID       the run's name (default: fast_scnn-<date>-<time>); the student's is ID_student
  --output-dir DIR         where checkpoints go (default: checkpoints)
  --data-dir DIR           Cityscapes root for every job (default: DATA_DIR at the top of train.py)
  --previous-model-path P  weights for the first teacher stage (default: none for profile 1, else auto)
  --with-student           after the teacher, train the student with the teacher's last best.pth
  --student-only           train only the student; needs --teacher-model-path
  --teacher-only           train only the teacher (the default)
  --teacher-model-path P   the trained teacher for the student (default: the teacher trained here)
  --baseline               beside the teacher's curriculum, one stage at its last profile from scratch (a
                           whole lr decay) whose epochs cost the same training compute: the A/B that says
                           what the curriculum saves; its run is ID_baseline
  --no-eval                skip the evaluate_efficiency job at the end
  --eval-args "ARGS"       extra arguments for evaluate_efficiency.py
  --sbatch-args "ARGS"     extra sbatch flags for every job, e.g. "--time=12:00:00 --qos=long"
  --log-dir DIR            where Slurm writes <job name>-<job id>.out (default: logs; created)
  --dry-run                print the sbatch commands instead of submitting
  -h, --help               this text

Paths are relative to the project directory, where the jobs run.
EOF
}

die() {
    echo "error: submit_curriculum.sh: $*" >&2
    exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

profiles_spec=1-5
experiment_id=""
output_dir=checkpoints
data_dir=""
first_previous=""
teacher=1
student=0
teacher_model=""
baseline=0
evaluate=1
eval_args=""
sbatch_args=""
log_dir=logs
dry_run=0
python_args=()

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --profiles) need_value "$@"; profiles_spec=$2; shift 2 ;;
    --experiment-id) need_value "$@"; experiment_id=$2; shift 2 ;;
    --output-dir) need_value "$@"; output_dir=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --previous-model-path) need_value "$@"; first_previous=$2; shift 2 ;;
    --with-student) teacher=1; student=1; shift ;;
    --student-only) teacher=0; student=1; shift ;;
    --teacher-only) teacher=1; student=0; shift ;;
    --teacher-model-path) need_value "$@"; teacher_model=$2; shift 2 ;;
    --baseline) baseline=1; shift ;;
    --no-eval) evaluate=0; shift ;;
    --eval-args) need_value "$@"; eval_args=$2; shift 2 ;;
    --sbatch-args) need_value "$@"; sbatch_args=$2; shift 2 ;;
    --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; python_args=("$@"); break ;;
    *) die "unknown option '$1' (arguments for the Python scripts go after --; see --help)" ;;
    esac
done

# The stages' paths are fixed here (the student's teacher, the evaluation's checkpoints), so the flags
# that decide them must come from this script's options, not from the pass-through arguments.
for arg in "${python_args[@]}"; do
    case ${arg%%=*} in
    --experiment-id | --output-dir | --data-dir | --previous-model-path)
        die "give ${arg%%=*} as an option of submit_curriculum.sh, before --" ;;
    --profile | --trained-teacher-model-path | --previous-student-model-path | --resume)
        die "${arg%%=*} is set per stage by submit_curriculum.sh; use --profiles / --teacher-model-path" ;;
    esac
done

# "1-5", "1,2,3", "2-4,5" -> 1 2 3 4 5; ascending, because each stage starts from the one before.
profiles=()
IFS=',' read -ra parts <<<"$profiles_spec"
for part in "${parts[@]}"; do
    if [[ $part =~ ^([1-5])-([1-5])$ ]]; then
        [[ ${BASH_REMATCH[1]} -le ${BASH_REMATCH[2]} ]] || die "--profiles '$profiles_spec': ranges go up, as the curriculum does"
        for ((k = BASH_REMATCH[1]; k <= BASH_REMATCH[2]; k++)); do profiles+=("$k"); done
    elif [[ $part =~ ^[1-5]$ ]]; then
        profiles+=("$part")
    else
        die "--profiles '$profiles_spec': expected profiles 1..5 such as 1-5 or 1,2,3"
    fi
done
[[ ${#profiles[@]} -gt 0 ]] || die "--profiles '$profiles_spec' names no profile"
for ((i = 1; i < ${#profiles[@]}; i++)); do
    [[ ${profiles[i]} -gt ${profiles[i - 1]} ]] || die "--profiles '$profiles_spec': list each profile once, ascending"
    # A gap would start a stage from the best.pth of a profile that never ran, after the stages before had
    # trained, and the one lr decay would assume the skipped stage's epochs: refused before anything is submitted.
    skipped=$((profiles[i - 1] + 1))
    [[ $skipped -eq ${profiles[i]} ]] || die "--profiles '$profiles_spec' skips profile$([[ $((profiles[i] - skipped)) -gt 1 ]] && echo "s $skipped-$((profiles[i] - 1))" || echo " $skipped"): each stage starts from the best.pth of the profile before it and the one lr decay counts every profile's epochs; list consecutive profiles (1-5, or 3-5 to continue a run)"
done
first=${profiles[0]}
last=${profiles[${#profiles[@]} - 1]}

[[ $student -eq 0 || $teacher -eq 1 || -n $teacher_model ]] || die "--student-only needs --teacher-model-path"
if [[ -z $experiment_id ]]; then
    # Starting above profile 1 continues an earlier run, whose name is needed to find its checkpoints.
    [[ $first -eq 1 || -n $first_previous ]] || die "--profiles $profiles_spec continues a run: give its --experiment-id"
    experiment_id="fast_scnn-$(date +%Y%m%d-%H%M%S)"
fi
[[ -n $teacher_model ]] || teacher_model="$output_dir/$experiment_id/profile-$last/best.pth"
# A run that starts above profile 1 continues an earlier one: take the stage before from the same run.
if [[ -z $first_previous ]]; then
    if [[ $first -eq 1 ]]; then first_previous=none; else first_previous=auto; fi
fi
student_id="${experiment_id}_student"
baseline_id="${experiment_id}_baseline"
[[ $baseline -eq 0 || $teacher -eq 1 ]] || die "--baseline compares with the teacher's curriculum; drop --student-only"

read -ra extra_sbatch <<<"$sbatch_args"
read -ra extra_eval <<<"$eval_args"
data_args=()
[[ -z $data_dir ]] || data_args=(--data-dir "$data_dir")

cd "$here"
for script in jobscript_slurm.sh jobscript_slurm_distillation.sh evaluate_efficiency.sh; do
    [[ -f $script ]] || die "$here/$script is missing"
done
if [[ $dry_run -eq 0 ]]; then
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on the cluster's login node (or use --dry-run)"
    # Slurm opens the output file before the job starts; a missing directory fails the job at launch.
    mkdir -p "$log_dir"
fi

if [[ $baseline -eq 1 ]]; then
    # Sized from the same settings as the stages (train.py's constants and the arguments after --), by the
    # Python the jobs run (container.sif through apptainer, else .venv, else python3: tools/launch.sh), so the
    # host's own python3 needs no PyTorch. In a subshell: the runtime's exported PYTHON stays out of the jobs.
    # Before any job is printed or submitted, so that a failure leaves nothing half done.
    # shellcheck source=tools/launch.sh
    source "$here/tools/launch.sh"
    sizing_log=$(mktemp)
    trap 'rm -f "$sizing_log"' EXIT
    if ! baseline_epochs=$(fastseg_select_runtime "$here" >>"$sizing_log" 2>&1 &&
        "${FASTSEG_LAUNCH[@]}" "$PYTHON" "$here/tools/baseline_epochs.py" \
            --profiles "${profiles[@]}" -- "${python_args[@]}" 2>>"$sizing_log"); then
        die "--baseline: could not size the baseline stage with the jobs' $(grep -m1 '^runtime:' "$sizing_log" ||
            echo 'runtime') ($(grep -v '^runtime:' "$sizing_log" | tail -n 1)); the jobs need PyTorch there too"
    fi
    sized_by=$(grep -m1 '^runtime:' "$sizing_log")
fi

job_ids=()
job_count=0

# In a dry run a job id is a shell variable, so the printed commands run as a script.
show_command() {
    local arg out=()
    for arg in "$@"; do
        # shellcheck disable=SC2016 # a literal $job
        if [[ $arg == *'$job'* ]]; then out+=("\"$arg\""); else out+=("$(printf '%q' "$arg")"); fi
    done
    echo "${out[*]}"
}

cancel_line() {
    [[ ${#job_ids[@]} -eq 0 ]] || echo "cancel all: scancel ${job_ids[*]}"
}

# submit NAME DEPENDENCY_IDS SCRIPT ARGS...: sets $submitted to the new job's id.
submit() {
    local name=$1 after=$2
    shift 2
    local cmd=(sbatch --parsable --job-name="$name" --output="$log_dir/%x-%j.out")
    [[ -z $after ]] || cmd+=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    cmd+=("${extra_sbatch[@]}" "$@")
    job_count=$((job_count + 1))
    if [[ $dry_run -eq 1 ]]; then
        submitted="\$job$job_count"
        echo "job$job_count=\$($(show_command "${cmd[@]}"))"
        return
    fi
    local out
    if ! out=$("${cmd[@]}"); then
        echo "error: submit_curriculum.sh: sbatch failed for $name; nothing after it was submitted" >&2
        cancel_line >&2
        exit 1
    fi
    submitted=${out%%;*} # --parsable prints "id" or "id;cluster"
    job_ids+=("$submitted")
    echo "$name: job $submitted"
}

if [[ $dry_run -eq 1 ]]; then
    echo "# submit_curriculum.sh --dry-run: the jobs it would submit, in order"
    echo "set -e"
    echo "cd $(printf '%q' "$here")"
    echo "mkdir -p $(printf '%q' "$log_dir")"
fi
previous_job=""
training_jobs=()
best_paths=()
if [[ $teacher -eq 1 ]]; then
    for k in "${profiles[@]}"; do
        if [[ $k -eq $first ]]; then previous=$first_previous; else previous=auto; fi
        submit "$experiment_id-teacher-p$k" "$previous_job" jobscript_slurm.sh \
            --experiment-id "$experiment_id" --profile "$k" --previous-model-path "$previous" \
            --output-dir "$output_dir" "${data_args[@]}" "${python_args[@]}"
        previous_job=$submitted
        training_jobs+=("$submitted")
        best_paths+=("$output_dir/$experiment_id/profile-$k/best.pth")
    done
fi
if [[ $baseline -eq 1 ]]; then
    [[ $dry_run -eq 0 ]] || echo "# baseline: $baseline_epochs epochs at profile $last cost what profiles ${profiles[*]} cost (sized by the jobs' $sized_by)"
    baseline_args=()  # the stages' arguments less their epochs and decay, which the baseline sets itself
    for ((i = 0; i < ${#python_args[@]}; i++)); do
        case ${python_args[i]} in
        --epochs | --lr-decay | --curriculum-epochs) i=$((i + 1)) ;;
        --epochs=* | --lr-decay=* | --curriculum-epochs=*) ;;
        *) baseline_args+=("${python_args[i]}") ;;
        esac
    done
    submit "$experiment_id-baseline-p$last" "" jobscript_slurm.sh \
        --experiment-id "$baseline_id" --profile "$last" --previous-model-path none \
        --output-dir "$output_dir" "${data_args[@]}" "${baseline_args[@]}" --epochs "$baseline_epochs" --lr-decay stage
    training_jobs+=("$submitted")
    best_paths+=("$output_dir/$baseline_id/profile-$last/best.pth")
fi
if [[ $student -eq 1 ]]; then
    for k in "${profiles[@]}"; do
        if [[ $k -eq 1 ]]; then previous=none; else previous=auto; fi
        submit "$experiment_id-student-p$k" "$previous_job" jobscript_slurm_distillation.sh \
            --experiment-id "$student_id" --profile "$k" --previous-student-model-path "$previous" \
            --trained-teacher-model-path "$teacher_model" \
            --output-dir "$output_dir" "${data_args[@]}" "${python_args[@]}"
        previous_job=$submitted
        training_jobs+=("$submitted")
        best_paths+=("$output_dir/$student_id/profile-$k/best.pth")
    done
fi
if [[ $evaluate -eq 1 ]]; then
    all_training=$(IFS=:; echo "${training_jobs[*]}")
    submit "$experiment_id-eval" "$all_training" evaluate_efficiency.sh \
        --current-model-path "${best_paths[@]}" \
        --output "$output_dir/$experiment_id/efficiency.json" \
        --plots "$output_dir/$experiment_id/efficiency" \
        "${data_args[@]}" "${extra_eval[@]}"
fi

if [[ $dry_run -eq 1 ]]; then
    ids=()
    for ((i = 1; i <= job_count; i++)); do ids+=("\$job$i"); done
    echo "echo \"cancel all: scancel ${ids[*]}\""
else
    echo "checkpoints: $output_dir/$experiment_id/profile-<k>/   logs: $log_dir/"
    cancel_line
fi
