"""mel2samp: the Tacotron 2 mel against a float64 reference, audio reading, file lists, bad files, crops, CLIs."""
import logging
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

import mel2samp
from conftest import REPO, speechlike, write_wav
from mel2samp import (MAX_WAV_VALUE, AudioError, Mel2Samp, TacotronSTFT, files_to_list,
                      load_wav_to_torch, make_split)

DATA_CONFIG = {"segment_length": 16000, "filter_length": 1024, "hop_length": 256, "win_length": 1024,
               "sampling_rate": 22050, "mel_fmin": 0.0, "mel_fmax": 8000.0}


def reference_log_mel(audio, n_fft=1024, hop=256, sampling_rate=22050, fmin=0.0, fmax=8000.0):
    """The TacotronSTFT definition written out in float64 numpy: audio in [-1, 1] -> (80, 1 + T // hop)."""
    audio = np.asarray(audio, dtype=np.float64)
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    n_frames = 1 + len(audio) // hop
    frames = padded[np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]]
    periodic_hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    magnitude = np.abs(np.fft.rfft(frames * periodic_hann, axis=1)).T
    mel_filters = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=80, fmin=fmin, fmax=fmax,
                                      dtype=np.float64)
    return np.log(np.maximum(mel_filters @ magnitude, 1e-5))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees mel2samp's once-per-process warnings afresh."""
    monkeypatch.setattr(mel2samp, "_already_warned", set())


def dataset(files, **options):
    return Mel2Samp(files, **{**DATA_CONFIG, **options})


def int16_scale(signal):
    return np.round(np.clip(signal, -1, 32767 / 32768) * MAX_WAV_VALUE)


# ---- the mel ----

def test_reference_agrees_with_librosa_stft():
    # guards the hand-written reference itself: librosa's centred, reflect-padded, periodic-Hann |STFT|
    audio = speechlike(0.5)
    magnitude = np.abs(librosa.stft(audio, n_fft=1024, hop_length=256, window="hann", center=True,
                                    pad_mode="reflect"))
    mel = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000, dtype=np.float64) @ magnitude
    np.testing.assert_allclose(reference_log_mel(audio), np.log(np.maximum(mel, 1e-5)), atol=1e-6)


