#!/bin/bash
# WaveGlow, 8 devices of one host, performance: the full recipe's settings (learning rate 2e-4, batch 24
# per device) for 2 epochs; the reported FPS is the last epoch's, so start-up does not count.
#
#   bash test/train_performance_8p.sh --data_path=/data/LJSpeech-1.1 --output_directory=./checkpoints
#
# Takes every parameter of train_full_8p.sh (see its header); the only differences are the epoch count
# (a later --epochs=N still wins) and the summary's CaseName, which ends in _perf instead of _acc.
export RANK_SIZE=${RANK_SIZE:-}
# The Ascend template's header; train_full_8p.sh, which runs this recipe, sets Network the same way.
# shellcheck disable=SC2034
Network="WaveGlow_for_PyTorch"
batch_size=24
epochs=2
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train_full_8p.sh" --batch-size="$batch_size" \
    --epochs="$epochs" --case_kind=perf "$@"
