"""The demo corpus maker: layout, format, determinism, and that its clips sound like what they claim."""
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO

sys.path.insert(0, str(REPO / "demo"))  # the demo's scripts import each other from their own folder
import make_demo_corpus as demo  # noqa: E402

SR = demo.SAMPLING_RATE


def spectral_centroid(segment):
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    freqs = np.fft.rfftfreq(len(segment), 1 / SR)
    return float(np.sum(freqs * spectrum) / np.sum(spectrum))


def test_layout_format_and_determinism(tmp_path):
    first = demo.make_corpus(tmp_path / "a", n_clips=3, seconds=1.0, seed=7, source="synthetic")
    again = demo.make_corpus(tmp_path / "b", n_clips=3, seconds=1.0, seed=7, source="synthetic")
    other = demo.make_corpus(tmp_path / "c", n_clips=3, seconds=1.0, seed=8, source="synthetic")
    assert [p.name for p in first] == ["DEMO001-0001.wav", "DEMO001-0002.wav", "DEMO001-0003.wav"]
    assert all(p.parent == tmp_path / "a" / "wavs" for p in first)
    for a, b, c in zip(first, again, other, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()
    rows = (tmp_path / "a" / "metadata.csv").read_text().splitlines()
    assert [row.split("|")[0] for row in rows] == ["DEMO001-0001", "DEMO001-0002", "DEMO001-0003"]
    assert all(len(row.split("|")) == 3 and row.split("|")[1] for row in rows)
    for path in first:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", SR)
        audio, _ = sf.read(str(path))
        rms = np.sqrt(np.mean(audio ** 2))
        assert 0.03 < rms < 0.5 and 0.5 < np.max(np.abs(audio)) <= 0.75


def test_voiced_pitch_matches_the_intended_track_and_range():
    measured_any = 0
    for index in range(4):
        audio, labels, pitch, voiced = demo.synthetic_clip(2.0, np.random.default_rng([0, index]))
        assert voiced and labels
        assert np.all((pitch == 0) | ((pitch >= demo.F0_RANGE[0]) & (pitch <= demo.F0_RANGE[1])))
        for start, end in voiced:
            if end - start < 0.12 * SR:
                continue
            middle = (start + end) // 2
            frame = audio[middle - 441:middle + 441]  # 40 ms
            f0, periodicity = demo.estimate_pitch(frame)
            assert periodicity > 0.5
            assert demo.F0_RANGE[0] <= f0 <= demo.F0_RANGE[1]
            assert abs(f0 - pitch[middle]) / pitch[middle] < 0.04, (index, start, f0, pitch[middle])
            measured_any += 1
    assert measured_any >= 8


def test_pitch_moves_and_fricatives_are_high_frequency():
    audio, labels, pitch, voiced = demo.synthetic_clip(2.0, np.random.default_rng([0, 2]))
    voiced_pitch = pitch[pitch > 0]
    assert voiced_pitch.max() / voiced_pitch.min() > 1.1  # glides and vibrato, not a monotone
    is_voiced = np.zeros(len(audio), bool)
    for start, end in voiced:
        is_voiced[start:end] = True
        assert spectral_centroid(audio[start:end]) < 2000
    loud_unvoiced = (~is_voiced) & (np.abs(audio) > 0.02)
    assert any(label in demo.FRICATIVES for label in labels) and loud_unvoiced.sum() > 0.03 * SR
    assert spectral_centroid(audio[loud_unvoiced]) > 3000
    quiet = np.abs(audio[~is_voiced & ~loud_unvoiced])
    assert 0 < quiet.mean() < 0.005  # silences carry only a faint noise floor


def test_cli_writes_corpus_and_refuses_missing_espeak(tmp_path):
    cli = [sys.executable, str(REPO / "demo" / "make_demo_corpus.py")]
    done = subprocess.run(cli + ["-o", str(tmp_path / "c"), "--n_clips", "2", "--seconds", "0.5",
                                 "--source", "synthetic"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "c" / "wavs").glob("*.wav"))) == 2
    empty = tmp_path / "empty_path"
    empty.mkdir()
    failed = subprocess.run(cli + ["-o", str(tmp_path / "d"), "--source", "espeak"], capture_output=True,
                            text=True, env={**os.environ, "PATH": str(empty)})
    assert failed.returncode != 0 and "espeak-ng" in failed.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell-script stand-in for espeak-ng")
def test_espeak_source_is_resampled_to_22050(tmp_path, monkeypatch):
    # A stand-in espeak-ng that writes 0.5 s of 16 kHz tone to the file named after -w.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text(f"#!{sys.executable}\n"
                    "import sys, numpy as np, soundfile as sf\n"
                    "path = sys.argv[sys.argv.index('-w') + 1]\n"
                    "t = np.arange(8000) / 16000\n"
                    "sf.write(path, 0.3 * np.sin(2 * np.pi * 200 * t), 16000, subtype='PCM_16')\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    paths = demo.make_corpus(tmp_path / "corpus", n_clips=2, seconds=1.0, seed=0, source="auto")
    audio, rate = sf.read(str(paths[0]))
    assert rate == SR and abs(len(audio) - SR // 2) <= 2
    assert abs(demo.estimate_pitch(audio[2000:3000])[0] - 200) < 4
    assert len((tmp_path / "corpus" / "metadata.csv").read_text().split("\n")[0].split("|")[1].split()) >= 2
