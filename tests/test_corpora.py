"""Other corpora: sampling rates and hops from data_config (the upsampler follows the hop), the shipped configs
trained end to end, warm starts across hops, configs that do not fit a checkpoint, and the mel-scale warning."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, TINY_WAVEGLOW, make_lj_corpus, speechlike

import inference
import mel2samp
import train
from checkpoint import (FORMAT_NAME, build_model, checkpoint_audio, load_checkpoint, load_model,
                        save_checkpoint)
from config import ConfigError, load_config, resolve_config
from glow import WaveGlow
from mel2samp import MAX_WAV_VALUE, TacotronSTFT, load_wav_to_torch

SHIPPED = {"16k_hop200": (16000, 200, 8), "24k_hop300": (24000, 300, 12), "44k_hop512": (44100, 512, 8)}
LOSS_LINE = re.compile(r"^(\d+):\tloss:(\S+)\t", re.M)
# 20 mel bands keep the upsampler (n_mel x n_mel x 4 hop) and so the checkpoints small
TINY = {**TINY_WAVEGLOW, "n_mel_channels": 20}


def call(main, argv):
    """A script's main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as stop:  # mel2samp's main exits through sys.exit
            code = stop.code
    return code or 0, out.getvalue(), err.getvalue()


def tiny_config(folder, shipped=None, n_group=None, training_files="", **train_config):
    """A shipped config (or config.json) with the tiny WaveGlow, short segments and a few CPU steps."""
    config = json.loads((REPO / ("configs/" + shipped + ".json" if shipped else "config.json")).read_text())
    data = config["data_config"]
    n_group = n_group or config["waveglow_config"]["n_group"]
    config["waveglow_config"] = {**TINY, "n_group": n_group, "WN_config": dict(TINY["WN_config"])}
    data.update(training_files=str(training_files), segment_length=8 * data["hop_length"])  # 8 frames
    config["train_config"].update({"output_directory": str(folder / "out"), "epochs": 1, "batch_size": 2,
                                   "learning_rate": 1e-3, "iters_per_checkpoint": 1000, "workers": 0, "device": "cpu",
                                   **train_config})
    path = folder / f"{shipped or 'base'}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def corpus_at(folder, sampling_rate, n_clips=4):
    wavs = sorted((make_lj_corpus(folder, n_clips=n_clips, seconds=0.5, sampling_rate=sampling_rate) / "wavs")
                  .glob("*.wav"))
    (folder / "train.txt").write_text("\n".join(map(str, wavs)) + "\n")
    return folder / "train.txt", wavs


def losses(log):
    return {int(i): float(loss) for i, loss in LOSS_LINE.findall(log)}


def our_checkpoint(path, model, config, iteration=5):
    save_checkpoint(path, {"format": FORMAT_NAME, "format_version": 1, "model": model.state_dict(),
                           "iteration": iteration, "optimizer": None, "learning_rate": 1e-3, "config": config})
    return path


# ---- 1. the hop defines the upsampler; the shipped configs train, record their rate and hop, and synthesise ----

