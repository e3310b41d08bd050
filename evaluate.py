"""Evaluation shared by training and inference: validation negative log-likelihood, copy-synthesis scores
and spectrogram plots; as a script, the scores of a folder of syntheses against a folder of references.

    python evaluate.py --reference wavs/ --synthesis out/ [-o scores.json] [-c config.json]

`<name>.wav` in --reference pairs with `<name>_synthesis.wav` (what inference.py writes), else `<name>.wav`, in
--synthesis. A pair is cut to the shorter clip; a synthesis at another rate is resampled (soxr) to the reference's.

The scores (each from the field's own package, imported when first used):
- mcd_db: mel-cepstral distortion, mean over 5 ms frames of 10/ln10 * sqrt(2 * sum_{m=1..24} (c_m - c'_m)^2) dB.
  The mel-cepstrum is WORLD's (pyworld): Harvest F0, CheapTrick envelope, pyworld.code_spectral_envelope, i.e. the
  DCT of the log envelope sampled evenly on the mel scale (1127 ln(1 + f/700), 40 Hz to Nyquist; this warping
  takes the place of SPTK's all-pass alpha), scaled to SPTK's convention. Order 24, c0 (level) left out; copy
  synthesis is time-aligned, so frames are compared one to one (no DTW), all frames counted.
- f0_rmse_cents: RMS of 1200 log2(F0'/F0) over frames voiced in both (Harvest, 71-800 Hz, 5 ms frames).
- vuv_error: share of frames voiced in one and unvoiced in the other.
- mrstft: spectral convergence + log-magnitude L1, averaged over Parallel WaveGAN's three resolutions (FFT
  512/1024/2048, hop 50/120/240, Hann window 240/600/1200 samples), used unchanged at 22050 Hz as that paper's
  LJ Speech recipes do.
- pesq: wide-band PESQ (ITU-T P.862.2, pesq package) at 16 kHz; 4.64 is its ceiling, about 1.04 its floor.
- stoi: STOI (pystoi), 0 to 1.
- mel_l1: the copy-synthesis log-mel L1 (TacotronSTFT of the config) used in training and inference.py.
Lower is better for all but pesq and stoi.
"""
import argparse
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
from tqdm import tqdm

from config import REPO_CONFIG, load_config
from glow import WaveGlowLoss
from mel2samp import MAX_WAV_VALUE, AudioError, TacotronSTFT, load_wav_to_torch



@torch.no_grad()
def validation_nll(model, loader, sigma, device, amp_dtype=None):
    """Mean WaveGlow loss (NLL per sample, upstream's constant left out) over every batch of `loader`.

    Deterministic when the loader is (fixed crops or whole clips, no shuffling). Returns a float.
    """
    criterion = WaveGlowLoss(sigma)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for mel, audio in loader:
        mel, audio = mel.to(device), audio.to(device)
        cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with cast:
            loss = criterion(model((mel, audio)))
        total += loss.double() * audio.numel()
        count += audio.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("validation list produced no audio: check the validation file list")
    return (total / count).item()


# ---- copy synthesis: wav -> mel -> WaveGlow -> wav, scored by how well the output's mel matches ----

def mel_l1(reference_mel, output_mel):
    """Mean absolute difference of two log mels (n_mel, F) over their common frames; lower is better."""
    frames = min(reference_mel.size(-1), output_mel.size(-1))
    difference = reference_mel[..., :frames].double() - output_mel[..., :frames].double().to(reference_mel.device)
    return difference.abs().mean().item()


def copy_synthesis_score(stft, reference_audio, output_audio):
    """(mel L1, reference mel, output mel) for 1-D audio in [-1, 1]; `stft` is a mel2samp.TacotronSTFT.

    The output is cut to the reference's length first (WaveGlow returns whole hops), so both mels have
    the same frames and the score measures the vocoder alone.
    """
    reference_audio = reference_audio.reshape(-1).float().cpu()
    output_audio = output_audio.reshape(-1).float().cpu()[:reference_audio.numel()]
    reference_mel = stft.mel_spectrogram(reference_audio.unsqueeze(0))[0]
    output_mel = stft.mel_spectrogram(output_audio.unsqueeze(0))[0]
    return mel_l1(reference_mel, output_mel), reference_mel, output_mel


