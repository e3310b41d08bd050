"""inference.py end to end, its batching and chunking, evaluation mode, bad inputs; denoiser; copy-synthesis scores."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.io import wavfile

from conftest import REPO, TINY_WAVEGLOW, speechlike, write_wav
import inference
from checkpoint import load_model, save_checkpoint
from denoiser import Denoiser
from evaluate import SCORE_KEYS, SCORE_LABELS, copy_synthesis_score, plot_mel_comparison
from mel2samp import TacotronSTFT
from test_checkpoint import make_source_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    with open(REPO / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config["waveglow_config"] = {**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}
    config["data_config"]["segment_length"] = 4096
    path = tmp_path_factory.mktemp("ckpt") / "waveglow_100"
    save_checkpoint(path, {"model": make_source_model().state_dict(), "config": config, "iteration": 100,
                           "format": "waveglow-pytorch", "format_version": 1})
    return path


def mel_file(path, frames, seed=0, leading_one=False):
    mel = torch.randn(80, frames, generator=torch.Generator().manual_seed(seed)) - 4.0
    torch.save(mel[None] if leading_one else mel, path)
    return mel


def write_list(path, entries):
    path.write_text("".join(f"{entry}\n" for entry in entries))
    return path


def read_pcm(path):
    rate, samples = wavfile.read(path)
    assert samples.dtype == np.int16
    return samples


def test_cli_end_to_end(tmp_path, tiny_checkpoint):
    mel_file(tmp_path / "LJ001-0001.wav.pt", 30)
    mel_file(tmp_path / "tacotron.pt", 21, seed=1, leading_one=True)
    np.save(tmp_path / "fastpitch.npy", np.random.default_rng(2).normal(-4.0, 1.0, (80, 17)).astype(np.float16))
    clip = write_wav(tmp_path / "speech.wav", speechlike(0.4))
    filelist = write_list(tmp_path / "mels.txt", ["LJ001-0001.wav.pt", "tacotron.pt", "fastpitch.npy", str(clip)])
    run = subprocess.run([sys.executable, str(REPO / "inference.py"), "-f", str(filelist), "-w", str(tiny_checkpoint),
                          "-o", str(tmp_path / "out"), "-s", "0.6", "-d", "0.05", "--seed", "1", "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "real-time factor" in run.stdout
    samples = len(sf.read(str(clip))[0])
    for name, expected in (("LJ001-0001.wav_synthesis.wav", 256 * 30), ("tacotron_synthesis.wav", 256 * 21),
                           ("fastpitch_synthesis.wav", 256 * 17), ("speech_synthesis.wav", 256 * (1 + samples // 256))):
        info = sf.info(str(tmp_path / "out" / name))
        assert (info.subtype, info.samplerate, info.channels, info.frames) == ("PCM_16", 22050, 1, expected)
        assert np.abs(read_pcm(tmp_path / "out" / name)).max() > 0


def test_output_is_the_models_audio_clipped_not_wrapped(tmp_path, tiny_checkpoint):
    mel = mel_file(tmp_path / "loud.pt", 12)
    filelist = write_list(tmp_path / "list.txt", [tmp_path / "loud.pt"])
    assert inference.main(["-f", str(filelist), "-w", str(tiny_checkpoint), "-o", str(tmp_path),
                           "-s", "40", "--seed", "7"]) == 0
    model, _ = load_model(tiny_checkpoint)
    expected = model.infer(mel[None], sigma=40.0, seed=7)[0].numpy()  # file 0 draws its noise from seed + 0
    written = read_pcm(tmp_path / "loud_synthesis.wav").astype(np.int64)
    assert np.abs(expected).max() > 1.5  # loud enough to need clipping
    reference = np.clip(expected * 32768.0, -32768, 32767)
    assert np.abs(written - reference).max() <= 1.0
    loud = np.abs(expected) > 1.0
    assert np.all(np.abs(written[loud]) >= 32767) and np.all(np.sign(written[loud]) == np.sign(expected[loud]))


def test_seed_makes_audio_reproducible(tmp_path, tiny_checkpoint):
    mel_file(tmp_path / "m.pt", 10)
    filelist = write_list(tmp_path / "list.txt", [tmp_path / "m.pt"])
    outputs = {}
    for run, seed in (("a", "3"), ("b", "3"), ("c", "4"), ("d", None), ("e", None)):
        args = ["-f", str(filelist), "-w", str(tiny_checkpoint), "-o", str(tmp_path / run)]
        assert inference.main(args + (["--seed", seed] if seed else [])) == 0
        outputs[run] = read_pcm(tmp_path / run / "m_synthesis.wav")
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["c"])
    assert not np.array_equal(outputs["d"], outputs["e"])


def test_batching_matches_one_by_one(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    synth = inference.Synthesizer(model, torch.device("cpu"), None, 0.6, 5, 2000, 32, 0.0)
    mels = [torch.randn(80, frames, generator=torch.Generator().manual_seed(frames)) - 4 for frames in (20, 27, 33)]
    batched, _ = synth(mels, [0, 1, 2])
    for index, mel in enumerate(mels):
        (alone,), _ = synth([mel], [index])
        assert batched[index].shape == alone.shape == (256 * mel.size(1),)
        # identical up to the last hop: only there does the padded clip see silence instead of its end
        torch.testing.assert_close(batched[index][:-256], alone[:-256], rtol=0, atol=1e-5)
        assert (batched[index] - alone).abs().max() < 0.05 * alone.abs().max()


def test_chunked_matches_unchunked(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    mel = torch.randn(1, 80, 70, generator=torch.Generator().manual_seed(0)) - 4
    for sigma in (0.0, 0.6):
        z = inference.make_noise(model, 70, sigma, 1, torch.device("cpu"))
        whole = inference.synthesize(model, mel, z, max_frames=2000)
        chunked = inference.synthesize(model, mel, z, max_frames=24, overlap=16)  # four chunks, three seams
        assert chunked.shape == whole.shape == (1, 256 * 70)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    hard_cut = inference.synthesize(model, mel, z, max_frames=24, overlap=0)
    assert (hard_cut - whole).abs().max() > 1e-3  # the overlap is what makes the seams vanish


def test_max_frames_flag_chunks_the_same_audio(tmp_path, tiny_checkpoint):
    mel_file(tmp_path / "long.pt", 60)
    filelist = write_list(tmp_path / "list.txt", [tmp_path / "long.pt"])
    for name, extra in (("whole", []), ("chunked", ["--max_frames", "40", "--chunk_overlap", "16"])):
        assert inference.main(["-f", str(filelist), "-w", str(tiny_checkpoint), "-o", str(tmp_path / name),
                               "-s", "0", "--seed", "0"] + extra) == 0
    whole = read_pcm(tmp_path / "whole" / "long_synthesis.wav").astype(int)
    chunked = read_pcm(tmp_path / "chunked" / "long_synthesis.wav").astype(int)
    assert len(chunked) == 256 * 60 and np.abs(whole - chunked).max() <= 1


def test_compile_flag_gives_the_same_audio(tmp_path, tiny_checkpoint):
    """--compile on two lengths (the second compiles once more, for any length) matches eager synthesis."""
    mel_file(tmp_path / "short.pt", 12)
    mel_file(tmp_path / "long.pt", 30)
    filelist = write_list(tmp_path / "list.txt", [tmp_path / "short.pt", tmp_path / "long.pt"])
    # bf16 (--is_fp16 on a CPU): the compiled model keeps its WN weights in bf16, eager ones cache bf16 copies;
    # both round differently, a few dozen 16-bit steps apart.
    for precision, tolerance in (([], 2), (["--is_fp16"], 200)):
        for name, extra in (("eager", []), ("compiled", ["--compile"])):
            assert inference.main(["-f", str(filelist), "-w", str(tiny_checkpoint), "-o", str(tmp_path / name),
                                   "-s", "0.6", "--seed", "2"] + precision + extra) == 0
        for clip in ("short", "long"):
            eager = read_pcm(tmp_path / "eager" / f"{clip}_synthesis.wav").astype(int)
            compiled = read_pcm(tmp_path / "compiled" / f"{clip}_synthesis.wav").astype(int)
            assert len(compiled) == len(eager) and np.abs(compiled - eager).max() <= tolerance


def test_bad_inputs_are_reported_and_the_rest_still_made(tmp_path, tiny_checkpoint, capsys):
    mel_file(tmp_path / "good.pt", 8)
    torch.save(torch.full((80, 8), math.nan), tmp_path / "nan.pt")
    torch.save(torch.zeros(40, 8), tmp_path / "forty.pt")
    torch.save(torch.zeros(2, 80, 8), tmp_path / "stereo.pt")
    torch.save({"mel": torch.zeros(80, 8)}, tmp_path / "dict.pt")
    np.save(tmp_path / "pickled.npy", np.array([{"mel": np.zeros((80, 8))}], dtype=object))
    np.save(tmp_path / "time_major.npy", np.zeros((8, 80), dtype=np.float32))
    (tmp_path / "text.wav").write_text("not audio")
    bad = ["missing.pt", "nan.pt", "forty.pt", "stereo.pt", "dict.pt", "pickled.npy", "time_major.npy", "text.wav"]
    filelist = write_list(tmp_path / "list.txt", [tmp_path / name for name in bad[:3] + ["good.pt"] + bad[3:]])
    assert inference.main(["-f", str(filelist), "-w", str(tiny_checkpoint), "-o", str(tmp_path / "out")]) == 1
    assert os.listdir(tmp_path / "out") == ["good_synthesis.wav"]
    errors = capsys.readouterr().err
    for name in bad:
        assert f"{tmp_path / name}:" in errors
    assert "cannot read it as a numpy array file" in errors  # pickled .npy: refused, never unpickled
    assert "looks time-major (frames, 80)" in errors
    assert "8 of 9 inputs failed" in errors

    empty = write_list(tmp_path / "empty.txt", [])
    assert inference.main(["-f", str(empty), "-w", str(tiny_checkpoint), "-o", str(tmp_path / "o2")]) == 1
    assert "empty.txt" in capsys.readouterr().err
    (tmp_path / "broken_ckpt").write_bytes(b"PK\x03\x04 not really")
    assert inference.main(["-f", str(filelist), "-w", str(tmp_path / "broken_ckpt"), "-o", str(tmp_path / "o3")]) == 1
    assert "broken_ckpt" in capsys.readouterr().err


def test_evaluation_mode(tmp_path, tiny_checkpoint, lj_corpus, capsys):
    clips = sorted((lj_corpus / "wavs").glob("*.wav"))[:3]
    eval_list = write_list(tmp_path / "test_files.txt", clips)
    out = tmp_path / "eval"
    assert inference.main(["-w", str(tiny_checkpoint), "--eval_list", str(eval_list), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    nll = float(printed.split("Validation NLL: ")[1].split()[0])
    l1 = float(printed.split("Copy-synthesis mel L1: ")[1].split()[0])
    report = json.loads((out / "eval.json").read_text())
    assert math.isfinite(nll) and math.isfinite(l1) and l1 > 0
    assert report["validation_nll"] == pytest.approx(nll, abs=1e-6)
    assert report["copy_synthesis_mel_l1"] == pytest.approx(l1, abs=1e-6)
    assert report["sigma"] == 0.6 and report["iteration"] == 100 and len(report["clips"]) == 3
    assert set(SCORE_KEYS) <= set(report["mean"]) and all(set(SCORE_KEYS) <= set(clip) for clip in report["clips"])
    assert report["mean"]["mel_l1"] == pytest.approx(l1, abs=1e-6)
    for key, label in SCORE_LABELS.items():  # the printed means, which the launchers read, are the file's
        printed_mean = float(printed.split(f"Copy-synthesis {label}: ")[1].split()[0])
        if report["mean"][key] is None:  # an untrained model's noise has no frame voiced where the input is
            assert key == "f0_rmse_cents" and math.isnan(printed_mean)
        else:
            assert printed_mean == pytest.approx(report["mean"][key], abs=1e-6), key
    for clip, source in zip(report["clips"], clips, strict=True):
        assert os.path.getsize(clip["png"]) > 1000
        assert sf.info(clip["wav"]).frames == sf.info(str(source)).frames  # copy synthesis keeps the length
    # deterministic: the same numbers again
    again_dir = tmp_path / "again"
    assert inference.main(["-w", str(tiny_checkpoint), "--eval_list", str(eval_list), "-o", str(again_dir)]) == 0
    again = json.loads((again_dir / "eval.json").read_text())
    assert again["validation_nll"] == report["validation_nll"]
    assert again["copy_synthesis_mel_l1"] == report["copy_synthesis_mel_l1"]


def test_copy_synthesis_score_and_plot(tmp_path):
    stft = TacotronSTFT()
    clean = torch.from_numpy(speechlike(0.5)).float()
    score, reference_mel, output_mel = copy_synthesis_score(stft, clean, torch.cat([clean, torch.zeros(200)]))
    assert score == 0.0 and reference_mel.shape == output_mel.shape == (80, 1 + clean.numel() // 256)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    louder_noise = clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    assert 0 < copy_synthesis_score(stft, clean, noisy)[0] < copy_synthesis_score(stft, clean, louder_noise)[0]
    png = plot_mel_comparison(reference_mel, output_mel, tmp_path / "mel.png", "title")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---- denoiser -------------------------------------------------------------------------------------------

class HummingVocoder(torch.nn.Module):
    """Stands in for a WaveGlow whose output always carries the same 5 kHz whine (its bias).

    A cosine, so the reflect padding of the first frame continues it smoothly and that frame sees it whole.
    """
    n_mel_channels = 80

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def hum(self, n_samples):
        return 0.05 * torch.cos(2 * math.pi * 5000.0 * torch.arange(n_samples) / 22050) * self.scale.detach()

    def infer(self, mel, sigma=1.0):
        return self.hum(256 * mel.size(2)).expand(mel.size(0), -1)


def band_energy(audio, hz):
    spectrum = torch.fft.rfft(audio.double())
    bin_index = round(hz * audio.numel() / 22050)
    return spectrum[bin_index - 3:bin_index + 4].abs().pow(2).sum().item()


def test_denoiser_removes_the_bias_and_keeps_shape():
    vocoder = HummingVocoder()
    denoiser = Denoiser(vocoder)
    speech = torch.from_numpy(speechlike(1.0, f0=150.0)).float()[:22016]
    hummed = speech + vocoder.hum(speech.numel())
    cleaned = denoiser(hummed, strength=1.0)
    assert cleaned.shape == hummed.shape and cleaned.dtype == hummed.dtype
    assert band_energy(cleaned, 5000.0) < 0.01 * band_energy(hummed, 5000.0)
    assert band_energy(cleaned, 150.0) > 0.8 * band_energy(speech, 150.0)  # the speech itself stays
    torch.testing.assert_close(denoiser(hummed, strength=0.0), hummed, rtol=0, atol=1e-5)
    batch = torch.stack([hummed, speech])
    assert denoiser(batch, 0.1).shape == batch.shape


def test_denoiser_on_a_waveglow():
    model = make_source_model().eval()
    denoiser = Denoiser(model)
    assert denoiser.bias_spectrum.shape == (1, 513, 1)
    bias = model.infer(torch.zeros(1, 80, 88), sigma=0.0)
    assert denoiser(bias, 1.0).abs().mean() < 0.5 * bias.abs().mean()
    short = torch.randn(300)
    assert denoiser(short, 0.1).shape == short.shape
