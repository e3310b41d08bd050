"""Make a small speech-like corpus in LJ-Speech layout, so the demo and tests need no download.

    python demo/make_demo_corpus.py -o demo_output/corpus [--n_clips 40] [--seconds 2.0] [--seed 0]
                                    [--source auto|synthetic|espeak]

'synthetic' builds each clip with a source-filter model: a glottal pulse train whose pitch glides and
wobbles (vibrato) goes through four formant resonators that move between vowel targets; fricative-like
high-passed noise bursts and silences sit between the voiced stretches. It is seeded, so the same
arguments give the same bytes. 'espeak' speaks random sentences with espeak-ng instead (real, if robotic,
speech); 'auto' uses espeak-ng when it is installed and the synthetic voice otherwise.
Output: DIR/wavs/DEMO001-NNNN.wav (22050 Hz, mono, 16-bit PCM) and DIR/metadata.csv (id|text|text).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import butter, lfilter, sosfilt

SAMPLING_RATE = 22050
F0_RANGE = (85.0, 260.0)  # every voiced sample's pitch lies in here
BLOCK = 64  # resonator coefficients are updated every BLOCK samples (2.9 ms), smooth enough for formants

# (F1, F2, F3, F4) in Hz and bandwidths, roughly an adult speaker's vowels.
VOWELS = {
    "a": (730, 1090, 2440, 3400),
    "e": (530, 1840, 2480, 3500),
    "i": (270, 2290, 3010, 3700),
    "o": (570, 840, 2410, 3300),
    "u": (300, 870, 2240, 3300),
}
FORMANT_BANDWIDTHS = (80, 100, 140, 200)
FRICATIVES = {"s": (4000, 9000), "sh": (2200, 6500), "f": (1500, 9500)}


def glottal_source(f0, rng):
    """Band-limited pulse train following the pitch track f0 (Hz per sample), ~-6 dB/octave like
    a glottal flow derivative after lip radiation, with a little jitter and aspiration noise."""
    jitter = 1 + 0.004 * np.cumsum(rng.standard_normal(len(f0))) / np.sqrt(np.arange(1, len(f0) + 1))
    phase = 2 * np.pi * np.cumsum(f0 * jitter) / SAMPLING_RATE
    source = np.zeros(len(f0))
    for harmonic in range(1, int(0.45 * SAMPLING_RATE / F0_RANGE[0]) + 1):
        audible = harmonic * f0 < 0.45 * SAMPLING_RATE  # no aliasing when the pitch rises
        source += audible * np.sin(harmonic * phase) / harmonic
    return source + 0.02 * rng.standard_normal(len(f0))


def resonator_coefficients(frequency, bandwidth):
    radius = np.exp(-np.pi * bandwidth / SAMPLING_RATE)
    theta = 2 * np.pi * frequency / SAMPLING_RATE
    a = [1.0, -2 * radius * np.cos(theta), radius * radius]
    return [sum(a)], a  # unit gain at DC, so the formants shape the spectrum without blowing it up


def formant_filter(signal, formant_tracks):
    """Cascade of time-varying two-pole resonators, one per formant track (Hz per sample)."""
    out = signal
    for track, bandwidth in zip(formant_tracks, FORMANT_BANDWIDTHS, strict=True):
        filtered = np.empty_like(out)
        state = np.zeros(2)
        for start in range(0, len(out), BLOCK):
            b, a = resonator_coefficients(track[start], bandwidth)
            filtered[start:start + BLOCK], state = lfilter(b, a, out[start:start + BLOCK], zi=state)
        out = filtered
    return out


def envelope(n, attack, release):
    """Raised-cosine fade in and out, so segments start and end without clicks."""
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    env[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, attack))
    env[n - release:] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, release))
    return env


def synthetic_clip(seconds, rng):
    """One utterance of vowel-like syllables. Returns (audio float64 in [-1, 1], labels, pitch track
    in Hz per sample (0 where unvoiced), list of (start, end) voiced sample ranges)."""
    n = int(seconds * SAMPLING_RATE)
    audio, pitch = np.zeros(n), np.zeros(n)
    voiced_ranges, labels = [], []
    base_f0 = rng.uniform(110, 170)
    t = np.arange(n) / SAMPLING_RATE
    # The utterance's intonation: slow declination plus a vibrato of 4-6 Hz.
    contour = base_f0 * (1.15 - 0.25 * t / seconds) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
    position = int(rng.uniform(0.05, 0.15) * SAMPLING_RATE)  # leading silence
    while position < n - int(0.2 * SAMPLING_RATE):
        if rng.random() < 0.5:  # a fricative before the vowel
            kind = rng.choice(sorted(FRICATIVES))
            length = int(rng.uniform(0.06, 0.14) * SAMPLING_RATE)
            low, high = FRICATIVES[kind]
            band = butter(4, [low, min(high, 0.48 * SAMPLING_RATE)], btype="bandpass", fs=SAMPLING_RATE, output="sos")
            noise = sosfilt(band, rng.standard_normal(length)) * envelope(length, length // 3, length // 3)
            audio[position:position + length] += 0.15 * noise / np.max(np.abs(noise))
            labels.append(str(kind))
            position += length
        length = min(int(rng.uniform(0.15, 0.4) * SAMPLING_RATE), n - position - int(0.05 * SAMPLING_RATE))
        if length < BLOCK * 4:
            break
        start_vowel, end_vowel = rng.choice(sorted(VOWELS), size=2)
        glide = np.linspace(0, 1, length) ** 2  # an accent: the pitch rises or falls through the vowel
        f0 = contour[position:position + length] * (1 + rng.uniform(-0.2, 0.25) * glide)
        f0 = np.clip(f0, F0_RANGE[0] + 5, F0_RANGE[1] - 5)
        blend = 0.5 - 0.5 * np.cos(np.pi * np.linspace(0, 1, length))  # diphthong: one vowel into the next
        tracks = [(1 - blend) * f_start + blend * f_end
                  for f_start, f_end in zip(VOWELS[start_vowel], VOWELS[end_vowel], strict=True)]
        voiced = formant_filter(glottal_source(f0, rng), tracks)
        voiced *= envelope(length, int(0.03 * SAMPLING_RATE), int(0.05 * SAMPLING_RATE))
        audio[position:position + length] += rng.uniform(0.5, 1.0) * voiced / np.max(np.abs(voiced))
        pitch[position:position + length] = f0
        voiced_ranges.append((position, position + length))
        labels.append(f"{start_vowel}{end_vowel}")
        position += length + int(rng.uniform(0.03, 0.2) * SAMPLING_RATE)  # pause between syllables
    audio = 0.7 * audio / max(np.max(np.abs(audio)), 1e-9)
    audio += 3e-4 * rng.standard_normal(n)  # a recording's noise floor (about -70 dBFS), not digital zero
    return audio, labels, pitch, voiced_ranges


def estimate_pitch(frame, low=60.0, high=400.0):
    """(F0 in Hz, periodicity 0..1) of a frame: the highest normalised autocorrelation peak between
    1/high and 1/low seconds, refined by a parabola through its neighbours. Used to check the corpus
    and the demo's synthesis."""
    frame = frame - frame.mean()
    corr = np.correlate(frame, frame, mode="full")[len(frame) - 1:]
    lag_min, lag_max = int(SAMPLING_RATE / high), int(SAMPLING_RATE / low)
    lag = lag_min + int(np.argmax(corr[lag_min:lag_max]))
    left, centre, right = corr[lag - 1], corr[lag], corr[lag + 1]
    curvature = left - 2 * centre + right
    refined = lag + (0.5 * (left - right) / curvature if curvature < 0 else 0.0)
    return SAMPLING_RATE / refined, float(centre / max(corr[0], 1e-12))


