"""config.py: the schema (unknown keys and wrong types rejected by name), flag precedence, the value checks,
the loaders the mel scripts and inference use, and the one-call TacotronSTFT / Mel2Samp builders."""
import argparse
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, speechlike, write_wav

import config
from config import (DEFAULTS, ConfigError, checkpoint_data_config, load_config, merge, parse_bool,
                    resolve_config)
from mel2samp import Mel2Samp, TacotronSTFT

MEL = {"sampling_rate": 22050, "filter_length": 1024, "hop_length": 256, "win_length": 1024, "mel_fmin": 0.0,
       "mel_fmax": 8000.0}


def write_config(path, sections):
    path.write_text(json.dumps(sections))
    return path


def resolve(tmp_path, sections, *flags):
    return resolve_config(["-c", str(write_config(tmp_path / "c.json", sections)), *flags])[0]


@pytest.mark.parametrize("sections,named", [
    ({"train_config": {"epochz": 3}}, "unknown key train_config.epochz (known: amp_backend, amp_dtype, batch_size"),
    ({"trainconfig": {}}, "unknown key trainconfig (known: data_config, dist_config, train_config, waveglow_config)"),
    ({"waveglow_config": {"WN_config": {"n_layer": 2}}},
     "unknown key waveglow_config.WN_config.n_layer (known: kernel_size, n_channels, n_layers)"),
])
def test_unknown_keys_are_rejected_by_name(tmp_path, sections, named):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, sections)
    assert str(caught.value).startswith(named)


@pytest.mark.parametrize("section,key,value,message", [
    ("train_config", "epochs", "3", "train_config.epochs must be an integer, got '3'"),
    ("train_config", "batch_size", True, "train_config.batch_size must be an integer, got True"),
    ("train_config", "fp16_run", 1, "train_config.fp16_run must be true or false, got 1"),
    ("train_config", "learning_rate", "fast", "train_config.learning_rate must be a finite number, got 'fast'"),
    ("train_config", "device", 0, "train_config.device must be a string, got 0"),
    ("data_config", "mel_fmin", None, "data_config.mel_fmin must be a finite number, got None"),
    ("waveglow_config", "WN_config", [8], "waveglow_config.WN_config must be a JSON object, got [8]"),
])
def test_values_of_the_wrong_type_are_named(tmp_path, section, key, value, message):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, {section: {key: value}})
    assert str(caught.value) == message


def test_merge_fills_defaults_converts_numbers_and_keeps_nullable_keys():
    merged = merge(DEFAULTS, {"data_config": {"mel_fmax": None, "mel_fmin": 0}}, "")
    assert merged["data_config"]["mel_fmax"] is None  # None: up to half the sampling rate
    assert merged["data_config"]["mel_fmin"] == 0.0 and isinstance(merged["data_config"]["mel_fmin"], float)
    assert merged["waveglow_config"] == DEFAULTS["waveglow_config"]
    assert merged["waveglow_config"] is not DEFAULTS["waveglow_config"]  # a copy: runs never share state
    with pytest.raises(ConfigError, match="train_config.sigma must be a finite number, got inf"):
        merge(DEFAULTS, {"train_config": {"sigma": float("inf")}}, "")


def test_flags_beat_the_file_which_beats_the_defaults(tmp_path):
    resolved = resolve(tmp_path, {"train_config": {"epochs": 5, "learning_rate": 0.5, "batch_size": 4},
                                  "data_config": {"segment_length": 8192}},
                       "-epochs", "7", "--batch-size", "3", "-fp16_run", "-segment_length", "4096",
                       "--learning_rate", "1")
    train = resolved["train_config"]
    assert (train["epochs"], train["batch_size"], train["fp16_run"]) == (7, 3, True)  # flags
    assert train["learning_rate"] == 1.0 and isinstance(train["learning_rate"], float)  # a flag, merged as the key
    assert train["seed"] == DEFAULTS["train_config"]["seed"]  # neither file nor flag: the default
    assert resolved["data_config"]["segment_length"] == 4096
    from_file = resolve(tmp_path, {"train_config": {"epochs": 5, "learning_rate": 0.5}})["train_config"]
    assert (from_file["epochs"], from_file["learning_rate"]) == (5, 0.5)


