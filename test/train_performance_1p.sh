#!/bin/bash
# WaveGlow, 1 device, performance: one epoch (or --step_stop iterations), then the FPS/loss summary.
#
#   bash test/train_performance_1p.sh --data_path=/data/LJSpeech-1.1 --output_directory=./checkpoints
#
# Parameters (--key=value): --data_path (required: LJ-Speech folder or a folder of wavs), --output_directory,
# --checkpoint_path (resume or warm start; --pth_path is read the same way), --fp16_run=true|false, --epochs,
# --batch-size, --learning_rate, --sigma, --iters_per_checkpoint, --c (config, default config.json),
# --amp_dtype=auto|float16|bfloat16 (the dtype of --fp16_run), --compile=true|false (torch.compile),
# --device_id, --workers, --device=auto|cuda|npu|cpu, --step_stop=N (stop after N iterations), --seed,
# --n_test=N (clips held out for validation, default 10).
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/: train_${ASCEND_DEVICE_ID}.log, the file
# lists made from --data_path, ${CaseName}.log (the key = value summary) and train_${CaseName}_loss.txt.
# Only translates parameters into train.py flags and summarises the log; the training is train.py's.
set -o pipefail

export RANK_SIZE=1
Network="WaveGlow_for_PyTorch"
batch_size=24
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # defaults, the --key=value loop, set-up, summary

epochs=1  # the recipe: one epoch of LJ-Speech
also_accepted="amp_dtype compile"
parse_parameters "$@"
require_parameter "$data_path" --data_path "--data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)"

select_one_device
set_up_logs train perf
set_up_ascend
make_file_lists

cmd=("$python" "$repo_dir/train.py" -c "$config" -training_files "$log_dir/train_files.txt"
     -validation_files "$log_dir/test_files.txt" -epochs "$epochs" -batch_size "$batch_size")
append_train_flags output_directory checkpoint_path fp16_run learning_rate sigma iters_per_checkpoint \
    workers device step_stop amp_dtype compile seed
run_logged training "${cmd[@]}"
summarise_training
