#!/bin/bash
# WaveGlow, 8 devices of one host, full training (the accuracy recipe): 313 epochs, learning rate 2e-4,
# batch 24 per device, a checkpoint every 1000 iterations (the last on LJ-Speech is waveglow_21000).
#
#   bash test/train_full_8p.sh --data_path=/data/LJSpeech-1.1 --output_directory=./checkpoints
#
# Processes: --nproc=N, else RANK_SIZE from the environment, else the host's devices (npu-smi, nvidia-smi;
# at most 8), else 1 on a CPU-only host. Fewer devices than 8 work; the global batch is 24 x processes.
# Parameters (--key=value): --data_path (required: LJ-Speech folder or a folder of wavs), --output_directory,
# --checkpoint_path (resume or warm start; --pth_path is read the same way), --fp16_run=true|false, --epochs,
# --batch-size (per device), --learning_rate, --sigma, --iters_per_checkpoint, --c (config, default
# config.json), --device_id (names the log folder), --workers, --device=auto|cuda|npu|cpu, --nproc=N,
# --amp_dtype=auto|float16|bfloat16 (the dtype of --fp16_run), --compile=true|false (torch.compile),
# --step_stop=N (stop after N iterations), --seed, --n_test=N (clips held out for validation, default 10).
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/: train_${ASCEND_DEVICE_ID}.log, the file
# lists made from --data_path, ${CaseName}.log (the key = value summary) and train_${CaseName}_loss.txt.
# Only translates parameters into train.py flags and summarises the log; the training is train.py's.
set -o pipefail

test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$test_path_dir")
python=${PYTHON:-python3}

export RANK_SIZE=${RANK_SIZE:-}
Network="WaveGlow_for_PyTorch"
batch_size=24
epochs=313
learning_rate=2e-4
iters_per_checkpoint=1000

data_path=""
output_directory=""
checkpoint_path=""
fp16_run=""
sigma=""
config="$repo_dir/config.json"
device_id=""
workers=""
device=""
nproc=""
step_stop=""
amp_dtype=""
compile=""
seed=""
case_kind=acc
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
        --nproc=*)                nproc=${para#*=} ;;
        --step_stop=*)            step_stop=${para#*=} ;;
        --amp_dtype=*)            amp_dtype=${para#*=} ;;
        --compile=*)              compile=${para#*=} ;;
        --case_kind=*)            case_kind=${para#*=} ;;  # acc (this recipe) or perf (train_performance_8p.sh)
        --seed=*)                 seed=${para#*=} ;;
        --n_test=*)               n_test=${para#*=} ;;
        *) echo "[Error] unknown parameter '$para': parameters are --key=value, see the top of $0" >&2; exit 1 ;;
    esac
done

if [[ $data_path == "" ]]; then
    echo "[Error] parameter --data_path is required: --data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)" >&2
    exit 1
fi

# One process per device: --nproc, else RANK_SIZE, else count the host's devices.
nproc=${nproc:-$RANK_SIZE}
if [[ $nproc == "" && $device != cpu* ]]; then
    if command -v npu-smi >/dev/null 2>&1; then
        nproc=$(npu-smi info -l 2>/dev/null | awk -F ':' '/Total Count/ {print $2 + 0; exit}')
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
    if [[ $nproc =~ ^[0-9]+$ ]] && (( nproc > 8 )); then nproc=8; fi
fi
if [[ $nproc == "" || $nproc == 0 ]]; then
    nproc=1
    echo "[INFO] no GPU or NPU to count: 1 process (--nproc=N or RANK_SIZE=N for more)"
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "[Error] --nproc / RANK_SIZE must be a positive whole number, got '$nproc'" >&2
    exit 1
fi
export RANK_SIZE=$nproc
echo "[INFO] $RANK_SIZE training process(es) on this host"

export ASCEND_DEVICE_ID=${device_id:-0}
output_root=${TEST_OUTPUT_DIR:-$test_path_dir/output}
log_dir="$output_root/$ASCEND_DEVICE_ID"
mkdir -p "$log_dir" || exit 1
log_file="$log_dir/train_${ASCEND_DEVICE_ID}.log"
BatchSize=${batch_size}
DeviceType=$(uname -m)
CaseName=${Network}_bs${BatchSize}_${RANK_SIZE}p_${case_kind}
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
cmd=("$python" -m torch.distributed.run --standalone --nproc_per_node="$RANK_SIZE" "$repo_dir/train.py"
     -c "$config" -training_files "$log_dir/train_files.txt" -validation_files "$log_dir/test_files.txt"
     -epochs "$epochs" -batch_size "$batch_size" -learning_rate "$learning_rate"
     -iters_per_checkpoint "$iters_per_checkpoint" -dist_backend auto)  # auto: nccl, hccl or gloo by device
source "$test_path_dir/train_flags.sh"
append_train_flags output_directory checkpoint_path fp16_run sigma workers device \
    step_stop amp_dtype compile seed
echo "[INFO] ${cmd[*]}" | tee "$log_file"
if ! "${cmd[@]}" 2>&1 | tee -a "$log_file"; then
    echo "[Error] training failed; the log is $log_file" >&2
    exit 1
fi
end_time=$(date +%s)
e2e_time=$(( end_time - start_time ))

# The summary: the three "Final ..." lines, ${CaseName}.log and the loss file.
source "$test_path_dir/summarise_training.sh"
