"""Pictures and a pitch check for the demo: the training loss curve from a launcher log, and original
versus WaveGlow copy synthesis spectrograms from an evaluation folder (inference.py --eval_list).

    python demo/plot_demo.py --log demo_output/logs/0/train_0.log --eval_dir demo_output/eval -o demo_output

Writes OUT/loss_curve.png and OUT/spectrograms.png, and prints two checks of the synthesis against the
original: the correlation of their loudness envelopes (speech and pauses in the right places), and how
often it keeps the pitch (over the voiced frames of the held-out clips, the share whose F0 is within 5 %).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf

from make_demo_corpus import SAMPLING_RATE, estimate_pitch

ITERATION_LINE = re.compile(r"^(\d+):\tloss:(\S+)\t")
VALIDATION_LINE = re.compile(r"^Validation loss (\d+): (\S+)")
FRAME, HOP = 1024, 256


def read_losses(log_path):
    """([(iteration, training loss)], [(iteration, validation loss)]) from a train.py log."""
    training, validation = [], []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if match := ITERATION_LINE.match(line):
            training.append((int(match[1]), float(match[2])))
        elif match := VALIDATION_LINE.match(line):
            validation.append((int(match[1]), float(match[2])))
    if not training:
        raise ValueError(f"{log_path} has no '<iteration>:<TAB>loss:' lines: is it a train.py log?")
    return training, validation


def plot_losses(training, validation, path):
    iterations, losses = np.array(training).T
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(iterations, losses, color="0.75", linewidth=0.8, label="training loss (per iteration)")
    axis.plot(iterations[window - 1:], smooth, color="C0", label=f"training loss (mean of {window})")
    if validation:
        axis.plot(*np.array(validation).T, "o", color="C3", label="validation NLL (held-out clips)")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss (negative log-likelihood per sample)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pitch_track(audio):
    """[(F0, periodicity)] per frame, and each frame's RMS."""
    starts = range(0, len(audio) - FRAME, HOP)
    return [estimate_pitch(audio[s:s + FRAME]) for s in starts], [np.sqrt(np.mean(audio[s:s + FRAME] ** 2)) for s in starts]


def pitch_agreement(original, synthesis):
    """(frames compared, frames whose synthesis F0 is within 5 % of the original's) over voiced frames."""
    reference, rms = pitch_track(original)
    output, _ = pitch_track(synthesis[:len(original)])
    loud = 0.1 * max(rms)
    # a synthesis shorter than the original has fewer frames: compare the frames both have
    voiced = [(f_ref, f_out) for (f_ref, strength), (f_out, _), level in zip(reference, output, rms, strict=False)
              if strength > 0.6 and level > loud]
    return len(voiced), sum(abs(f_out - f_ref) < 0.05 * f_ref for f_ref, f_out in voiced)


def envelope_correlation(original, synthesis):
    """Correlation of the two clips' frame loudness in dB: does the synthesis speak and pause in time?"""
    def loudness(audio):
        frames = [audio[s:s + FRAME] for s in range(0, len(original) - FRAME, HOP)]
        return 10 * np.log10([np.mean(frame ** 2) + 1e-10 for frame in frames])
    return float(np.corrcoef(loudness(original), loudness(synthesis[:len(original)]))[0, 1])


def log_spectrogram(audio):
    window = np.hanning(FRAME)
    frames = np.stack([audio[s:s + FRAME] * window for s in range(0, len(audio) - FRAME, HOP)], axis=1)
    return 20 * np.log10(np.abs(np.fft.rfft(frames, axis=0)) + 1e-5)


def plot_spectrograms(pairs, path, top_hz=6000):
    figure, axes = plt.subplots(len(pairs), 2, figsize=(12, 3 * len(pairs)), squeeze=False)
    for row, (name, original, synthesis) in enumerate(pairs):
        for column, (audio, label) in enumerate(((original, "original"), (synthesis, "WaveGlow copy synthesis"))):
            spectrogram = log_spectrogram(audio)
            axis = axes[row, column]
            axis.imshow(spectrogram, origin="lower", aspect="auto", vmin=spectrogram.max() - 80,
                        vmax=spectrogram.max(), extent=(0, len(audio) / SAMPLING_RATE, 0, SAMPLING_RATE / 2))
            axis.set_ylim(0, top_hz)
            axis.set_title(f"{name}: {label}", fontsize=10)
            axis.set_ylabel("Hz")
    for axis in axes[-1]:
        axis.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="train_<id>.log written by a test/ launcher (or train.py output)")
    parser.add_argument("--eval_dir", required=True, help="folder holding eval.json from inference.py --eval_list")
    parser.add_argument("-o", "--output_dir", required=True)
    parser.add_argument("--clips", type=int, default=3, help="held-out clips shown in spectrograms.png")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        training, validation = read_losses(args.log)
        report = json.loads((Path(args.eval_dir) / "eval.json").read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"plot_demo.py: {error}")
    plot_losses(training, validation, out / "loss_curve.png")
    first, last = np.mean([loss for _, loss in training[:5]]), np.mean([loss for _, loss in training[-5:]])
    print(f"training loss: {first:.3f} (mean of the first 5 iterations) -> {last:.3f} (last 5), "
          f"{len(training)} iterations")
    if validation:
        print(f"validation NLL at iteration {validation[-1][0]}: {validation[-1][1]:.3f}")

    pairs, compared, agreeing, correlations = [], 0, 0, []
    for clip in report["clips"]:
        original, _ = sf.read(clip["file"])
        wav = Path(clip["wav"])  # relative to where inference.py ran; else look beside eval.json
        synthesis, _ = sf.read(str(wav if wav.exists() else Path(args.eval_dir) / wav.name))
        n, k = pitch_agreement(original, synthesis)
        compared, agreeing = compared + n, agreeing + k
        correlations.append(envelope_correlation(original, synthesis))
        if len(pairs) < args.clips:
            pairs.append((Path(clip["file"]).stem, original, synthesis))
    plot_spectrograms(pairs, out / "spectrograms.png")
    print(f"copy synthesis of {len(report['clips'])} held-out clips: validation NLL {report['validation_nll']:.3f}, "
          f"mel L1 {report['copy_synthesis_mel_l1']:.3f}")
    print(f"loudness envelope: correlation {np.mean(correlations):.2f} between original and synthesis (mean over clips)")
    if compared:
        print(f"pitch kept: {agreeing} of {compared} voiced frames ({100 * agreeing / compared:.0f} %) have the "
              f"synthesis F0 within 5 % of the original's")
    print(f"wrote {out / 'loss_curve.png'} and {out / 'spectrograms.png'}")


if __name__ == "__main__":
    main()
