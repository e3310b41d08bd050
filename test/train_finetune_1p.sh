#!/bin/bash
# WaveGlow, 1 device, fine-tuning: start from the weights of --checkpoint_path (any flavour: NVIDIA's
# published .pt, the Ascend port's, DeepLearningExamples', ours) at iteration 0, and train 10 epochs on
# --data_path (e.g. your own single-speaker corpus) at the config's learning rate, or on a ready list.
#
#   bash test/train_finetune_1p.sh --data_path=/data/my_voice --output_directory=./checkpoints_ft \
#       --checkpoint_path=./waveglow_256channels_universal_v5.pt
#   bash test/train_finetune_1p.sh --training_files=lists/train.txt --validation_files=lists/val.txt \
#       --checkpoint_path=./waveglow_256channels_universal_v5.pt      # e.g. `clip.wav|clip.npy` lines
#
# Parameters (--key=value): --data_path (LJ-Speech folder or a folder of wavs; required unless
# --training_files=LIST gives a ready list of `wav` or `wav|mel.npy` lines, --validation_files=LIST optional),
# --output_directory, --checkpoint_path (required; --pth_path is read the same way), --fp16_run=true|false, --epochs,
# --batch-size, --learning_rate, --sigma, --iters_per_checkpoint, --c (config, default config.json),
# --amp_dtype=auto|float16|bfloat16 (the dtype of --fp16_run), --compile=true|false (torch.compile),
# --device_id, --workers, --device=auto|cuda|npu|cpu, --step_stop=N (stop after N iterations), --seed,
# --n_test=N (clips held out for validation, default 10), --grad_accum_steps=N (micro-batches per update),
# --warm_start=true|false (false: resume, exactly, a fine-tuning run that was stopped, from its own checkpoint;
# the line printed at the stop says so).
# Logs go to ${TEST_OUTPUT_DIR:-test/output}/${ASCEND_DEVICE_ID}/: train_${ASCEND_DEVICE_ID}.log, the file
# lists made from --data_path (if given), ${CaseName}.log (the key = value summary) and train_${CaseName}_loss.txt.
# Only translates parameters into train.py flags and summarises the log; the training is train.py's.
set -o pipefail

export RANK_SIZE=1
Network="WaveGlow_for_PyTorch"
batch_size=24
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # defaults, the --key=value loop, set-up, summary

epochs=10  # the recipe: ten epochs from the given weights
training_files=""
validation_files=""
warm_start=true  # weights only, a new run from iteration 0; false resumes one of this launcher's stopped runs
also_accepted="amp_dtype compile training_files validation_files warm_start"
resume_parameters=(--warm_start=false)
parse_parameters "$@"
if [[ $training_files == "" ]]; then
    require_parameter "$data_path" --data_path "--data_path=/path/to/LJSpeech-1.1 (or --training_files=LIST)"
fi
require_parameter "$checkpoint_path" --checkpoint_path "the checkpoint to fine-tune from"

select_one_device
set_up_logs train acc
set_up_ascend
if [[ $training_files == "" ]]; then
    make_file_lists
    training_files="$log_dir/train_files.txt"
    # shellcheck disable=SC2034  # passed on by append_train_flags
    validation_files=${validation_files:-$log_dir/test_files.txt}
fi

cmd=("$python" "$repo_dir/train.py" -c "$config" -training_files "$training_files" -epochs "$epochs"
     -batch_size "$batch_size" -checkpoint_path "$checkpoint_path" -warm_start "$warm_start")
append_train_flags output_directory fp16_run learning_rate sigma iters_per_checkpoint workers \
    device step_stop amp_dtype compile seed validation_files
run_logged training "${cmd[@]}"
summarise_training