@pytest.mark.parametrize("hop, n_group", [(256, 8), (200, 8), (300, 12), (512, 8)])
def test_the_upsampler_follows_the_hop_and_inference_gives_hop_samples_per_frame(hop, n_group):
    torch.manual_seed(0)
    model = WaveGlow(**{**TINY, "n_group": n_group}, hop_length=hop)
    assert model.hop_length == hop
    assert model.upsample.stride == (hop,) and model.upsample.kernel_size == (4 * hop,)  # upstream: 1024 for 256
    mel = torch.randn(1, 20, 7) - 5
    assert model.upsample(mel).shape[2] == hop * 7 + 3 * hop  # the inference trim is kernel - stride
    assert model.infer(mel, sigma=0.6, seed=1).shape == (1, hop * 7)
    z, log_s, _ = model((mel, torch.randn(1, hop * 6).clamp(-1, 1)))
    assert z.shape == (1, n_group, hop * 6 // n_group) and len(log_s) == TINY["n_flows"]
    with pytest.raises(ValueError, match=f"fewer than the {hop * 11} audio samples.*at least 8 frames \\(hop {hop}\\)"):
        model((mel, torch.zeros(1, hop * 11)))


def test_the_constructor_stays_upstreams_with_hop_as_an_optional_keyword():
    positional = WaveGlow(80, 4, 8, 2, 2, {"n_layers": 2, "n_channels": 16, "kernel_size": 3})
    assert positional.hop_length == 256 and positional.upsample.kernel_size == (1024,)
    with pytest.raises(ValueError, match="n_group=8 must divide the upsampler stride, the hop length 300; values "
                                         "that do: 2, 4, 6, 10, 12, 20, 30, 50, 60, 100, 150, 300"):
        WaveGlow(**TINY, hop_length=300)


def test_a_config_whose_n_group_does_not_divide_the_hop_lists_the_values_that_work(tmp_path):
    path = tiny_config(tmp_path, "24k_hop300", n_group=8, training_files="train.txt")
    with pytest.raises(ConfigError, match="waveglow_config.n_group 8 does not fit data_config.hop_length 300: "
                                          "n_group must be even and divide the hop; values that work for hop 300: "
                                          "2, 4, 6, 10, 12, 20, 30, 50, 60, 100, 150, 300$"):
        resolve_config(["-c", str(path)])
    code, _, err = call(train.main, ["-c", path])
    assert code == 2 and "values that work for hop 300" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_are_valid_and_make_mels_of_their_hop(name):
    rate, hop, n_group = SHIPPED[name]
    config = load_config(REPO / "configs" / f"{name}.json")
    data = config["data_config"]
    assert (data["sampling_rate"], data["hop_length"], config["waveglow_config"]["n_group"]) == (rate, hop, n_group)
    assert data["filter_length"] == data["win_length"] == 4 * hop and data["mel_fmax"] <= rate / 2
    assert data["segment_length"] % n_group == 0
    assert abs(data["segment_length"] / rate - 0.75) < 0.03  # about upstream's 0.73 s of audio per clip
    resolve_config(["-c", str(REPO / "configs" / f"{name}.json")])  # passes every training check
    stft = TacotronSTFT.from_config(data, config["waveglow_config"]["n_mel_channels"])
    mel = stft.mel_spectrogram(torch.from_numpy(speechlike(0.5, rate)).float()[None])
    assert mel.shape == (1, 80, 1 + int(0.5 * rate) // hop)
    assert inference.mel_scale_problem(mel[0]) is None


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_config_trains_records_its_rate_and_hop_and_synthesises_at_them(tmp_path, name):
    rate, hop, n_group = SHIPPED[name]
    files, wavs = corpus_at(tmp_path / "corpus", rate)
    config = tiny_config(tmp_path, name, training_files=files, step_stop=2)
    code, log, err = call(train.main, ["-c", config])
    assert code == 0, err
    assert sorted(losses(log)) == [1, 2] and all(math.isfinite(v) for v in losses(log).values())

    checkpoint = load_checkpoint(tmp_path / "out" / "waveglow_2")
    recorded = checkpoint["config"]["data_config"]
    assert (recorded["sampling_rate"], recorded["hop_length"]) == (rate, hop)
    assert checkpoint_audio(checkpoint) == {"sampling_rate": rate, "hop_length": hop}
    model = build_model(checkpoint)
    assert (model.hop_length, model.upsample.kernel_size[0], model.n_group) == (hop, 4 * hop, n_group)

    # mel2samp -c makes the config's mels; inference turns F frames into exactly hop * F samples at the rate
    list_path = tmp_path / "wavs.txt"
    list_path.write_text(f"{wavs[0]}\n")
    code, out, err = call(mel2samp.main, ["-f", list_path, "-c", config, "-o", tmp_path / "mels", "-j", "1"])
    assert code == 0, err
    fmax = json.loads(config.read_text())["data_config"]["mel_fmax"]
    assert f"20 bands over 0-{fmax:g} Hz of {rate} Hz audio, hop {hop}, window {4 * hop}" in out
    mel = torch.load(tmp_path / "mels" / f"{wavs[0].name}.pt", weights_only=True)
    assert mel.shape == (20, 1 + sf.info(str(wavs[0])).frames // hop)
    (tmp_path / "mels.txt").write_text(str(tmp_path / "mels" / f"{wavs[0].name}.pt") + "\n")
    code, out, err = call(inference.main, ["-f", tmp_path / "mels.txt", "-w", tmp_path / "out" / "waveglow_2",
                                           "-o", tmp_path / "syn", "--device", "cpu", "--seed", "1"])
    assert code == 0, err
    assert "warning" not in err  # a mel made here has the scale the model expects
    written = sf.info(str(tmp_path / "syn" / f"{wavs[0].name}_synthesis.wav"))
    assert (written.samplerate, written.frames) == (rate, hop * mel.size(1))


# ---- the hop and rate of other flavours, read off their weights ----

def ascend_checkpoint(path, model, **extra):
    """The Ascend port's layout: Conv2d-shaped conv weights in a plain 'model' state dict."""
    weights = {k: v.unsqueeze(-1) if (k.startswith(("WN.", "convinv.")) and v.dim() == 3) else v
               for k, v in model.state_dict().items()}
    torch.save({"model": weights, "iteration": 100, "learning_rate": 1e-4, "optimizer": {}, **extra}, path)
    return path


def test_other_flavours_tell_their_hop_by_their_upsampler_and_are_22050_hz_at_upstreams_hop(tmp_path):
    torch.manual_seed(0)
    upstream_hop = ascend_checkpoint(tmp_path / "a256.pt", WaveGlow(**TINY))
    other_hop = ascend_checkpoint(tmp_path / "a200.pt", WaveGlow(**TINY, hop_length=200))
    assert checkpoint_audio(load_checkpoint(upstream_hop)) == {"sampling_rate": 22050, "hop_length": 256}
    assert checkpoint_audio(load_checkpoint(other_hop)) == {"sampling_rate": None, "hop_length": 200}
    model, checkpoint = load_model(other_hop)
    assert checkpoint["flavour"] == "ascend" and model.hop_length == 200
    dle = tmp_path / "dle.pt"
    weights = WaveGlow(**{**TINY, "n_group": 12}, hop_length=300).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "config": {"sampling_rate": 24000},
                "epoch": 3}, dle)  # DeepLearningExamples' layout; a config that records the rate is believed
    assert checkpoint_audio(load_checkpoint(dle)) == {"sampling_rate": 24000, "hop_length": 300}

    # inference needs the rate: it asks for it rather than writing the wavs at a guess
    mel_path = tmp_path / "m.pt"
    torch.save(torch.full((20, 6), -6.0), mel_path)
    (tmp_path / "mels.txt").write_text(f"{mel_path}\n")
    argv = ["-f", tmp_path / "mels.txt", "-w", other_hop, "-o", tmp_path / "syn", "--device", "cpu"]
    code, _, err = call(inference.main, argv)
    assert code == 1 and "does not record its sampling rate: pass --sampling_rate, or -c" in err
    code, _, err = call(inference.main, argv + ["--sampling_rate", "16000"])
    assert code == 0, err
    written = sf.info(str(tmp_path / "syn" / "m_synthesis.wav"))
    assert (written.samplerate, written.frames) == (16000, 200 * 6)


def test_converting_another_flavour_records_its_hop_and_known_rate(tmp_path):
    from checkpoint import convert
    torch.manual_seed(0)
    for hop, rate in ((256, 22050), (200, None)):
        source = ascend_checkpoint(tmp_path / f"a{hop}.pt", WaveGlow(**TINY, hop_length=hop))
        assert convert(source, tmp_path / f"ours{hop}") == "ascend"
        converted = load_checkpoint(tmp_path / f"ours{hop}")
        assert converted["config"]["data_config"] == ({"sampling_rate": rate, "hop_length": hop} if rate else
                                                      {"hop_length": hop})
        assert checkpoint_audio(converted) == {"sampling_rate": rate, "hop_length": hop}
        assert build_model(converted).hop_length == hop


def test_a_hop_longer_than_the_window_is_refused(tmp_path):
    path = tiny_config(tmp_path, "16k_hop200", training_files="train.txt")
    config = json.loads(path.read_text())
    config["data_config"].update(hop_length=1000, segment_length=8000)
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="data_config.hop_length 1000 exceeds win_length 800"):
        resolve_config(["-c", str(path)])