def test_a_flag_is_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train_config.epochs must be positive, got -1"):
        resolve(tmp_path, {}, "-epochs", "-1")
    with pytest.raises(ConfigError, match=r"train_config.device must be auto, cuda, npu or cpu, got 'tpu'"):
        resolve(tmp_path, {}, "--device", "tpu")


def test_parse_bool():
    assert [parse_bool(text) for text in ("true", "1", "Yes", " on ", "y")] == [True] * 5
    assert [parse_bool(text) for text in ("false", "0", "NO", "off", "n")] == [False] * 5
    with pytest.raises(argparse.ArgumentTypeError, match="expected true/false, 1/0 or yes/no, got 'maybe'"):
        parse_bool("maybe")


def test_training_checks_report_the_first_problem_in_order(tmp_path):
    # epochs comes before sampling_rate in the rules, whatever the file's order
    with pytest.raises(ConfigError, match="train_config.epochs must be positive"):
        resolve(tmp_path, {"data_config": {"sampling_rate": 0}, "train_config": {"epochs": 0}})
    with pytest.raises(ConfigError, match="n_group 8 does not fit data_config.hop_length 300: .* values that work "
                                          "for hop 300: 2, 4, 6, 10, 12, 20, 30, 50, 60, 100, 150, 300$"):
        resolve(tmp_path, {"data_config": {"hop_length": 300}})
    with pytest.raises(ConfigError, match="data_config.training_files is empty"):
        resolve(tmp_path, {"data_config": {"training_files": ""}})
    with pytest.raises(ConfigError, match="segment_length 4100 must be a multiple of waveglow_config.n_group 8"):
        resolve(tmp_path, {"data_config": {"segment_length": 4100}})


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'none.json'} not found"):
        load_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="list.json must hold a JSON object"):
        resolve_config(["-c", str(tmp_path / "list.json")])


def test_load_config_wants_the_mel_keys_given_and_checks_only_the_mel(tmp_path):
    assert load_config(REPO / "config.json")["data_config"]["hop_length"] == 256
    with pytest.raises(ConfigError, match="has no 'data_config' section"):
        load_config(write_config(tmp_path / "c.json", {"train_config": {}}))
    with pytest.raises(ConfigError, match="data_config lacks hop_length, mel_fmax"):
        partial = {key: value for key, value in MEL.items() if key not in ("hop_length", "mel_fmax")}
        load_config(write_config(tmp_path / "c.json", {"data_config": partial}))
    with pytest.raises(ConfigError, match="unknown key data_config.n_mels"):
        load_config(write_config(tmp_path / "c.json", {"data_config": {**MEL, "n_mels": 80}}))
    with pytest.raises(ConfigError, match="data_config.win_length 2048 exceeds filter_length 1024"):
        load_config(write_config(tmp_path / "c.json", {"data_config": {**MEL, "win_length": 2048}}))
    # what only training needs is not asked of a mel script: any hop, no training list
    loaded = load_config(write_config(tmp_path / "c.json", {"data_config": {**MEL, "hop_length": 200,
                                                                            "training_files": ""}}))
    assert loaded["data_config"]["hop_length"] == 200
    assert loaded["waveglow_config"] == DEFAULTS["waveglow_config"] and loaded["train_config"]["sigma"] == 1.0


