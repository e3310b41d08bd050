#!/bin/bash
# WaveGlow, 1 device, fine-tuning: start from the weights of --checkpoint_path (any flavour: NVIDIA's
# published .pt, the Ascend port's, DeepLearningExamples', ours) at iteration 0, and train 10 epochs on
# --data_path (e.g. your own single-speaker corpus) at the config's learning rate.
#
#   bash test/train_finetune_1p.sh --data_path=/data/my_voice --output_directory=./checkpoints_ft \
#       --checkpoint_path=./waveglow_256channels_universal_v5.pt
#
# Parameters (--key=value): --data_path (required: LJ-Speech folder or a folder of wavs), --output_directory,
# --checkpoint_path (required; --pth_path is read the same way), --fp16_run=true|false, --epochs,
# --batch-size, --learning_rate, --sigma, --iters_per_checkpoint, --c (config, default config.json),
# --amp_dtype=auto|float16|bfloat16 (the dtype of --fp16_run), --compile=true|false (torch.compile),
# --device_id, --workers, --device=auto|cuda|npu|cpu, --step_stop=N (stop after N iterations), --seed,
# --n_test=N (clips held out for validation, default 10).
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/: train_${ASCEND_DEVICE_ID}.log, the file
# lists made from --data_path, ${CaseName}.log (the key = value summary) and train_${CaseName}_loss.txt.
# Only translates parameters into train.py flags and summarises the log; the training is train.py's.
set -o pipefail

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_path_dir")
python=${PYTHON:-python3}

export RANK_SIZE=1
Network="WaveGlow_for_PyTorch"
batch_size=24
epochs=10

data_path=""
output_directory=""
checkpoint_path=""
fp16_run=""
learning_rate=""
sigma=""
iters_per_checkpoint=""
config="$repo_dir/config.json"
device_id=""
workers=""
device=""
step_stop=""
amp_dtype=""
compile=""
seed=""
n_test=10  # the test split: the first n_test files in sorted order

# The template's `for para in $*`, with "$@" so that paths containing spaces survive.
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
        --amp_dtype=*)            amp_dtype=${para#*=} ;;
        --compile=*)              compile=${para#*=} ;;
        --seed=*)                 seed=${para#*=} ;;
        --n_test=*)               n_test=${para#*=} ;;
        *) echo "[Error] unknown parameter '$para': parameters are --key=value, see the top of $0" >&2; exit 1 ;;
    esac
done

if [[ $data_path == "" ]]; then
    echo "[Error] parameter --data_path is required: --data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)" >&2
    exit 1
fi
if [[ $checkpoint_path == "" ]]; then
    echo "[Error] parameter --checkpoint_path is required: the checkpoint to fine-tune from" >&2
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
mkdir -p "$log_dir" || exit 1
log_file="$log_dir/train_${ASCEND_DEVICE_ID}.log"
BatchSize=${batch_size}
DeviceType=$(uname -m)
CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}p_acc
summary="$log_dir/${CaseName}.log"
loss_file="$log_dir/train_${CaseName}_loss.txt"
rm -f "$summary" "$loss_file"  # a failed run must not leave the previous run's summary looking current

# Ascend hosts only: the CANN environment.
if [ -d /usr/local/Ascend ] || command -v npu-smi >/dev/null 2>&1; then
    source "$test_path_dir/env_npu.sh"
fi

# Fresh file lists from the data every run (the test set: the first n_test files in sorted order).
"$python" "$repo_dir/mel2samp.py" --make_split "$data_path" -o "$log_dir" --n_test "$n_test" || exit 1

start_time=$(date +%s)
cmd=("$python" "$repo_dir/train.py" -c "$config" -training_files "$log_dir/train_files.txt"
     -validation_files "$log_dir/test_files.txt" -epochs "$epochs" -batch_size "$batch_size"
     -checkpoint_path "$checkpoint_path" -warm_start true)  # weights only: a new run from iteration 0
source "$test_path_dir/train_flags.sh"
append_train_flags output_directory fp16_run learning_rate sigma iters_per_checkpoint workers \
    device step_stop amp_dtype compile seed
echo "[INFO] ${cmd[*]}" | tee "$log_file"
if ! "${cmd[@]}" 2>&1 | tee -a "$log_file"; then
    echo "[Error] training failed; the log is $log_file" >&2
    exit 1
fi
end_time=$(date +%s)
e2e_time=$(( end_time - start_time ))

# The summary: the three "Final ..." lines, ${CaseName}.log and the loss file.
source "$test_path_dir/summarise_training.sh"
