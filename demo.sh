#!/bin/bash
# The built-in demo, on the CPU in a few minutes, with nothing to download:
#   1. make a small speech-like corpus (demo/make_demo_corpus.py, LJ-Speech layout, 40 clips of 2 s),
#   2. train the small WaveGlow of demo/config_demo.json on it through the real launcher, test/train_full_8p.sh,
#      with two CPU processes (DistributedDataParallel over gloo) in float32 on every kind of CPU: deterministic
#      alike on CPUs with and without bfloat16 units, and under 5 minutes on 2 cores of an AVX2 CPU, where
#      bfloat16 would be emulated (~12x slower for this model),
#   3. evaluate the last checkpoint on the 10 held-out clips with test/train_eval_8p.sh (validation NLL,
#      copy synthesis of each clip, mel comparison plots),
#   4. draw the loss curve and original-versus-synthesis spectrograms, and compare loudness envelopes and
#      pitch of original and synthesis (demo/plot_demo.py).
# Everything lands in ./demo_output/. Environment knobs: DEMO_STEPS (training iterations, default 300),
# DEMO_PROCESSES (default 2), DEMO_DEVICE (default cpu; auto picks GPUs or NPUs when there are some),
# DEMO_SOURCE (synthetic; espeak or auto speak the corpus with espeak-ng when it is installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

out=demo_output
steps=${DEMO_STEPS:-300}
processes=${DEMO_PROCESSES:-2}
device=${DEMO_DEVICE:-cpu}
python=${PYTHON:-python3}
# The demo trains with sigma 0.1, about the clips' RMS level: the flows then start near the right overall
# scale and spend the few minutes on the mel conditioning. Synthesis uses 0.6 x that, as sigma 0.6 is
# used with models trained at sigma 1.
synthesis_sigma=0.06
# Earlier demo runs' results would be mistaken for this one's; the corpus is remade identically.
rm -rf "$out/checkpoints" "$out/logs" "$out/eval" "$out/corpus"
started=$(date +%s)
# Ctrl-C or a SIGTERM to the group: wait for the step that stops (the training launcher saves a checkpoint and
# prints the command that resumes it), then leave with its exit code (130, 143) instead of dying first.
trap 'true' INT TERM

echo "== 1/4 corpus: 40 speech-like clips of 2 s in $out/corpus"
"$python" demo/make_demo_corpus.py -o "$out/corpus" --n_clips 40 --seconds 2.0 --seed 0 \
    --source "${DEMO_SOURCE:-synthetic}"

echo "== 2/4 training demo/config_demo.json for $steps iterations, $processes processes on $device"
TEST_OUTPUT_DIR="$out/logs" bash test/train_full_8p.sh --data_path="$out/corpus" --c=demo/config_demo.json \
    --output_directory="$out/checkpoints" --device="$device" --nproc="$processes" --batch-size=4 \
    --learning_rate=2e-3 --epochs=100000 --step_stop="$steps" --iters_per_checkpoint=100 --workers=0

echo "== 3/4 evaluation of waveglow_$steps on the 10 held-out clips"
TEST_OUTPUT_DIR="$out/logs" bash test/train_eval_8p.sh --data_path="$out/corpus" \
    --pth_path="$out/checkpoints/waveglow_$steps" --output_directory="$out/eval" --device="$device" \
    --sigma="$synthesis_sigma"

echo "== 4/4 pictures, loudness and pitch checks"
"$python" demo/plot_demo.py --log "$out/logs/0/train_0.log" --eval_dir "$out/eval" -o "$out"

echo
echo "Done in $(( $(date +%s) - started )) s. Listen to $out/eval/*_synthesis.wav next to $out/corpus/wavs/,"
echo "and look at $out/loss_curve.png, $out/spectrograms.png and $out/eval/*_mel.png."
