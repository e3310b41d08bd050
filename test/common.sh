#!/bin/bash
# Sourced by every launcher of this folder, right after its Ascend template header (Network, batch_size,
# RANK_SIZE): the parameters' defaults, the template's --key=value loop, the device and log-folder set-up,
# the file lists, the logged run and the training summary. A launcher itself keeps only what makes it
# different: its recipe values, the command it runs and, for train_eval_8p.sh, its own summary.
#
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/. The launchers only translate parameters
# into train.py / inference.py flags and summarise the log; the training is train.py's.

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_path_dir")
python=${PYTHON:-python3}

# The parameters every launcher takes. Empty means "the config's or the recipe's value"; a launcher sets
# its recipe values after sourcing this file and lists in also_accepted the parameters it takes beyond
# these (amp_dtype, compile, nproc, case_kind, training_files, validation_files).
# shellcheck disable=SC2034  # read by the launcher that sources this file
{
    data_path=""
    output_directory=""
    checkpoint_path=""
    fp16_run=""
    epochs=""
    learning_rate=""
    sigma=""
    iters_per_checkpoint=""
    config="$repo_dir/config.json"
    device_id=""
    workers=""
    device=""
    step_stop=""
    seed=""
    n_test=10  # the test split: the first n_test files in sorted order
    amp_dtype=""
    compile=""
    grad_accum_steps=""  # micro-batches per update (train.py's -grad_accum_steps), in every training launcher
    also_accepted=""
    resume_parameters=()  # what a resumed run adds to the launcher's parameters, besides --checkpoint_path
}

unknown_parameter() {
    echo "[Error] unknown parameter '$1': parameters are --key=value, see the top of $0" >&2
    exit 1
}

# The template's `for para in $*`, with "$@" so that paths containing spaces survive. launcher_args keeps
# them for the command that resumes an interrupted run.
# shellcheck disable=SC2034  # the parameters are read by the launcher that sources this file
parse_parameters() {
    local para name
    launcher_args=("$@")
    for para in "$@"
    do
        case $para in
            --data_path=*)            data_path=${para#*=} ;;
            --output_directory=*)     output_directory=${para#*=} ;;
            --checkpoint_path=*|--pth_path=*) checkpoint_path=${para#*=} ;;
            --fp16_run=*)             fp16_run=${para#*=} ;;
            --epochs=*)               epochs=${para#*=} ;;
            --batch-size=*|--batch_size=*) batch_size=${para#*=} ;;
            --learning_rate=*)        learning_rate=${para#*=} ;;
            --sigma=*)                sigma=${para#*=} ;;
            --iters_per_checkpoint=*) iters_per_checkpoint=${para#*=} ;;
            --c=*|--config=*)         config=${para#*=} ;;
            --device_id=*)            device_id=${para#*=} ;;
            --workers=*)              workers=${para#*=} ;;
            --device=*)               device=${para#*=} ;;
            --step_stop=*)            step_stop=${para#*=} ;;
            --seed=*)                 seed=${para#*=} ;;
            --n_test=*)               n_test=${para#*=} ;;
            --grad_accum_steps=*)     grad_accum_steps=${para#*=} ;;
            --amp_dtype=*|--compile=*|--nproc=*|--case_kind=*|--warm_start=*|--training_files=*|--validation_files=*)
                # only where also_accepted lists them
                name=${para%%=*}
                name=${name#--}
                [[ " $also_accepted " == *" $name "* ]] || unknown_parameter "$para"
                printf -v "$name" '%s' "${para#*=}" ;;
            *) unknown_parameter "$para" ;;
        esac
    done
}

# require_parameter VALUE --NAME HINT: stop, before anything is written, when a required parameter is missing.
require_parameter() {
    if [[ $1 == "" ]]; then
        echo "[Error] parameter $2 is required: $3" >&2
        exit 1
    fi
}