def test_mel_matches_reference_on_real_speech(lj_sample):
    mel2samp = dataset(lj_sample)
    for path in sorted((lj_sample / "wavs").glob("*.wav"))[:4]:
        int16_audio, _ = sf.read(str(path), dtype="int16")
        audio, rate = load_wav_to_torch(path)
        assert rate == 22050
        mel = mel2samp.get_mel(audio)
        assert mel.dtype == torch.float32 and mel.shape == (80, 1 + len(int16_audio) // 256)
        expected = reference_log_mel(int16_audio / 32768.0)
        assert np.abs(mel.numpy() - expected).max() < 1e-4, path.name


t = np.arange(22050 + 77) / 22050  # not a whole number of hops
MADE_UP = {
    "silence": np.zeros_like(t),
    "full_scale_sine": int16_scale(np.sin(2 * np.pi * 440 * t)),
    "clipped": int16_scale(np.clip(3 * np.sin(2 * np.pi * 180 * t), -1, 1)),
    "white_noise": int16_scale(np.random.default_rng(0).standard_normal(len(t)) * 0.3),
}


@pytest.mark.parametrize("name", sorted(MADE_UP))
def test_mel_matches_reference_on_made_up_signals(name):
    int16_audio = MADE_UP[name]
    mel = dataset(["unused.wav"], skip_bad_files=False).get_mel(torch.tensor(int16_audio, dtype=torch.float32))
    expected = reference_log_mel(int16_audio / 32768.0)
    assert mel.shape == expected.shape == (80, 1 + len(int16_audio) // 256)
    assert np.abs(mel.numpy() - expected).max() < 1e-4
    if name == "silence":
        assert torch.all(mel == torch.log(torch.tensor(1e-5)))


def test_stft_is_batched_and_keeps_float32_for_low_precision_input():
    stft = TacotronSTFT()
    batch = torch.tensor(np.stack([speechlike(0.3, seed=1), speechlike(0.3, seed=2)]), dtype=torch.float32)
    mels = stft.mel_spectrogram(batch)
    assert mels.shape == (2, 80, 1 + batch.shape[1] // 256)
    assert torch.allclose(mels[1], stft.mel_spectrogram(batch[1:]).squeeze(0))
    half = stft.mel_spectrogram(batch.to(torch.bfloat16))
    assert half.dtype == torch.float32 and half.shape == mels.shape
    assert stft.mel_spectrogram(batch.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="too short"):
        stft.mel_spectrogram(batch[:, :300])


def test_item_shapes_for_default_config(lj_corpus):
    mel, audio = dataset(lj_corpus)[0]
    assert mel.shape == (80, 63) and audio.shape == (16000,)
    assert audio.abs().max() <= 1.0 and mel.dtype == audio.dtype == torch.float32


# ---- reading audio ----

@pytest.mark.parametrize("subtype,extension", [("PCM_16", "wav"), ("PCM_24", "wav"), ("PCM_32", "wav"),
                                               ("FLOAT", "wav"), ("PCM_16", "flac"), ("PCM_24", "flac")])
def test_formats_read_at_int16_scale(tmp_path, subtype, extension):
    signal = speechlike(0.2)
    path = write_wav(tmp_path / f"clip.{extension}", signal, subtype=subtype)
    audio, rate = load_wav_to_torch(path, sampling_rate=22050)
    assert rate == 22050 and audio.dtype == torch.float32 and audio.shape == (len(signal),)
    if subtype == "PCM_16":  # exactly the int16 sample values, as upstream's scipy reader gave
        assert torch.equal(audio, torch.from_numpy(sf.read(str(path), dtype="int16")[0].astype(np.float32)))
    if subtype in ("PCM_16", "PCM_24"):  # integer samples land exactly on the int16 scale (24-bit: in 1/256 steps)
        assert torch.equal(audio.double(), torch.from_numpy(sf.read(str(path), dtype="int32")[0] / 65536.0))
    bits = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32}[subtype]
    assert np.abs(audio.numpy() - signal * MAX_WAV_VALUE).max() <= 32768 / 2 ** (bits - 1) + 1e-3


def test_stereo_is_mixed_down_with_a_warning(tmp_path, caplog):
    left, right = speechlike(0.2, seed=1), speechlike(0.2, seed=2)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="mel2samp"):
        audio, _ = load_wav_to_torch(path)
    assert audio.shape == (len(left),)
    np.testing.assert_allclose(audio.numpy(), (left + right) / 2 * MAX_WAV_VALUE, atol=0.01)
    assert "stereo.wav" in caplog.text and "mono" in caplog.text
    caplog.clear()  # a corpus of stereo files warns once, not once per file
    with caplog.at_level(logging.WARNING, logger="mel2samp"):
        load_wav_to_torch(write_wav(tmp_path / "stereo2.wav", np.stack([left, left], axis=1)))
    assert caplog.text == ""


def test_wrong_rate_is_resampled_with_a_warning_or_refused(tmp_path, caplog):
    path = write_wav(tmp_path / "sixteen_k.wav", speechlike(0.5, 16000), 16000)
    with caplog.at_level(logging.WARNING, logger="mel2samp"):
        audio, rate = load_wav_to_torch(path, sampling_rate=22050)
    assert rate == 22050 and abs(audio.numel() - 11025) <= 1
    assert "sixteen_k.wav" in caplog.text and "resampling 16000 Hz audio to 22050 Hz" in caplog.text
    # the resampled signal is the same sound: a 440 Hz tone stays at 440 Hz
    tone = write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    resampled, _ = load_wav_to_torch(tone, sampling_rate=22050)
    peak_hz = np.argmax(np.abs(np.fft.rfft(resampled.numpy()))) * 22050 / resampled.numel()
    assert abs(peak_hz - 440) < 2
    with pytest.raises(AudioError, match=r"sixteen_k\.wav.*16000 Hz.*22050 Hz"):
        load_wav_to_torch(path, sampling_rate=22050, resample=False)
    with pytest.raises(AudioError, match=r"1 files are not at 22050 Hz.*sixteen_k\.wav \(16000 Hz\)"):
        dataset([str(path)], resample=False)
    with pytest.raises(AudioError, match="sample rate"):
        dataset([str(path)], resample=False, skip_bad_files=False)[0]


def make_bad_files(folder):
    """Every kind of unusable file, each under a name that says what is wrong with it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero_bytes.wav").write_bytes(b"")
    (folder / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    write_wav(folder / "no_samples.wav", np.zeros(0))
    write_wav(folder / "too_short.wav", np.zeros(100))
    nan_audio = speechlike(0.2)
    nan_audio[500] = np.nan
    write_wav(folder / "has_nan.wav", nan_audio, subtype="FLOAT")
    return {"missing": folder / "missing.wav", "zero_bytes": folder / "zero_bytes.wav",
            "corrupt": folder / "corrupt.wav", "no_samples": folder / "no_samples.wav",
            "too_short": folder / "too_short.wav", "has_nan": folder / "has_nan.wav"}


@pytest.mark.parametrize("kind,problem", [("missing", "not found"), ("zero_bytes", "empty"),
                                          ("corrupt", "cannot read"), ("no_samples", "no samples"),
                                          ("too_short", "shorter than one hop"), ("has_nan", "NaN")])
def test_each_bad_file_raises_audio_error_naming_it(tmp_path, kind, problem):
    path = make_bad_files(tmp_path)[kind]
    with pytest.raises(AudioError, match=problem) as caught:
        dataset([str(path)], skip_bad_files=False)[0]
    assert caught.value.path == str(path) and str(path) in str(caught.value)


def test_bad_files_are_skipped_and_counted(tmp_path, lj_corpus, caplog):
    bad = make_bad_files(tmp_path / "bad")
    good = files_to_list(lj_corpus)[:3]
    listed = good[:1] + [str(p) for p in bad.values()] + good[1:]
    with caplog.at_level(logging.WARNING, logger="mel2samp"):
        data = dataset(listed, segment_length=4096)
    # the header check catches all but the NaN file, which only reading reveals
    assert len(data) == 4 and data.skipped == 5
    assert "5 of 9" in caplog.text and "missing.wav" in caplog.text
    nan_index = data.audio_files.index(str(bad["has_nan"]))
    mel, audio = data[nan_index]  # replaced by the next file
    assert data.skipped == 6 and audio.shape == (4096,) and audio.abs().max() > 0
    assert data.audio_files[nan_index + 1] == good[1]
    data[nan_index]
    assert data.skipped == 6  # a file counts once, however often it is drawn

    # failures inside DataLoader workers are counted in the parent's dataset too
    fresh = dataset(listed, segment_length=4096)
    loader = torch.utils.data.DataLoader(fresh, batch_size=1, num_workers=2)
    assert sum(1 for _ in loader) == 4 and fresh.skipped == 6

    with pytest.raises(AudioError, match="5 of 9"):
        dataset(listed, strict=True)
    with pytest.raises(AudioError, match="NaN"):
        dataset([str(bad["has_nan"])] + good, strict=True)[0]


# ---- file lists ----

def test_file_list_forms_and_relative_paths(tmp_path, lj_corpus, monkeypatch):
    expected = [str(lj_corpus / "wavs" / f"LJ001-{i:04d}.wav") for i in range(1, 13)]
    assert files_to_list(lj_corpus) == expected
    assert files_to_list(lj_corpus / "metadata.csv") == expected

    plain = lj_corpus / "plain.txt"  # relative to the list's own folder, blank lines ignored
    plain.write_text("wavs/LJ001-0001.wav\n\n  \nwavs/LJ001-0002.wav\n")
    assert files_to_list(plain) == expected[:2]
    tacotron = tmp_path / "filelists" / "train.txt"  # path|text lines, relative to a given data root
    tacotron.parent.mkdir()
    tacotron.write_text("LJ001-0003.wav|some words.\nLJ001-0004.wav|more words.\n\n")
    assert files_to_list(tacotron, data_root=lj_corpus / "wavs") == expected[2:4]
    absolute = tmp_path / "absolute.txt"
    absolute.write_text(f"{expected[5]}|text\n")
    assert files_to_list(absolute) == [expected[5]]
    cwd_relative = tmp_path / "filelists" / "cwd.txt"  # upstream's lists were relative to the working directory
    cwd_relative.write_text("wavs/LJ001-0005.wav\n")
    monkeypatch.chdir(lj_corpus)
    assert files_to_list(cwd_relative) == [expected[4]]

    loose = tmp_path / "loose"  # a plain folder of audio files
    for name in ("b.wav", "a.flac", "notes.txt"):
        (loose / name).parent.mkdir(exist_ok=True)
        (loose / name).write_bytes(b"")
    assert files_to_list(loose) == [str(loose / "a.flac"), str(loose / "b.wav")]
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        files_to_list(tmp_path / "nowhere.txt")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        files_to_list(tmp_path / "blank.txt")


# ---- crops ----

def test_short_clips_are_zero_padded_at_the_end(tmp_path):
    path = write_wav(tmp_path / "short.wav", speechlike(0.3))
    mel, audio = dataset([str(path)])[0]
    n = int(0.3 * 22050)
    assert audio.shape == (16000,) and torch.all(audio[n:] == 0) and audio[:n].abs().max() > 0.1
    assert mel.shape == (80, 63)


def test_validation_crops_are_fixed(lj_corpus):
    val = dataset(lj_corpus, segment_length=4096, deterministic=True)
    first = [val[i][1] for i in range(4)]
    val.set_epoch(7)
    again = dataset(lj_corpus, segment_length=4096, deterministic=True, rank=3)
    for i in range(4):
        assert torch.equal(first[i], val[i][1]) and torch.equal(first[i], again[i][1])
    starts = []
    for i in range(4):  # each crop is a true stretch of its clip, and not always its beginning
        windows = (load_wav_to_torch(val.audio_files[i])[0] / MAX_WAV_VALUE).unfold(0, 4096, 1)
        starts.append(int(torch.all(windows == first[i], dim=1).nonzero()[0]))
    assert any(start > 0 for start in starts)


def test_training_crops_depend_on_seed_rank_epoch_and_reproduce(lj_corpus):
    def crops(rank=0, epoch=0, seed=1234, workers=0):
        data = dataset(lj_corpus, segment_length=4096, seed=seed, rank=rank)
        data.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=workers)
        return torch.cat([audio for _, audio in loader])

    base = crops()
    assert torch.equal(base, crops())  # a fresh dataset (a resumed run) sees the same crops
    assert torch.equal(base, crops(workers=2))  # whatever the worker count
    for other in (crops(rank=1), crops(epoch=1), crops(seed=99)):
        differing = sum(not torch.equal(a, b) for a, b in zip(base, other, strict=True))
        assert differing >= 9  # of 12 clips; a few may draw the same start by chance


# ---- command lines ----

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "mel2samp.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_writes_whole_file_mels_and_reports_bad_files(tmp_path, lj_corpus):
    good = files_to_list(lj_corpus)[:3]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wav file")
    write_wav(tmp_path / "long.wav", speechlike(1.3))
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(good[:2] + [str(corrupt), "long.wav", good[2]]) + "\n")
    out = tmp_path / "mels"
    result = run_cli("-f", listed, "-o", out, "-c", REPO / "config.json", "-j", "2")
    assert result.returncode != 0
    assert "corrupt.wav" in result.stderr and "1 files failed" in result.stderr
    written = sorted(os.listdir(out))  # nothing else: no temporary files left behind
    assert written == sorted([os.path.basename(p) + ".pt" for p in good] + ["long.wav.pt"])
    stft_reference = dataset(good)
    for path in good + [str(tmp_path / "long.wav")]:
        mel = torch.load(out / (os.path.basename(path) + ".pt"), weights_only=True)
        audio, _ = load_wav_to_torch(path)
        assert mel.dtype == torch.float32 and mel.shape == (80, 1 + audio.numel() // 256)
        assert torch.equal(mel, stft_reference.get_mel(audio))


def test_make_split_function_and_cli(tmp_path, lj_corpus, monkeypatch):
    before = sorted(p.name for p in lj_corpus.rglob("*"))
    monkeypatch.chdir(tmp_path)  # relative arguments still give absolute paths in the lists
    train, test = make_split(lj_corpus.name, "lists", n_test=10)
    assert train == str(tmp_path / "lists" / "train_files.txt")
    assert os.path.basename(train) == "train_files.txt" and os.path.basename(test) == "test_files.txt"
    wavs = sorted(str(p) for p in (lj_corpus / "wavs").glob("*.wav"))
    assert open(test).read().split() == wavs[:10] and open(train).read().split() == wavs[10:]
    assert sorted(p.name for p in lj_corpus.rglob("*")) == before  # nothing written into the data
    with pytest.raises(ValueError, match="outside"):
        make_split(lj_corpus, lj_corpus / "lists")
    with pytest.raises(ValueError, match="12 audio files"):
        make_split(lj_corpus, tmp_path / "lists", n_test=12)

    result = run_cli("--make_split", lj_corpus / "wavs", "-o", tmp_path / "cli", "--n_test", "3")
    assert result.returncode == 0, result.stderr
    assert open(tmp_path / "cli" / "test_files.txt").read().split() == wavs[:3]
    assert open(tmp_path / "cli" / "train_files.txt").read().split() == wavs[3:]
    refused = run_cli("--make_split", lj_corpus, "-o", lj_corpus / "wavs")
    assert refused.returncode != 0 and "outside" in refused.stderr
