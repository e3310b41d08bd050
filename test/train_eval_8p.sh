#!/bin/bash
# WaveGlow evaluation of a checkpoint on the test split of --data_path (its first 10 files in sorted order):
# validation NLL (the training loss on held-out clips, this repo's accuracy figure) and copy synthesis
# (each clip's mel back to audio at sigma 0.6, scored against the original by mel L1, MCD, F0 RMSE, V/UV
# error, MR-STFT, PESQ and STOI; see evaluate.py).
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

export RANK_SIZE=1
Network="WaveGlow_for_PyTorch"
batch_size=24
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # defaults, the --key=value loop, set-up, summary

config=""  # the mel settings: the checkpoint's own config unless --c is given
also_accepted="nproc"  # like --epochs and the other training-only parameters: accepted, no effect here
parse_parameters "$@"
require_parameter "$data_path" --data_path "--data_path=/path/to/LJSpeech-1.1 (or a folder of wavs)"
require_parameter "$checkpoint_path" --pth_path \
    "the checkpoint to evaluate (--pth_path=checkpoints/waveglow_21000)"
if [[ ! -f $checkpoint_path ]]; then
    echo "[Error] checkpoint --pth_path=$checkpoint_path not found" >&2
    exit 1
fi

select_one_device
set_up_logs eval eval
output_directory=${output_directory:-$log_dir/eval}
mkdir -p "$output_directory" || exit 1
set_up_ascend
make_file_lists  # the evaluation uses test_files.txt

cmd=("$python" "$repo_dir/inference.py" -w "$checkpoint_path" --eval_list "$log_dir/test_files.txt"
     -o "$output_directory" --batch_size "$batch_size")
[[ $config != "" ]]  && cmd+=(-c "$config")
[[ $sigma != "" ]]   && cmd+=(-s "$sigma")
[[ $device != "" ]]  && cmd+=(--device "$device")
[[ $seed != "" ]]    && cmd+=(--seed "$seed")
[[ ${fp16_run,,} == true || $fp16_run == 1 ]] && cmd+=(--is_fp16)
run_logged evaluation "${cmd[@]}"

# ------------------------------------------ summary ------------------------------------------
# The last value of a "Copy-synthesis <name>:" line: means over the clips (nan where a score is undefined, e.g. no
# frame voiced in both).
score() { grep -a "^Copy-synthesis $1:" "$log_file" | tail -n 1 | awk '{print $NF}'; }
validation_nll=$(grep -a '^Validation NLL:' "$log_file" | tail -n 1 | awk '{print $NF}')
mel_l1=$(score "mel L1")
if [[ $validation_nll == "" || $mel_l1 == "" ]]; then
    echo "[Error] no 'Validation NLL:' or 'Copy-synthesis mel L1:' line in $log_file" >&2
    exit 1
fi
mcd=$(score "MCD (dB)")
f0_rmse=$(score "F0 RMSE (cents)")
vuv_error=$(score "V/UV error")
mrstft=$(score "MR-STFT")
pesq=$(score "PESQ (wide band)")
stoi=$(score "STOI")

echo "------------------ Final result ------------------"
echo "Final Validation NLL : ${validation_nll}"
echo "Final Copy-synthesis mel L1 : ${mel_l1}"
echo "Final Copy-synthesis MCD dB / F0 RMSE cents / V/UV error : ${mcd} / ${f0_rmse} / ${vuv_error}"
echo "Final Copy-synthesis MR-STFT / PESQ / STOI : ${mrstft} / ${pesq} / ${stoi}"
echo "E2E Evaluation Duration sec : $e2e_time"
echo "Synthesised clips : $output_directory"

{
    echo "Network = ${Network}"
    echo "RankSize = ${RANK_SIZE}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "Checkpoint = ${checkpoint_path}"
    echo "ValidationNLL = ${validation_nll}"
    echo "CopySynthesisMelL1 = ${mel_l1}"
    echo "CopySynthesisMCD = ${mcd}"
    echo "F0RMSECents = ${f0_rmse}"
    echo "VUVError = ${vuv_error}"
    echo "MRSTFT = ${mrstft}"
    echo "PESQ = ${pesq}"
    echo "STOI = ${stoi}"
    echo "E2ETrainingTime = ${e2e_time}"
    echo "SynthesisDir = ${output_directory}"
} > "$summary"
echo "Summary: $summary"
