"""Mels given beside the audio (`clip.wav|clip.npy` list lines): aligned crops, file forms, layout errors,
bad files, and training on them end to end."""
import contextlib
import io
import json
import logging
import re

import numpy as np
import pytest
import torch

import mel2samp
import train
from conftest import TINY_WAVEGLOW, speechlike, write_wav
from mel2samp import MAX_WAV_VALUE, SILENT_LOG_MEL, AudioError, Mel2Samp, TacotronSTFT, list_entries

HOP, SEGMENT = 256, 4096
DATA_CONFIG = {"segment_length": SEGMENT, "filter_length": 1024, "hop_length": HOP, "win_length": 1024,
               "sampling_rate": 22050, "mel_fmin": 0.0, "mel_fmax": 8000.0}
STFT = TacotronSTFT(1024, HOP, 1024, 80, 22050, 0.0, 8000.0)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(mel2samp, "_already_warned", set())


def whole_mel(wav):
    audio = mel2samp.load_wav_to_torch(str(wav))[0] / MAX_WAV_VALUE
    return STFT.mel_spectrogram(audio.unsqueeze(0)).squeeze(0), audio


def make_clips(folder, seconds=(0.6, 0.45, 0.8)):
    """Speech-like wavs and their whole-file mels as .npy (80, frames), as an acoustic model would save them."""
    clips = []
    for i, length in enumerate(seconds):
        wav = write_wav(folder / "wavs" / f"clip{i}.wav", speechlike(length, f0=110 + 20 * i, seed=i))
        mel, _ = whole_mel(wav)
        mel_path = folder / "mels" / f"clip{i}.npy"
        mel_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(mel_path, mel.numpy())
        clips.append((wav, mel_path))
    return clips


def dataset(files, **options):
    return Mel2Samp(files, **{**DATA_CONFIG, **options})


def test_given_mel_crops_line_up_with_the_audio_as_the_computed_mel_does(tmp_path):
    clips = make_clips(tmp_path)
    (tmp_path / "list.txt").write_text("".join(f"wavs/{w.name}|mels/{m.name}\n" for w, m in clips))
    given = dataset(str(tmp_path / "list.txt"))
    computed = dataset([str(w) for w, _ in clips])
    frames = 1 + SEGMENT // HOP
    for epoch in range(3):
        given.set_epoch(epoch)
        for index, (wav, _) in enumerate(clips):
            mel, audio = given[index]
            reference_mel, _ = computed[index]
            assert mel.shape == reference_mel.shape == (80, frames) and mel.dtype == torch.float32
            full_mel, full_audio = whole_mel(wav)
            starts = [s for s in range(0, full_audio.numel() - SEGMENT + 1, HOP)
                      if torch.equal(full_audio[s:s + SEGMENT], audio)]
            assert len(starts) == 1, "the audio crop starts on a frame boundary"
            first = starts[0] // HOP
            assert torch.equal(mel, full_mel[:, first:first + frames])
            # frames whose window lies inside the crop are the computed mel's of the same crop: the same frames
            inner = slice(2, frames - 2)
            assert torch.allclose(mel[:, inner], given.get_mel(audio * MAX_WAV_VALUE)[:, inner], atol=2e-4)
    # crops still vary with the epoch and stay fixed for validation
    given.set_epoch(0)
    first_epoch = given[2][1]
    given.set_epoch(1)
    assert not torch.equal(given[2][1], first_epoch)
    fixed = dataset(str(tmp_path / "list.txt"), deterministic=True)
    fixed.set_epoch(5)
    assert torch.equal(fixed[2][0], dataset(str(tmp_path / "list.txt"), deterministic=True)[2][0])


def test_pt_files_and_a_leading_batch_axis_are_accepted(tmp_path):
    (wav, _), = make_clips(tmp_path, seconds=(0.5,))
    mel, _ = whole_mel(wav)
    torch.save(mel.unsqueeze(0).double(), tmp_path / "batched.pt")  # (1, 80, F), float64
    np.save(tmp_path / "batched.npy", mel.unsqueeze(0).numpy())
    cli_output = tmp_path / "cli"  # what `python mel2samp.py -f LIST -o cli/` writes: clip0.wav.pt
    cli_output.mkdir()
    mel2samp._init_worker(STFT, True)
    assert mel2samp._mel_file(str(wav), str(cli_output)) == (str(wav), None)
    for mel_file in (tmp_path / "batched.pt", tmp_path / "batched.npy", cli_output / "clip0.wav.pt"):
        data = dataset([(str(wav), str(mel_file))], deterministic=True)
        given_mel, audio = data[0]
        assert given_mel.shape == (80, 17) and given_mel.dtype == torch.float32
        assert torch.allclose(given_mel, dataset([(str(wav), str(tmp_path / "mels" / "clip0.npy"))],
                                                 deterministic=True)[0][0])