def test_audio_inputs_need_mel_settings_of_the_models_hop(tmp_path):
    torch.manual_seed(0)
    checkpoint = ascend_checkpoint(tmp_path / "a200.pt", WaveGlow(**TINY, hop_length=200))
    wav = tmp_path / "speech.wav"
    sf.write(str(wav), speechlike(0.3, 16000), 16000, subtype="PCM_16")
    (tmp_path / "wavs.txt").write_text(f"{wav}\n")
    argv = ["-f", tmp_path / "wavs.txt", "-w", checkpoint, "-o", tmp_path / "syn", "--device", "cpu"]
    code, _, err = call(inference.main, argv + ["--sampling_rate", "16000"])  # the repo's config.json: hop 256
    assert code == 1 and "have hop_length 256, but the model of" in err and "takes hop 200" in err
    config = tiny_config(tmp_path, "16k_hop200")
    code, _, err = call(inference.main, argv + ["-c", config])
    assert code == 0, err
    written = sf.info(str(tmp_path / "syn" / "speech_synthesis.wav"))
    assert (written.samplerate, written.frames) == (16000, 200 * (1 + int(0.3 * 16000) // 200))


# ---- 2. warm start across rates and hops ----

@pytest.fixture(scope="module")
def source_22k(tmp_path_factory):
    """A checkpoint of ours at 22050 Hz / hop 256 (and its model), as a 22 kHz training run writes it."""
    folder = tmp_path_factory.mktemp("source")
    torch.manual_seed(3)
    model = WaveGlow(**TINY)
    config = json.loads(tiny_config(folder).read_text())
    return our_checkpoint(folder / "waveglow_5", model, config), model.state_dict()


def test_warm_start_to_another_hop_takes_every_weight_but_the_upsampler_and_says_so(tmp_path, source_22k):
    source_path, source = source_22k
    files, _ = corpus_at(tmp_path / "corpus", 16000)
    config = tiny_config(tmp_path, "16k_hop200", training_files=files, step_stop=1, learning_rate=1e-12)
    code, log, err = call(train.main, ["-c", config, "-checkpoint_path", source_path, "-warm_start", "true"])
    assert code == 0, err
    assert "note: upsample.weight, upsample.bias not taken: hop 256 -> 200 (the upsampler starts fresh)" in log
    assert (f"note: data_config changes the mel of {source_path}: sampling_rate 22050 -> 16000, filter_length "
            f"1024 -> 800, win_length 1024 -> 800\n") in log
    assert "weights only, iteration 0" in log and sorted(losses(log)) == [1]
    tuned = load_checkpoint(tmp_path / "out" / "waveglow_1")
    assert checkpoint_audio(tuned) == {"sampling_rate": 16000, "hop_length": 200}
    assert tuned["model"]["upsample.weight"].shape == (20, 20, 800)
    taken = [name for name in source if not name.startswith("upsample.")]
    assert len(taken) == len(source) - 2
    for name in taken:  # one step at lr 1e-12 moves nothing visibly
        assert torch.allclose(tuned["model"][name], source[name], atol=1e-9), name


def test_warm_start_from_another_flavour_at_another_hop(tmp_path):
    torch.manual_seed(4)
    upstream_model = WaveGlow(**TINY)
    source = ascend_checkpoint(tmp_path / "ascend.pth", upstream_model)
    files, _ = corpus_at(tmp_path / "corpus", 44100)
    config = tiny_config(tmp_path, "44k_hop512", training_files=files, step_stop=1, learning_rate=1e-12)
    code, log, err = call(train.main, ["-c", config, "-checkpoint_path", source])  # other flavours: weights only
    assert code == 0, err
    assert "upsample.weight, upsample.bias not taken: hop 256 -> 512" in log and "(ascend): weights only" in log
    tuned = load_checkpoint(tmp_path / "out" / "waveglow_1")["model"]
    assert torch.allclose(tuned["WN.0.start.weight_v"], upstream_model.state_dict()["WN.0.start.weight_v"],
                          atol=1e-9)


def test_the_finetune_launcher_warm_starts_lj_speech_weights_to_16_khz(tmp_path, source_22k):
    source_path, _ = source_22k
    corpus = make_lj_corpus(tmp_path / "my_voice", n_clips=6, seconds=0.5, sampling_rate=16000)
    config = tiny_config(tmp_path, "16k_hop200")
    done = subprocess.run(["bash", str(REPO / "test" / "train_finetune_1p.sh"), f"--data_path={corpus}",
                           f"--output_directory={tmp_path / 'ft'}", f"--checkpoint_path={source_path}",
                           f"--c={config}", "--batch-size=2", "--device=cpu", "--step_stop=1", "--n_test=2",
                           "--workers=0"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TEST_OUTPUT_DIR": str(tmp_path / "logs")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "upsample.weight, upsample.bias not taken: hop 256 -> 200" in done.stdout
    assert checkpoint_audio(load_checkpoint(tmp_path / "ft" / "waveglow_1")) == {"sampling_rate": 16000,
                                                                                  "hop_length": 200}


# ---- 3. a config that does not fit the checkpoint: one message naming the keys, exit 2 ----

def assert_one_clear_error(code, err, *expected):
    assert code == 2 and "Traceback" not in err and "size mismatch" not in err
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_resume_with_another_architecture_names_the_keys_and_values(tmp_path):
    files, _ = corpus_at(tmp_path / "corpus", 22050)
    config_path = tiny_config(tmp_path, training_files=files, step_stop=1)
    config = json.loads(config_path.read_text())
    wider = {**config, "waveglow_config": {**TINY, "n_flows": 6, "WN_config": {**TINY["WN_config"], "n_channels": 32}}}
    checkpoint = our_checkpoint(tmp_path / "waveglow_40", WaveGlow(**wider["waveglow_config"]), wider)
    code, _, err = call(train.main, ["-c", config_path, "-checkpoint_path", checkpoint])
    assert_one_clear_error(code, err, f"error: checkpoint {checkpoint} does not fit the config: "
                           "waveglow_config.WN_config.n_channels is 32 in the checkpoint, 16 in the config; "
                           "waveglow_config.n_flows is 6 in the checkpoint, 4 in the config. Use a config with the "
                           "checkpoint's values")
    assert "-warm_start" not in err  # it could not help here
    # a warm start cannot bridge an architecture either: it would leave most of the model untrained
    code, _, err = call(train.main, ["-c", config_path, "-checkpoint_path", checkpoint, "-warm_start", "true"])
    assert_one_clear_error(code, err, "waveglow_config.n_flows is 6 in the checkpoint, 4 in the config")
    assert not (tmp_path / "out").exists()


def test_resume_at_another_hop_is_the_same_error_and_suggests_a_warm_start(tmp_path, source_22k):
    source_path, _ = source_22k
    files, _ = corpus_at(tmp_path / "corpus", 16000)
    config = tiny_config(tmp_path, "16k_hop200", training_files=files, step_stop=1)
    code, _, err = call(train.main, ["-c", config, "-checkpoint_path", source_path])
    assert_one_clear_error(code, err, f"checkpoint {source_path} does not fit the config: data_config.hop_length "
                                      "is 256 in the checkpoint, 200 in the config", "-warm_start true")


def test_other_flavours_mismatch_is_read_off_their_weights(tmp_path):
    files, _ = corpus_at(tmp_path / "corpus", 22050)
    config = tiny_config(tmp_path, training_files=files, step_stop=1)
    torch.manual_seed(5)
    source = ascend_checkpoint(tmp_path / "ascend.pth",
                               WaveGlow(**{**TINY, "n_group": 4, "WN_config": {**TINY["WN_config"], "n_layers": 3}}))
    code, _, err = call(train.main, ["-c", config, "-checkpoint_path", source])
    assert_one_clear_error(code, err, f"checkpoint {source} does not fit the config: "
                           "waveglow_config.WN_config.n_layers is 3 in the checkpoint, 2 in the config; "
                           "waveglow_config.n_group is 4 in the checkpoint, 8 in the config")


# ---- 4. the mel-scale warning at inference ----

def lj_mels(folder, sampling_rate=22050):
    stft = TacotronSTFT()
    for path in sorted(Path(folder, "wavs").glob("*.wav"))[:8]:
        audio = load_wav_to_torch(path, sampling_rate)[0] / MAX_WAV_VALUE
        yield path.name, audio, stft


def natural_variants(audio, stft):
    """Natural-log mels that must pass: as recorded, 4x louder and clipped, 34 dB quieter, mostly silence,
    a few frames, and a prediction that strays a little under the floor."""
    silence = torch.zeros(6 * 22050)
    mel = stft.mel_spectrogram(audio[None])[0]
    yield "as recorded", mel
    yield "loud", stft.mel_spectrogram((4 * audio / audio.abs().max()).clamp(-1, 1)[None])[0]
    yield "quiet", stft.mel_spectrogram(0.02 * audio[None])[0]
    yield "mostly silence", stft.mel_spectrogram(torch.cat([silence, audio, silence])[None])[0]
    yield "a few frames", mel[:, 40:60]
    yield "predicted", mel - 0.8 * torch.rand(mel.shape, generator=torch.Generator().manual_seed(0))


def other_scales(mel):
    """(mel in another scale, words the warning must use)."""
    per_band = (mel - mel.mean(1, keepdim=True)) / mel.std(1, keepdim=True)
    return [(mel / math.log(10), "log10"), (20 * mel / math.log(10), "decibels"),
            (20 * (mel - mel.max()) / math.log(10), "decibels"),
            ((mel - mel.min()) / (mel.max() - mel.min()), "min-max normalised to [0, 1]"),
            (8 * (mel - mel.min()) / (mel.max() - mel.min()) - 4, "min-max normalised to [-4, 4]"),
            ((mel - mel.mean()) / mel.std(), "mean-variance"), (per_band, "mean-variance"),
            (mel.exp(), "linear"), (torch.where(mel <= -11.5, -23.0, mel), "a floor below log(1e-5)")]


def test_mel_scale_of_real_speech_is_recognised(lj_sample):
    for name, audio, stft in lj_mels(lj_sample):
        for variant, mel in natural_variants(audio, stft):
            assert inference.mel_scale_problem(mel) is None, (name, variant)
        silence_heavy = list(natural_variants(audio, stft))[3][1]
        for scaled in (silence_heavy, stft.mel_spectrogram((4 * audio / audio.abs().max()).clamp(-1, 1)[None])[0]):
            for mel, words in other_scales(scaled):
                if words == "a floor below log(1e-5)" and scaled.min() > -11.5:
                    continue  # a clip that never reaches the floor has none to lower
                problem = inference.mel_scale_problem(mel)
                assert problem is not None and words in problem[0], (name, words, problem)


def test_mel_scale_of_synthetic_speech_at_every_rate(tmp_path):
    # no real clips needed: the test corpus's speech-like signal at each shipped config
    for name in SHIPPED:
        data = load_config(REPO / "configs" / f"{name}.json")["data_config"]
        stft = TacotronSTFT.from_config(data)
        mel = stft.mel_spectrogram(torch.from_numpy(speechlike(1.0, data["sampling_rate"])).float()[None])[0]
        assert inference.mel_scale_problem(mel) is None
        assert inference.mel_scale_problem(torch.full((80, 30), math.log(1e-5))) is None  # all silence
        for scaled, words in other_scales(mel)[:-1]:
            problem = inference.mel_scale_problem(scaled)
            assert problem is not None and words in problem[0], (name, words, problem)


def test_inference_warns_once_per_mel_in_another_scale_and_never_for_a_right_one(tmp_path):
    torch.manual_seed(0)
    model = WaveGlow(**TINY)
    checkpoint = our_checkpoint(tmp_path / "waveglow_5", model, json.loads(tiny_config(tmp_path).read_text()))
    stft = TacotronSTFT(n_mel_channels=20)
    mel = stft.mel_spectrogram(torch.from_numpy(speechlike(0.4)).float()[None])[0]
    torch.save(mel, tmp_path / "natural.pt")
    np.save(tmp_path / "log10.npy", (mel / math.log(10)).numpy())
    torch.save((mel - mel.mean()) / mel.std(), tmp_path / "normalised.pt")
    (tmp_path / "mels.txt").write_text("natural.pt\nlog10.npy\nnormalised.pt\n")
    code, _, err = call(inference.main, ["-f", tmp_path / "mels.txt", "-w", checkpoint, "-o", tmp_path / "syn",
                                         "--device", "cpu"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert f"warning: {tmp_path / 'log10.npy'}: this mel looks log10-compressed" in warnings[0]
    assert "multiply it by ln(10) = 2.3026" in warnings[0] and "natural-log magnitude mel" in warnings[0]
    assert f"warning: {tmp_path / 'normalised.pt'}: this mel looks mean-variance normalised" in warnings[1]
    assert all(sf.info(str(tmp_path / "syn" / f"{stem}_synthesis.wav")).frames == 256 * mel.size(1)
               for stem in ("natural", "log10", "normalised"))
