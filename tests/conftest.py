"""Shared test helpers: tiny models and small audio corpora made on the spot (no downloads)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LJ_SAMPLE = REPO.parent / "shared" / "data" / "LJSpeech-sample"

# One thread per process: the suite starts several torch processes at once (DDP, launchers) on small
# CI machines, and oversubscribed OpenMP threads spin and slow everything down many times over.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def pytest_configure(config):
    # Raised inside torch when torch.compile first imports its CPU helpers; nothing this project can change.
    config.addinivalue_line("filterwarnings",
                            r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning")


TINY_WAVEGLOW = {
    "n_mel_channels": 80, "n_flows": 4, "n_group": 8, "n_early_every": 2, "n_early_size": 2,
    "WN_config": {"n_layers": 2, "n_channels": 16, "kernel_size": 3},
}


def perturb_end_layers(model, std):
    """A fresh WaveGlow is the identity flow (zero-initialised end layers): give them small random weights so
    every coupling acts. Returns the model."""
    with torch.no_grad():
        for wn in model.WN:
            wn.end.weight.normal_(0, std)
            wn.end.bias.normal_(0, std)
    return model


def speechlike(seconds=1.0, sampling_rate=22050, f0=120.0, seed=0):
    """A voiced, pitch-gliding harmonic signal plus a little noise, in [-1, 1] (float64)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    pitch = f0 * (1 + 0.2 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    signal = sum(np.sin(h * phase) / h for h in range(1, 12))
    signal = signal * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    signal += 0.05 * rng.standard_normal(len(t))
    return 0.5 * signal / np.max(np.abs(signal))


def write_wav(path, audio, sampling_rate=22050, subtype="PCM_16"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sampling_rate, subtype=subtype)
    return path


def make_lj_corpus(root, n_clips=12, seconds=1.0, sampling_rate=22050):
    """A folder in LJ-Speech layout (wavs/ + metadata.csv) of speech-like clips."""
    root = Path(root)
    lines = []
    for i in range(n_clips):
        name = f"LJ001-{i + 1:04d}"
        write_wav(root / "wavs" / f"{name}.wav", speechlike(seconds, sampling_rate, 100 + 10 * i, seed=i), sampling_rate)
        lines.append(f"{name}|clip {i}|clip {i}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_waveglow_config():
    return {**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}


@pytest.fixture
def lj_corpus(tmp_path):
    return make_lj_corpus(tmp_path / "LJSpeech-test")


@pytest.fixture
def lj_sample():
    if not (LJ_SAMPLE / "wavs").is_dir():
        pytest.skip(f"real LJ-Speech sample clips not found at {LJ_SAMPLE} (present in CI, absent in a fresh clone)")
    return LJ_SAMPLE


@pytest.fixture(scope="module")
def launcher_workspace(tmp_path_factory):
    """For the launcher tests: a 14-clip corpus (2 held out) and a tiny config (4 flows, 2 layers, 16 channels,
    segment 2048, batch 2)."""
    root = tmp_path_factory.mktemp("launchers")
    corpus = make_lj_corpus(root / "LJSpeech", n_clips=14, seconds=0.5)
    config = json.loads((REPO / "config.json").read_text())
    config["waveglow_config"] = json.loads(json.dumps(TINY_WAVEGLOW))
    config["data_config"]["segment_length"] = 2048
    config["train_config"]["batch_size"] = 2
    (root / "tiny.json").write_text(json.dumps(config))
    return root, corpus, root / "tiny.json"