def plot_mel_comparison(reference_mel, output_mel, path, title=""):
    """A PNG with the input and the re-analysed output log mel one above the other, on one colour scale."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    reference_mel, output_mel = reference_mel.float().cpu().numpy(), output_mel.float().cpu().numpy()
    low, high = min(reference_mel.min(), output_mel.min()), max(reference_mel.max(), output_mel.max())
    figure, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for axis, mel, label in ((axes[0], reference_mel, "input"), (axes[1], output_mel, "WaveGlow output")):
        image = axis.imshow(mel, aspect="auto", origin="lower", interpolation="none", vmin=low, vmax=high)
        axis.set_ylabel(f"{label}\nmel channel")
    axes[1].set_xlabel("frame")
    figure.colorbar(image, ax=axes, label="log mel")
    if title:
        axes[0].set_title(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---- objective vocoder scores of a synthesis against its reference (1-D float audio, one sample rate) ----

SCORE_KEYS = ("mcd_db", "f0_rmse_cents", "vuv_error", "mrstft", "pesq", "stoi", "mel_l1")
SCORE_LABELS = {"mcd_db": "MCD (dB)", "f0_rmse_cents": "F0 RMSE (cents)", "vuv_error": "V/UV error",
                "mrstft": "MR-STFT", "pesq": "PESQ (wide band)", "stoi": "STOI"}  # mel_l1 keeps its older line
FRAME_PERIOD_MS = 5.0  # WORLD's analysis hop
MCEP_ORDER = 24  # mel-cepstral coefficients 1..24 enter the MCD; c0 (the frame's level) does not
MCD_CONSTANT = 10.0 / math.log(10.0) * math.sqrt(2.0)
# Parallel WaveGAN's (FFT size, hop, window) in samples; its 22.05 kHz LJ Speech recipes use them unchanged
MRSTFT_RESOLUTIONS = ((512, 50, 240), (1024, 120, 600), (2048, 240, 1200))
PESQ_RATE = 16000  # wide-band PESQ (ITU-T P.862.2) is defined at 16 kHz


class MissingPackageError(RuntimeError):
    """A score whose package is not installed."""


def _import(package, score):
    """The package a score needs, imported on first use, or an error saying what to install."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as error:
        if package == "pyworld" and error.name == "pkg_resources":
            return _pyworld_extension()
        name = package.split(".")[0]
        raise MissingPackageError(f"the {score} score needs the '{name}' package, which is not installed "
                                  f"(pip install {name}, or pip install -r requirements.txt)") from None