def test_checkpoint_data_config_prefers_the_flag_then_the_checkpoint_then_the_repo_config(tmp_path):
    trained = {"data_config": {**MEL, "sampling_rate": 16000, "mel_fmax": 7600.0}, "train_config": {"sigma": 0.8}}
    checkpoint = {"config": trained}
    assert checkpoint_data_config(checkpoint) == (trained["data_config"], 0.8, "the checkpoint's config")
    given = write_config(tmp_path / "given.json", {"data_config": MEL, "train_config": {"sigma": 0.5}})
    data, sigma, source = checkpoint_data_config(checkpoint, str(given))
    assert (data["sampling_rate"], sigma, source) == (22050, 0.5, str(given))
    fallback = write_config(tmp_path / "fallback.json", {"data_config": {**MEL, "sampling_rate": 24000,
                                                                         "mel_fmax": 12000.0}})
    for foreign in ({}, {"config": {"waveglow_config": {}}}, {"config": {"data_config": {"sampling_rate": 1}}}):
        data, sigma, source = checkpoint_data_config(foreign, None, default_path=fallback)
        assert (data["sampling_rate"], sigma, source) == (24000, 1.0, fallback)
    assert checkpoint_data_config({})[2] == config.REPO_CONFIG


def test_tacotron_stft_from_config_is_the_hand_built_one():
    data = {"sampling_rate": 16000, "filter_length": 1024, "hop_length": 256, "win_length": 800,
            "mel_fmin": 40.0, "mel_fmax": 7600.0}
    built = TacotronSTFT.from_config(data, n_mel_channels=64)
    by_hand = TacotronSTFT(filter_length=1024, hop_length=256, win_length=800, n_mel_channels=64,
                           sampling_rate=16000, mel_fmin=40.0, mel_fmax=7600.0)
    assert (built.filter_length, built.hop_length, built.win_length, built.n_mel_channels, built.sampling_rate) == \
        (1024, 256, 800, 64, 16000)
    assert torch.equal(built.mel_basis, by_hand.mel_basis) and torch.equal(built.window, by_hand.window)
    audio = torch.from_numpy(speechlike(0.5, 16000)).float().unsqueeze(0)
    assert torch.equal(built.mel_spectrogram(audio), by_hand.mel_spectrogram(audio))
    assert not torch.equal(TacotronSTFT.from_config({**data, "mel_fmin": 0.0}, 64).mel_basis, by_hand.mel_basis)


def test_mel2samp_from_config_is_the_hand_built_one(tmp_path):
    files = [write_wav(tmp_path / f"{i}.wav", speechlike(0.6, 16000, 100 + 20 * i, seed=i), 16000) for i in range(3)]
    data = {"segment_length": 4096, "sampling_rate": 16000, "filter_length": 1024, "hop_length": 256,
            "win_length": 800, "mel_fmin": 40.0, "mel_fmax": 7600.0, "training_files": "unused"}
    options = {"n_mel_channels": 64, "seed": 5, "rank": 1}
    built = Mel2Samp.from_config([str(f) for f in files], data, **options)
    by_hand = Mel2Samp([str(f) for f in files], 4096, 1024, 256, 800, 16000, 40.0, 7600.0, **options)
    assert (built.segment_length, built.stft.win_length, built.stft.n_mel_channels, built.rank) == (4096, 800, 64, 1)
    for index in range(len(files)):
        (mel, audio), (hand_mel, hand_audio) = built[index], by_hand[index]
        assert torch.equal(mel, hand_mel) and torch.equal(audio, hand_audio)
        assert mel.shape == (64, 4096 // 256 + 1) and audio.abs().max() <= 1
    deterministic = Mel2Samp.from_config([str(f) for f in files], data, deterministic=True)
    assert deterministic.deterministic and deterministic.seed == 1234  # options not given keep their defaults


def test_reading_a_config_loads_neither_torch_nor_the_model():
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import config; config.load_config(sys.argv[2]); "
             "assert 'torch' not in sys.modules, 'config imported torch'; "
             "import mel2samp; assert 'glow' not in sys.modules, 'mel2samp imported the model'")
    done = subprocess.run([sys.executable, "-c", probe, str(REPO), str(REPO / "config.json")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