# One-device launchers: --device_id (else the platform's ASCEND_DEVICE_ID, else 0) picks the card; it also
# names the log folder.
select_one_device() {
    export ASCEND_DEVICE_ID=${device_id:-${ASCEND_DEVICE_ID:-0}}
    if [[ $device == "" && $ASCEND_DEVICE_ID != 0 ]]; then
        if command -v npu-smi >/dev/null 2>&1; then device="npu:$ASCEND_DEVICE_ID"
        elif command -v nvidia-smi >/dev/null 2>&1; then device="cuda:$ASCEND_DEVICE_ID"
        fi
    elif [[ $device == cuda || $device == npu ]]; then
        device="$device:$ASCEND_DEVICE_ID"
    fi
}

# set_up_logs train|eval CASE_KIND: the log folder and its files (log_file, summary and, for training,
# loss_file), CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}p_${CASE_KIND}. One training (and one evaluation)
# launcher per log folder: a second one is refused before it writes there (the lock file, .launcher_train.lock,
# names the first and goes when it ends; one left by a launcher killed with -9 is replaced).
set_up_logs() {
    output_root=${TEST_OUTPUT_DIR:-$test_path_dir/output}
    log_dir="$output_root/$ASCEND_DEVICE_ID"
    mkdir -p "$log_dir" || exit 1
    launcher_lock=$("$python" "$repo_dir/run_lock.py" claim "$log_dir" --pid $$ --lock_name ".launcher_$1.lock" \
        --command "bash $0 ${launcher_args[*]}") || exit 1
    trap 'rm -f "$launcher_lock"' EXIT
    log_file="$log_dir/$1_${ASCEND_DEVICE_ID}.log"
    BatchSize=${batch_size:?}
    DeviceType=$(uname -m)
    CaseName=${Network:?}_bs${BatchSize}_${RANK_SIZE}p_$2
    summary="$log_dir/${CaseName}.log"
    # a failed run must not leave the previous run's summary looking current
    if [[ $1 == train ]]; then
        loss_file="$log_dir/train_${CaseName}_loss.txt"
        rm -f "$summary" "$loss_file"
    else
        rm -f "$summary"
    fi
}

# Ascend hosts only: the CANN environment.
set_up_ascend() {
    if [ -d /usr/local/Ascend ] || command -v npu-smi >/dev/null 2>&1; then
        # shellcheck source-path=SCRIPTDIR source=env_npu.sh
        source "$test_path_dir/env_npu.sh"
    fi
}

# Fresh file lists from the data every run (the test set: the first n_test files in sorted order).
make_file_lists() {
    "$python" "$repo_dir/mel2samp.py" --make_split "$data_path" -o "$log_dir" --n_test "$n_test" || exit 1
}

# append_train_flags NAME...: for each NAME whose shell variable is set and not empty, append train.py's
# flag "-NAME value" to the array cmd (a parameter left out keeps the config's or the recipe's value).
# grad_accum_steps goes with every training launcher's flags.
append_train_flags() {
    local name
    for name in "$@" grad_accum_steps; do
        if [[ ${!name} != "" ]]; then
            cmd+=("-$name" "${!name}")
        fi
    done
}

# run_logged WHAT COMMAND...: the command line starts a fresh log_file, its output goes both to the terminal
# and the log; e2e_time is its duration in seconds. A failure stops the launcher, naming the log; a stop by
# SIGINT or SIGTERM stops it with the command's exit code (130, 143) after stopped_by says how to go on.
run_logged() {
    local what=$1 start_time status=0
    shift
    start_time=$(date +%s)
    echo "[INFO] $*" | tee "$log_file"
    # A terminal's Ctrl-C and a SIGTERM to the process group (Slurm, timeout) reach this shell, the command and
    # tee: tee ignores them, so the log gets the command's last lines, and this shell waits for both.
    trap 'true' INT TERM
    "$@" 2>&1 | (trap '' INT TERM; exec tee -a "$log_file") || status=$?
    trap - INT TERM
    if (( status == 130 || status == 143 )); then
        stopped_by "$what" "$status"
        exit "$status"
    elif (( status != 0 )); then
        echo "[Error] $what failed; the log is $log_file" >&2
        exit 1
    fi
    e2e_time=$(( $(date +%s) - start_time ))
}