@functools.lru_cache(maxsize=1)
def _pyworld_extension():
    """pyworld's compiled module, loaded without the package's __init__.

    pyworld 0.3.5's __init__ only reads its own version through setuptools' pkg_resources, which setuptools 81
    removed; the compiled WORLD bindings next to it need nothing of it.
    """
    package = importlib.util.find_spec("pyworld")
    folder = list(package.submodule_search_locations or [])[:1]
    candidates = [os.path.join(folder[0], "pyworld" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
                  if folder and os.path.isfile(os.path.join(folder[0], "pyworld" + suffix))]
    if not candidates:
        raise MissingPackageError("pyworld is installed but cannot be imported: its __init__ needs pkg_resources "
                                  "(pip install 'setuptools<81') and no compiled module was found beside it")
    spec = importlib.util.spec_from_file_location("pyworld.pyworld", candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_audio(audio):
    """A tensor or array -> 1-D float64 numpy array (what WORLD, PESQ and STOI take)."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(audio, dtype=np.float64).reshape(-1))


def _common_length(reference, synthesis):
    reference, synthesis = _as_audio(reference), _as_audio(synthesis)
    length = min(reference.size, synthesis.size)
    return reference[:length], synthesis[:length]


def resample(audio, from_rate, to_rate):
    if from_rate == to_rate:
        return audio
    soxr = _import("soxr", "resampling")
    return soxr.resample(audio, from_rate, to_rate)


def world_analysis(audio, sampling_rate):
    """(F0 per 5 ms frame in Hz, 0 where unvoiced (frames,); mel-cepstrum (frames, 25)) from WORLD: Harvest's F0
    and CheapTrick's spectral envelope."""
    pyworld = _import("pyworld", "MCD/F0")
    audio = _as_audio(audio)
    f0, times = pyworld.harvest(audio, sampling_rate, frame_period=FRAME_PERIOD_MS)
    envelope = pyworld.cheaptrick(audio, f0, times, sampling_rate)  # (frames, fft/2 + 1) power
    return f0, mel_cepstrum(envelope, sampling_rate)


def mel_cepstrum(envelope, sampling_rate):
    """Power envelopes (frames, fft/2 + 1) -> mel-cepstra (frames, 25) in SPTK's convention.

    pyworld.code_spectral_envelope samples the log power envelope evenly on the mel scale (40 Hz to Nyquist) and
    takes its DCT, normalised so that ln P = c0 + sqrt(2) sum_m c_m cos(m theta); halving the log (power to
    amplitude) makes that ln|H| = c0/2 + sum_m (c_m / sqrt(2)) cos(m theta), SPTK's form, which is what the MCD
    constant assumes (c0, which the MCD leaves out, is only scaled alike).
    """
    pyworld = _import("pyworld", "MCD/F0")
    return pyworld.code_spectral_envelope(np.ascontiguousarray(envelope, dtype=np.float64), sampling_rate,
                                          MCEP_ORDER + 1) / math.sqrt(2.0)


def mel_cepstral_distortion(reference_mcep, synthesis_mcep):
    """Mean over frames of 10/ln10 * sqrt(2 * sum_{m=1..24} (c_m - c'_m)^2) in dB; frames are time-aligned."""
    frames = min(len(reference_mcep), len(synthesis_mcep))
    difference = reference_mcep[:frames, 1:] - synthesis_mcep[:frames, 1:]  # (frames, 24): c0 left out
    return float(np.mean(MCD_CONSTANT * np.sqrt(np.sum(difference ** 2, axis=1))))


def f0_rmse_cents(reference_f0, synthesis_f0):
    """RMS of 1200 log2(F0' / F0) over the frames voiced in both; NaN when there are none."""
    frames = min(len(reference_f0), len(synthesis_f0))
    reference_f0, synthesis_f0 = reference_f0[:frames], synthesis_f0[:frames]
    voiced = (reference_f0 > 0) & (synthesis_f0 > 0)
    if not voiced.any():
        return float("nan")
    cents = 1200.0 * np.log2(synthesis_f0[voiced] / reference_f0[voiced])
    return float(np.sqrt(np.mean(cents ** 2)))


def vuv_error(reference_f0, synthesis_f0):
    """Share of frames voiced in one signal and unvoiced in the other (0 to 1)."""
    frames = min(len(reference_f0), len(synthesis_f0))
    return float(np.mean((reference_f0[:frames] > 0) != (synthesis_f0[:frames] > 0)))


def world_scores(reference, synthesis, sampling_rate):
    """{mcd_db, f0_rmse_cents, vuv_error} from one WORLD analysis of each signal."""
    reference, synthesis = _common_length(reference, synthesis)
    reference_f0, reference_mcep = world_analysis(reference, sampling_rate)
    synthesis_f0, synthesis_mcep = world_analysis(synthesis, sampling_rate)
    return {"mcd_db": mel_cepstral_distortion(reference_mcep, synthesis_mcep),
            "f0_rmse_cents": f0_rmse_cents(reference_f0, synthesis_f0),
            "vuv_error": vuv_error(reference_f0, synthesis_f0)}


def multi_resolution_stft(reference, synthesis):
    """Mean over the three resolutions of spectral convergence + log-magnitude L1 (Parallel WaveGAN's loss).

    Spectral convergence: ||S| - |S'||_F / ||S||_F; log-magnitude L1: mean |ln|S| - ln|S'||, with unscaled FFT
    magnitudes floored at sqrt(1e-7) as in Parallel WaveGAN. Periodic Hann windows; frames centred on every hop
    from sample 0 (zero padding at the ends), as torch.stft(center=True, pad_mode="constant").
    """
    signal = _import("scipy.signal", "MR-STFT")
    reference, synthesis = _common_length(reference, synthesis)
    total = 0.0
    for n_fft, hop, window in MRSTFT_RESOLUTIONS:
        transform = signal.ShortTimeFFT(signal.get_window("hann", window), hop, 1.0, mfft=n_fft)
        frames = reference.size // hop + 1
        magnitudes = [np.sqrt(np.maximum(np.abs(transform.stft(audio, p0=0, p1=frames)) ** 2, 1e-7))
                      for audio in (reference, synthesis)]  # 2 x (n_fft/2 + 1, frames)
        convergence = np.linalg.norm(magnitudes[0] - magnitudes[1]) / np.linalg.norm(magnitudes[0])
        log_l1 = np.mean(np.abs(np.log(magnitudes[0]) - np.log(magnitudes[1])))
        total += convergence + log_l1
    return float(total / len(MRSTFT_RESOLUTIONS))


def pesq_wideband(reference, synthesis, sampling_rate):
    """Wide-band PESQ (MOS-LQO, about 1.04 to 4.64) at 16 kHz; NaN when PESQ finds no speech in the reference."""
    pesq = _import("pesq", "PESQ")
    reference, synthesis = _common_length(reference, synthesis)
    reference, synthesis = (resample(audio, sampling_rate, PESQ_RATE) for audio in (reference, synthesis))
    try:
        return float(pesq.pesq(PESQ_RATE, reference, synthesis, "wb"))
    except pesq.PesqError:  # no utterance found, or a clip under a quarter of a second
        return float("nan")


def stoi_score(reference, synthesis, sampling_rate):
    """Short-time objective intelligibility, 0 to 1 (pystoi resamples to its 10 kHz itself)."""
    pystoi = _import("pystoi", "STOI")
    reference, synthesis = _common_length(reference, synthesis)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(pystoi.stoi(reference, synthesis, sampling_rate, extended=False))
    # Under about 30 non-silent 25 ms frames pystoi warns and returns 1e-5, a number that is no score: undefined.
    if any("Not enough STFT frames" in str(warning.message) for warning in caught):
        return float("nan")
    return score


def vocoder_scores(reference, synthesis, sampling_rate, stft=None):
    """Every score of SCORE_KEYS for one clip (both at `sampling_rate`, cut to the shorter); mel_l1 needs the
    mel2samp.TacotronSTFT `stft` (both are brought to its rate), else it is left out. Lower is better for all but
    pesq and stoi."""
    reference, synthesis = _common_length(reference, synthesis)
    scores = world_scores(reference, synthesis, sampling_rate)
    scores["mrstft"] = multi_resolution_stft(reference, synthesis)
    scores["pesq"] = pesq_wideband(reference, synthesis, sampling_rate)
    scores["stoi"] = stoi_score(reference, synthesis, sampling_rate)
    if stft is not None:
        rate = stft.sampling_rate
        mel_reference, mel_synthesis = (torch.from_numpy(resample(audio, sampling_rate, rate))
                                        for audio in (reference, synthesis))
        scores["mel_l1"] = copy_synthesis_score(stft, mel_reference, mel_synthesis)[0]
    return scores


def require_score_packages():
    """Fail early, before a long evaluation, when a score's package is missing."""
    for package, score in (("pyworld", "MCD/F0"), ("pesq", "PESQ"), ("pystoi", "STOI"), ("scipy", "MR-STFT"),
                           ("soxr", "resampling")):
        _import(package, score)


def mean_scores(clips):
    """{key: mean over the clips where it is defined (not NaN/None)}, None where no clip has it."""
    means = {}
    for key in SCORE_KEYS:
        values = [clip[key] for clip in clips if clip.get(key) is not None and not math.isnan(clip[key])]
        if any(key in clip for clip in clips):
            means[key] = float(np.mean(values)) if values else None
    return means


def json_safe(scores):
    """NaN (undefined, e.g. no frame voiced in both) -> None, so the file is strict JSON."""
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in scores.items()}


# ---- command line: a folder of syntheses scored against a folder of references ----

def find_pairs(reference_dir, synthesis_dir):
    """([(name, reference path, synthesis path)], [reference names without a synthesis]); ValueError if none."""
    for folder, flag in ((reference_dir, "--reference"), (synthesis_dir, "--synthesis")):
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} folder {folder} does not exist")
    same_folder = os.path.samefile(reference_dir, synthesis_dir)
    names = sorted(entry[:-4] for entry in os.listdir(reference_dir) if entry.lower().endswith(".wav"))
    if same_folder:  # syntheses written next to their references are not references themselves
        names = [name for name in names if not name.endswith("_synthesis")]
    if not names:
        raise ValueError(f"no .wav files in the --reference folder {reference_dir}")
    pairs, unmatched = [], []
    for name in names:
        reference = os.path.join(reference_dir, f"{name}.wav")
        candidates = [os.path.join(synthesis_dir, f"{name}{suffix}.wav") for suffix in ("_synthesis", "")]
        found = [path for path in candidates if os.path.isfile(path) and not (same_folder and path == reference)]
        if found:
            pairs.append((name, reference, found[0]))
        else:
            unmatched.append(name)
    if not pairs:
        looked_for = ", ".join(f"{name}_synthesis.wav or {name}.wav" for name in names[:3])
        raise ValueError(f"no pairs: for the {len(names)} references in {reference_dir} looked in {synthesis_dir} "
                         f"for {looked_for}{' ...' if len(names) > 3 else ''}")
    return pairs, unmatched


