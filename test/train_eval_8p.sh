#!/bin/bash
# WaveGlow evaluation of a checkpoint on the test split of --data_path (its first 10 files in sorted order):
# validation NLL (the training loss on held-out clips, this repo's accuracy figure) and copy synthesis
# (each clip's mel back to audio at sigma 0.6, scored by the mel L1 distance to the original).
#
#   bash test/train_eval_8p.sh --data_path=/data/LJSpeech-1.1 --pth_path=./checkpoints/waveglow_21000
#
# One process does it all (ten clips need no more), so RankSize is 1. The synthesised clips
# (<name>_synthesis.wav), mel comparison plots (<name>_mel.png) and eval.json go to --output_directory,
# default ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/eval.
# Parameters (--key=value): --data_path and --pth_path (required; --checkpoint_path is read the same way;
# any checkpoint flavour), --output_directory, --fp16_run=true|false, --batch-size, --sigma (the synthesis
# noise scale; the NLL uses the training sigma), --c (config for the mel; default: the checkpoint's own),
# --device_id, --device=auto|cuda|npu|cpu, --seed, --n_test=N (size of the test split, default 10).
# The training-only parameters (--epochs, --learning_rate, --iters_per_checkpoint, --workers, --nproc,
# --step_stop) are accepted and have no effect here.
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/: eval_${ASCEND_DEVICE_ID}.log (beside,
# not over, a training run's train_${ASCEND_DEVICE_ID}.log) and the ${CaseName}.log summary.
set -o pipefail

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_path_dir")
python=${PYTHON:-python3}

export RANK_SIZE=1
Network="WaveGlow_for_PyTorch"
batch_size=24

data_path=""
pth_path=""
output_directory=""
fp16_run=""
sigma=""
config=""
device_id=""
device=""
seed=""
n_test=10  # the test split: the first n_test files in sorted order

# The template's `for para in $*`, with "$@" so that paths containing spaces survive.
for para in "$@"
do
    case $para in
        --data_path=*)            data_path=${para#*=} ;;
        --pth_path=*|--checkpoint_path=*) pth_path=${para#*=} ;;
        --output_directory=*)     output_directory=${para#*=} ;;
        --fp16_run=*)             fp16_run=${para#*=} ;;
        --batch-size=*|--batch_size=*) batch_size=${para#*=} ;;
        --sigma=*)                sigma=${para#*=} ;;
        --c=*|--config=*)         config=${para#*=} ;;
        --device_id=*)            device_id=${para#*=} ;;
        --device=*)               device=${para#*=} ;;
        --seed=*)                 seed=${para#*=} ;;
        --n_test=*)               n_test=${para#*=} ;;
        --epochs=*|--learning_rate=*|--iters_per_checkpoint=*|--workers=*|--nproc=*|--step_stop=*) ;;
        *) echo "[Error] unknown parameter '$para': parameters are --key=value, see the top of $0" >&2; exit 1 ;;
    esac
done

if [[ $data_path == "" ]]; then
    echo "[Error] parameter --data_path is required: --data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)" >&2
    exit 1
fi
if [[ $pth_path == "" ]]; then
    echo "[Error] parameter --pth_path is required: the checkpoint to evaluate (--pth_path=checkpoints/waveglow_21000)" >&2
    exit 1
fi
if [[ ! -f $pth_path ]]; then
    echo "[Error] checkpoint --pth_path=$pth_path not found" >&2
    exit 1
fi

# --device_id (else the platform's ASCEND_DEVICE_ID, else 0) picks the card; it also names the log folder.
export ASCEND_DEVICE_ID=${device_id:-${ASCEND_DEVICE_ID:-0}}
if [[ $device == "" && $ASCEND_DEVICE_ID != 0 ]]; then
    if command -v npu-smi >/dev/null 2>&1; then device="npu:$ASCEND_DEVICE_ID"
    elif command -v nvidia-smi >/dev/null 2>&1; then device="cuda:$ASCEND_DEVICE_ID"
    fi
elif [[ $device == cuda || $device == npu ]]; then
    device="$device:$ASCEND_DEVICE_ID"
fi

output_root=${TEST_OUTPUT_DIR:-$test_path_dir/output}
log_dir="$output_root/$ASCEND_DEVICE_ID"
output_directory=${output_directory:-$log_dir/eval}
mkdir -p "$log_dir" "$output_directory" || exit 1
log_file="$log_dir/eval_${ASCEND_DEVICE_ID}.log"
BatchSize=${batch_size}
DeviceType=$(uname -m)
CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}p_eval
summary="$log_dir/${CaseName}.log"
rm -f "$summary"  # a failed run must not leave the previous run's summary looking current

# Ascend hosts only: the CANN environment.
if [ -d /usr/local/Ascend ] || command -v npu-smi >/dev/null 2>&1; then
    source "$test_path_dir/env_npu.sh"
fi

# Fresh file lists from the data (the evaluation uses test_files.txt).
"$python" "$repo_dir/mel2samp.py" --make_split "$data_path" -o "$log_dir" --n_test "$n_test" || exit 1

start_time=$(date +%s)
cmd=("$python" "$repo_dir/inference.py" -w "$pth_path" --eval_list "$log_dir/test_files.txt"
     -o "$output_directory" --batch_size "$batch_size")
[[ $config != "" ]]  && cmd+=(-c "$config")
[[ $sigma != "" ]]   && cmd+=(-s "$sigma")
[[ $device != "" ]]  && cmd+=(--device "$device")
[[ $seed != "" ]]    && cmd+=(--seed "$seed")
[[ ${fp16_run,,} == true || $fp16_run == 1 ]] && cmd+=(--is_fp16)
echo "[INFO] ${cmd[*]}" | tee "$log_file"
if ! "${cmd[@]}" 2>&1 | tee -a "$log_file"; then
    echo "[Error] evaluation failed; the log is $log_file" >&2
    exit 1
fi
end_time=$(date +%s)
e2e_time=$(( end_time - start_time ))

# ------------------------------------------ summary ------------------------------------------
validation_nll=$(grep -a '^Validation NLL:' "$log_file" | tail -n 1 | awk '{print $NF}')
mel_l1=$(grep -a '^Copy-synthesis mel L1:' "$log_file" | tail -n 1 | awk '{print $NF}')
if [[ $validation_nll == "" || $mel_l1 == "" ]]; then
    echo "[Error] no 'Validation NLL:' or 'Copy-synthesis mel L1:' line in $log_file" >&2
    exit 1
fi

echo "------------------ Final result ------------------"
echo "Final Validation NLL : ${validation_nll}"
echo "Final Copy-synthesis mel L1 : ${mel_l1}"
echo "E2E Evaluation Duration sec : $e2e_time"
echo "Synthesised clips : $output_directory"

{
    echo "Network = ${Network}"
    echo "RankSize = ${RANK_SIZE}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "Checkpoint = ${pth_path}"
    echo "ValidationNLL = ${validation_nll}"
    echo "CopySynthesisMelL1 = ${mel_l1}"
    echo "E2ETrainingTime = ${e2e_time}"
    echo "SynthesisDir = ${output_directory}"
} > "$summary"
echo "Summary: $summary"