WORDS = ("the waves of sound fold back into a quiet voice while seven small boats drift past "
         "an old harbour light and every listener hears the pitch rise and fall").split()


def espeak_clip(seconds, rng, workdir):
    """Random words spoken by espeak-ng, resampled to 22050 Hz. Returns (audio, text)."""
    import soxr
    text = " ".join(rng.choice(WORDS, size=max(2, int(2.5 * seconds))))
    wav = Path(workdir) / "espeak.wav"
    speed = int(rng.integers(140, 190))
    pitch = int(rng.integers(30, 70))
    subprocess.run(["espeak-ng", "-w", str(wav), "-s", str(speed), "-p", str(pitch), text],
                   check=True, capture_output=True)
    audio, rate = sf.read(str(wav), dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLING_RATE:
        audio = soxr.resample(audio, rate, SAMPLING_RATE)
    return 0.7 * audio / max(np.max(np.abs(audio)), 1e-9), text


def make_corpus(out_dir, n_clips=40, seconds=2.0, seed=0, source="auto"):
    """Write the corpus into out_dir; returns the list of wav paths. Same arguments, same bytes
    (for the synthetic source)."""
    if source == "auto":
        source = "espeak" if shutil.which("espeak-ng") else "synthetic"
    if source == "espeak" and not shutil.which("espeak-ng"):
        raise RuntimeError("--source espeak needs the espeak-ng program on PATH "
                           "(e.g. apt-get install espeak-ng), or use --source synthetic")
    out_dir = Path(out_dir)
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    paths, metadata = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for index in range(n_clips):
            rng = np.random.default_rng([seed, index])  # each clip on its own stream: stable if n_clips changes
            if source == "espeak":
                audio, text = espeak_clip(seconds, rng, workdir)
            else:
                audio, labels, _, _ = synthetic_clip(seconds, rng)
                text = " ".join(labels)
            name = f"DEMO001-{index + 1:04d}"
            path = out_dir / "wavs" / f"{name}.wav"
            sf.write(str(path), audio, SAMPLING_RATE, subtype="PCM_16")
            paths.append(path)
            metadata.append(f"{name}|{text}|{text}")
    (out_dir / "metadata.csv").write_text("\n".join(metadata) + "\n")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output_dir", required=True, help="corpus folder to create (LJ-Speech layout)")
    parser.add_argument("--n_clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each synthetic clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("auto", "synthetic", "espeak"), default="auto")
    args = parser.parse_args(argv)
    if args.n_clips < 1 or args.seconds < 0.5:
        parser.error("--n_clips must be at least 1 and --seconds at least 0.5")
    try:
        paths = make_corpus(args.output_dir, args.n_clips, args.seconds, args.seed, args.source)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        sys.exit(f"make_demo_corpus.py: {error}")
    print(f"wrote {len(paths)} clips to {Path(args.output_dir) / 'wavs'} and its metadata.csv")


if __name__ == "__main__":
    main()