def read_audio(path):
    """(1-D float64 in [-1, 1], sample rate); AudioError naming the file when it cannot be read."""
    audio, rate = load_wav_to_torch(path)
    return audio.double().numpy() / MAX_WAV_VALUE, rate


def mel_stft(config_path):
    """The TacotronSTFT of a config's data_config (the mel that mel_l1 compares); ConfigError names a bad file."""
    config = load_config(config_path)
    return TacotronSTFT.from_config(config["data_config"], config["waveglow_config"]["n_mel_channels"])


def score_pairs(pairs, stft):
    """({name: scores}, [error messages of the clips that could not be read])."""
    clips, failures = {}, []
    for name, reference_path, synthesis_path in tqdm(pairs, unit="clip", disable=len(pairs) < 2):
        try:
            reference, rate = read_audio(reference_path)
            synthesis, synthesis_rate = read_audio(synthesis_path)
        except AudioError as error:
            failures.append(str(error))
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        clips[name] = vocoder_scores(reference, resample(synthesis, synthesis_rate, rate), rate, stft)
    return clips, failures


def print_table(means, clips):
    print(f"{'score':<15}{'mean':>10}{'clips':>7}")
    for key, mean in means.items():
        defined = sum(1 for scores in clips.values() if not math.isnan(scores[key]))
        print(f"{key:<15}{'-' if mean is None else f'{mean:.4f}':>10}{defined:>7}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Score syntheses against their references: MCD, F0 RMSE, V/UV "
                                                 "error, multi-resolution STFT, PESQ, STOI and mel L1")
    parser.add_argument("--reference", required=True, help="folder of reference <name>.wav")
    parser.add_argument("--synthesis", required=True, help="folder of <name>_synthesis.wav or <name>.wav")
    parser.add_argument("-o", "--output", help="write {\"mean\": {...}, \"clips\": {name: {...}}} to this JSON file")
    parser.add_argument("-c", "--config", default=REPO_CONFIG, help="config whose mel mel_l1 compares "
                                                                       "(default: the repo's config.json)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        pairs, unmatched = find_pairs(args.reference, args.synthesis)
        if unmatched:
            print(f"note: {len(unmatched)} references have no synthesis and are left out "
                  f"({', '.join(unmatched[:3])}{' ...' if len(unmatched) > 3 else ''})", file=sys.stderr)
        stft = mel_stft(args.config)
        require_score_packages()
        clips, failures = score_pairs(pairs, stft)
        if not clips:
            raise ValueError(f"none of the {len(pairs)} pairs could be read")
        means = mean_scores(list(clips.values()))
        print_table(means, clips)
        if args.output:
            report = {"mean": means, "clips": {name: json_safe(scores) for name, scores in clips.items()}}
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            print(f"Scores of {len(clips)} clips written to {args.output}")
    except (ValueError, OSError, MissingPackageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
