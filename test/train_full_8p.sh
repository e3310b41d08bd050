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

export RANK_SIZE=${RANK_SIZE:-}
Network="WaveGlow_for_PyTorch"
batch_size=24
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # defaults, the --key=value loop, set-up, summary

# The accuracy recipe.
epochs=313
learning_rate=2e-4
iters_per_checkpoint=1000
nproc=""
case_kind=acc  # acc (this recipe) or perf (train_performance_8p.sh)
also_accepted="amp_dtype compile nproc case_kind"
parse_parameters "$@"
require_parameter "$data_path" --data_path "--data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)"

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
resume_parameters=("--nproc=$nproc")  # an exact resume needs the same global batch
echo "[INFO] $RANK_SIZE training process(es) on this host"

export ASCEND_DEVICE_ID=${device_id:-0}  # names the log folder; each process picks its own device
set_up_logs train "$case_kind"
set_up_ascend
make_file_lists

# distributed.py: torchrun underneath, with Ctrl-C and SIGTERM passed on to the workers, which save and stop.
cmd=("$python" "$repo_dir/distributed.py" --nproc_per_node="$RANK_SIZE"
     -c "$config" -training_files "$log_dir/train_files.txt" -validation_files "$log_dir/test_files.txt"
     -epochs "$epochs" -batch_size "$batch_size" -learning_rate "$learning_rate"
     -iters_per_checkpoint "$iters_per_checkpoint" -dist_backend auto)  # auto: nccl, hccl or gloo by device
append_train_flags output_directory checkpoint_path fp16_run sigma workers device \
    step_stop amp_dtype compile seed
run_logged training "${cmd[@]}"
summarise_training