# stopped_by WHAT STATUS: one line, also in the log, naming the checkpoint a stopped training saved (train.py's
# "Received SIG...: checkpoint saved to PATH", else its newest "Saved checkpoint PATH") and the command that
# resumes from it: this launcher's own parameters, --checkpoint_path=PATH and resume_parameters.
stopped_by() {
    local what=$1 signal_name=SIGTERM checkpoint line
    if (( $2 == 130 )); then signal_name=SIGINT; fi
    if [[ $what != training ]]; then
        line="[INFO] $what stopped by $signal_name; the log is $log_file"
    else
        checkpoint=$(grep -a '^Received SIG.*: checkpoint saved to ' "$log_file" | tail -n 1 | sed 's/.*saved to //')
        [[ $checkpoint == "" ]] && checkpoint=$(grep -a '^Saved checkpoint ' "$log_file" | tail -n 1 | cut -d' ' -f3-)
        if [[ $checkpoint == "" ]]; then
            line="[INFO] training stopped by $signal_name before saving a checkpoint; the same command starts again"
        else
            line="[INFO] training stopped by $signal_name, checkpoint $checkpoint; resume with: $(resume_command "$checkpoint")"
        fi
    fi
    echo "$line" | (trap '' INT TERM; exec tee -a "$log_file")
}

# resume_command CHECKPOINT: this launcher's command line, resuming from CHECKPOINT.
resume_command() {
    local para words=() replaced
    replaced=" --checkpoint_path --pth_path ${resume_parameters[*]%%=*} "
    [[ ${TEST_OUTPUT_DIR:-} != "" ]] && words+=("TEST_OUTPUT_DIR=$TEST_OUTPUT_DIR")
    words+=(bash "$0")
    for para in "${launcher_args[@]}"; do
        [[ $replaced == *" ${para%%=*} "* ]] || words+=("$para")
    done
    words+=("${resume_parameters[@]}" "--checkpoint_path=$1")
    printf '%q ' "${words[@]}" | sed 's/ $//'
}

# The training launchers' summary, read from the log: the three "Final ..." lines, ${CaseName}.log with the
# template's key = value lines, and the loss file.
summarise_training() {
    local fps train_accuracy validation_loss training_time
    # "Epoch N FPS:x" is clips per second over all ranks, from the epoch's 5th iteration to its end.
    fps=$(grep -aE '^Epoch [0-9]+ FPS:' "$log_file" | tail -n 1 | awk -F 'FPS:' '{print $2}')
    # Per-iteration lines are "{iteration}:<TAB>loss:{loss}<TAB>time:{seconds}<TAB>" (loss averaged over ranks).
    grep -aE $'^[0-9]+:\tloss:' "$log_file" | awk -F '\t' '{sub("loss:", "", $2); print $2}' > "$loss_file"
    train_accuracy=$(tail -n 1 "$loss_file")
    validation_loss=$(grep -a '^Validation loss' "$log_file" | tail -n 1 | awk '{print $NF}')
    if [[ $fps == "" || $train_accuracy == "" ]]; then
        echo "[Error] no 'FPS:' or loss line in $log_file: training ran no iteration" >&2
        exit 1
    fi

    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : $fps"
    echo "Final Train Accuracy : ${train_accuracy}"
    echo "E2E Training Duration sec : $e2e_time"

    # ms per iteration (one update of batch x processes x accumulation steps clips)
    training_time=$(awk "BEGIN {printf \"%.2f\", ${BatchSize} * ${RANK_SIZE} * ${grad_accum_steps:-1} * 1000 / ${fps}}")
    {
        echo "Network = ${Network}"
        echo "RankSize = ${RANK_SIZE}"
        echo "BatchSize = ${BatchSize}"
        echo "DeviceType = ${DeviceType}"
        echo "CaseName = ${CaseName}"
        echo "ActualFPS = ${fps}"
        echo "TrainingTime = ${training_time}"
        echo "TrainAccuracy = ${train_accuracy}"
        echo "ActualLoss = ${train_accuracy}"
        echo "E2ETrainingTime = ${e2e_time}"
        echo "ValidationLoss = ${validation_loss}"
    } > "$summary"
    echo "Summary: $summary"
}