def test_tacotron_text_lines_keep_working_and_mel_paths_resolve_like_audio(tmp_path, monkeypatch):
    clips = make_clips(tmp_path, seconds=(0.3, 0.3))
    (tmp_path / "tacotron.txt").write_text("wavs/clip0.wav|Printing, in the only sense.\n"
                                           "wavs/clip1.wav|It ends in .npy but has words.\n"
                                           "wavs/clip1.wav|mels/clip1.npy|a transcript after the mel\n")
    assert list_entries(tmp_path / "tacotron.txt") == [
        (str(clips[0][0]), None), (str(clips[1][0]), None), (str(clips[1][0]), str(clips[1][1]))]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "rooted.txt").write_text("wavs/clip0.wav|mels/clip0.npy\n")
    assert list_entries(tmp_path / "lists" / "rooted.txt", data_root=tmp_path) == [(str(clips[0][0]),
                                                                                   str(clips[0][1]))]
    monkeypatch.chdir(tmp_path)  # upstream's convention: paths relative to the working directory
    assert list_entries(tmp_path / "lists" / "rooted.txt")[0][1] == str(clips[0][1])
    assert mel2samp.files_to_list(tmp_path / "tacotron.txt") == [str(clips[0][0])] + [str(clips[1][0])] * 2


@pytest.mark.parametrize("layout, hint", [
    (lambda mel: mel.T, r"time-major \(frames, bands\).*mel\.T"),
    (lambda mel: mel[:64], r"has 64 bands.*n_mel_channels is 80"),
    (lambda mel: mel[None, None], r"shape \(1, 1, 80, \d+\)"),
])
def test_a_wrong_layout_is_a_named_error_with_a_hint(tmp_path, layout, hint):
    (wav, mel_path), = make_clips(tmp_path, seconds=(0.5,))
    np.save(mel_path, layout(np.load(mel_path)))
    with pytest.raises(AudioError, match=hint) as caught:
        dataset([(str(wav), str(mel_path))])
    assert caught.value.path == str(mel_path)


def test_mels_that_do_not_fit_their_audio_are_bad_files(tmp_path, caplog):
    clips = make_clips(tmp_path)
    wav, mel_path = clips[1]
    full = np.load(mel_path)  # 0.45 s: 1 + 9922 // 256 = 39 frames
    np.save(tmp_path / "one_short.npy", full[:, :-1])
    np.save(tmp_path / "one_long.npy", np.concatenate([full, full[:, -1:]], axis=1))
    for fits in ("one_short.npy", "one_long.npy"):
        mel, audio = dataset([(str(wav), str(tmp_path / fits))])[0]
        assert mel.shape == (80, 17) and audio.shape == (SEGMENT,)
    np.save(tmp_path / "other_clip.npy", full[:, :-5])
    np.save(tmp_path / "pickled.npy", np.array([{"mel": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "nan.npy", np.where(np.arange(full.shape[1]) == 3, np.nan, full))
    listed = [(str(clips[0][0]), str(clips[0][1])), (str(wav), str(tmp_path / "other_clip.npy")),
              (str(wav), str(tmp_path / "pickled.npy")), (str(wav), str(tmp_path / "nan.npy")),
              (str(wav), str(tmp_path / "missing.npy")), (str(clips[2][0]), str(clips[2][1]))]
    with caplog.at_level(logging.WARNING, logger="mel2samp"):
        data = dataset(listed)
    assert len(data) == 5 and data.skipped == 1 and "missing.npy not found" in caplog.text
    for index in range(len(data)):
        data[index]  # items of unusable mels take the next file
    assert data.skipped == 4
    assert re.search(r"other_clip\.npy: 34 mel frames, but its audio .*clip1\.wav \(9922 samples\) makes 39",
                     caplog.text)
    assert "pickled.npy: cannot read it as a mel" in caplog.text and "nan.npy: mel contains NaN" in caplog.text
    with pytest.raises(AudioError, match="other_clip.npy: 34 mel frames"):
        dataset(listed[:2], strict=True)[1]
    with pytest.raises(AudioError, match="missing.npy not found"):
        dataset(listed, strict=True)


def test_a_clip_shorter_than_the_segment_gets_silent_frames(tmp_path):
    (wav, mel_path), = make_clips(tmp_path, seconds=(0.1,))  # 2205 samples: 9 frames of the 17
    mel, audio = dataset([(str(wav), str(mel_path))])[0]
    assert mel.shape == (80, 17) and torch.all(audio[2205:] == 0)
    assert torch.equal(mel[:, :9], torch.from_numpy(np.load(mel_path)))
    assert torch.all(mel[:, 9:] == np.float32(SILENT_LOG_MEL))


def test_training_on_given_mels(tmp_path):
    clips = make_clips(tmp_path, seconds=(0.5,) * 4)
    (tmp_path / "list.txt").write_text("".join(f"{w}|{m}\n" for w, m in clips))
    config = {"train_config": {"output_directory": str(tmp_path / "out"), "epochs": 2, "batch_size": 2,
                               "learning_rate": 1e-3, "workers": 0, "device": "cpu", "step_stop": 3,
                               "validation_files": str(tmp_path / "list.txt"), "iters_per_validation": 0},
              "data_config": {"training_files": str(tmp_path / "list.txt"), "segment_length": SEGMENT},
              "waveglow_config": TINY_WAVEGLOW}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(["-c", str(tmp_path / "config.json")])
    assert code == 0, err.getvalue()
    losses = [float(v) for v in re.findall(r"^\d+:\tloss:(\S+)\ttime:", out.getvalue(), re.M)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert re.search(r"^Validation loss 3: -?\d+\.\d+$", out.getvalue(), re.M)

    np.save(clips[0][1], np.load(clips[0][1]).T)  # now time-major: the run stops before training, naming it
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        code = train.main(["-c", str(tmp_path / "config.json"), "-output_directory", str(tmp_path / "out2")])
    assert code == 1 and "clip0.npy" in err.getvalue() and "time-major" in err.getvalue()
