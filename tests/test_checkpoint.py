"""Checkpoint flavours in (upstream pickled modules, Ascend, DeepLearningExamples, ours), safely; ours out,
atomically."""
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, TINY_WAVEGLOW
import checkpoint as ckpt
from checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from glow import WaveGlow, remove_weightnorm


def make_source_model(config=TINY_WAVEGLOW, seed=0):
    """A WaveGlow whose every layer matters: the zero-initialised end layers and all g get random values."""
    torch.manual_seed(seed)
    model = WaveGlow(**{**config, "WN_config": dict(config["WN_config"])})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".end." in name:
                p.normal_(0.0, 0.05)
            elif name.endswith("weight_g"):
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def reference_audio(model, n_mel=80, frames=12):
    mel = torch.randn(1, n_mel, frames, generator=torch.Generator().manual_seed(1))
    return model.infer(mel, sigma=0.7, seed=3), mel


def assert_same_audio(source, path):
    expected, mel = reference_audio(source)
    loaded, _ = load_model(path)
    assert not loaded.training
    got = loaded.infer(mel, sigma=0.7, seed=3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- upstream NVIDIA: a whole pickled glow.WaveGlow with torch's weight-norm hooks --------------------------

def _weight_normed(g, v, bias, dilation=1):
    out_channels, in_channels, kernel = v.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, but it is what upstream used
        conv = nn.utils.weight_norm(nn.Conv1d(in_channels, out_channels, kernel, dilation=dilation,
                                              padding=(kernel * dilation - dilation) // 2))
    conv.weight_g.data, conv.weight_v.data, conv.bias.data = g.clone(), v.clone(), bias.clone()
    return conv


def upstream_module(source, cond_layers=False, res_skip_split=False):
    """The object upstream's torch.save({'model': model}) pickles, with classes that pickle as glow.*."""
    fake_glow = types.ModuleType("glow")
    classes = {name: type(name, (nn.Module,), {}) for name in ("WaveGlow", "WN", "Invertible1x1Conv")}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = "glow", name
        setattr(fake_glow, name, cls)
    sd = source.state_dict()
    C, n_layers = source.WN[0].n_channels, source.WN[0].n_layers
    top = classes["WaveGlow"]()
    top.n_flows, top.n_group = source.n_flows, source.n_group
    top.upsample = nn.ConvTranspose1d(source.n_mel_channels, source.n_mel_channels, 1024, stride=256)
    top.upsample.load_state_dict({"weight": sd["upsample.weight"], "bias": sd["upsample.bias"]})
    top.WN, top.convinv = nn.ModuleList(), nn.ModuleList()

    def conv(prefix, rows=slice(None), dilation=1):
        return _weight_normed(sd[prefix + "weight_g"][rows], sd[prefix + "weight_v"][rows], sd[prefix + "bias"][rows],
                              dilation)

    for k in range(source.n_flows):
        p = f"WN.{k}."
        wn = classes["WN"]()
        wn.n_layers, wn.n_channels = n_layers, C
        wn.start = conv(p + "start.")
        wn.end = nn.Conv1d(C, sd[p + "end.weight"].shape[0], 1)
        wn.end.load_state_dict({"weight": sd[p + "end.weight"], "bias": sd[p + "end.bias"]})
        wn.in_layers = nn.ModuleList(conv(f"{p}in_layers.{i}.", dilation=2 ** i) for i in range(n_layers))
        if cond_layers:
            wn.cond_layers = nn.ModuleList(conv(p + "cond_layer.", slice(2 * C * i, 2 * C * (i + 1)))
                                           for i in range(n_layers))
        else:
            wn.cond_layer = conv(p + "cond_layer.")
        if res_skip_split:
            wn.res_layers = nn.ModuleList(conv(f"{p}res_skip_layers.{i}.", slice(0, C)) for i in range(n_layers - 1))
            wn.skip_layers = nn.ModuleList(conv(f"{p}res_skip_layers.{i}.", slice(C, 2 * C) if i < n_layers - 1
                                                else slice(None)) for i in range(n_layers))
        else:
            wn.res_skip_layers = nn.ModuleList(conv(f"{p}res_skip_layers.{i}.") for i in range(n_layers))
        top.WN.append(wn)
        inv = classes["Invertible1x1Conv"]()
        inv.conv = nn.Conv1d(sd[f"convinv.{k}.conv.weight"].shape[0], sd[f"convinv.{k}.conv.weight"].shape[0], 1,
                             bias=False)
        inv.conv.weight.data = sd[f"convinv.{k}.conv.weight"].clone()
        inv.W_inverse = torch.linalg.inv(inv.conv.weight.squeeze(2))[..., None]  # upstream caches it in the module
        top.convinv.append(inv)
    return top, fake_glow


def save_upstream(path, module, fake_glow, monkeypatch, legacy=False, **extra):
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setitem(sys.modules, "glow", fake_glow)  # pickle finds the classes under their upstream names
        torch.save({"model": module, "iteration": 580000, "learning_rate": 1e-4,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, **extra},
                   path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("cond_layers,res_skip_split", [(False, False), (True, False), (True, True)],
                         ids=["current", "cond_layers", "cond+res/skip"])
def test_upstream_pickled_module_loads_and_gives_same_audio(tmp_path, monkeypatch, legacy, cond_layers, res_skip_split):
    source = make_source_model()
    module, fake_glow = upstream_module(source, cond_layers, res_skip_split)
    path = tmp_path / "waveglow_580000"
    save_upstream(path, module, fake_glow, monkeypatch, legacy=legacy)
    loaded = load_checkpoint(path)
    assert loaded["flavour"] == "nvidia-upstream"
    assert loaded["iteration"] == 580000 and loaded["learning_rate"] == 1e-4
    assert loaded["optimizer"] is None and loaded["source_optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert set(loaded["model"]) == set(source.state_dict())
    assert_same_audio(source, path)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    plain = tmp_path / "plain.pt"
    torch.save({"model": Payload(), "iteration": 1}, plain)
    # the payload hidden inside an upstream-style module in the legacy format (the restricted reader's path)
    module, fake_glow = upstream_module(make_source_model())
    module.WN[0].payload = Payload()
    hidden = tmp_path / "hidden.pt"
    save_upstream(hidden, module, fake_glow, monkeypatch, legacy=True)
    for path in (plain, hidden):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


# ---- Ascend, DeepLearningExamples, plain state dicts, ours ------------------------------------------------

def test_ascend_conv2d_state_dict(tmp_path):
    source = make_source_model()
    four_d = {k: (v.unsqueeze(-1) if v.dim() == 3 else v) for k, v in source.state_dict().items()}
    assert four_d["WN.0.in_layers.0.weight_v"].shape == (32, 16, 3, 1)
    assert four_d["WN.0.in_layers.0.weight_g"].shape == (32, 1, 1, 1)
    path = tmp_path / "ascend.pt"
    torch.save({"model": four_d, "iteration": 21000, "optimizer": {"state": {}}, "learning_rate": 2e-4}, path)
    loaded = load_checkpoint(path)
    assert loaded["flavour"] == "ascend" and loaded["iteration"] == 21000
    assert loaded["model"]["WN.0.in_layers.0.weight_v"].shape == (32, 16, 3)
    assert_same_audio(source, path)


def test_deep_learning_examples_checkpoint(tmp_path):
    source = make_source_model()
    C, n_layers = 16, 2
    dle = {}
    for key, value in source.state_dict().items():
        if ".cond_layer." in key:  # DLE keeps one cond conv per layer
            flow, name = key.split(".cond_layer.")
            for i in range(n_layers):
                dle[f"module.{flow}.cond_layers.{i}.{name}"] = value[2 * C * i:2 * C * (i + 1)].clone()
        else:
            dle["module." + key] = value
    path = tmp_path / "dle.pt"
    torch.save({"state_dict": dle, "config": dict(TINY_WAVEGLOW), "epoch": 7, "optimizer": {"state": {}}}, path)
    loaded = load_checkpoint(path)
    assert loaded["flavour"] == "nvidia-dle" and loaded["epoch"] == 7 and loaded["iteration"] == 0
    assert loaded["config"] is None and loaded["source_config"]["n_flows"] == 4
    assert "WN.0.cond_layer.weight_v" in loaded["model"]
    assert_same_audio(source, path)


def test_plain_state_dict_folded_weights(tmp_path):
    source = make_source_model()
    folded = remove_weightnorm(make_source_model())
    path = tmp_path / "plain.pt"
    torch.save(folded.state_dict(), path)
    assert load_checkpoint(path)["model"]["WN.0.start.weight"].dim() == 3
    assert_same_audio(source, path)


def test_our_format_round_trip_passes_everything_through(tmp_path):
    source = make_source_model()
    optimizer = torch.optim.Adam(source.parameters(), lr=3e-4)
    source((torch.randn(1, 80, 3), torch.randn(1, 512)))[0].sum().backward()
    optimizer.step()
    config = {"train_config": {"sigma": 1.0}, "data_config": {"sampling_rate": 22050},
              "waveglow_config": dict(TINY_WAVEGLOW)}
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # as train.py stores it: plain data
    rng = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": (3, (1, 2, 3), None)}
    path = tmp_path / "waveglow_10"
    save_checkpoint(path, {"model": {"module." + k: v for k, v in source.state_dict().items()},  # a DDP slip
                           "iteration": 10, "optimizer": optimizer.state_dict(), "learning_rate": 3e-4,
                           "scaler": None, "config": config, "rng": rng, "epoch": 2,
                           "format": "waveglow-pytorch", "format_version": 1})
    loaded = load_checkpoint(path)
    assert loaded["flavour"] == "waveglow-pytorch" and loaded["iteration"] == 10 and loaded["epoch"] == 2
    assert loaded["config"] == config and loaded["learning_rate"] == 3e-4
    assert torch.equal(loaded["rng"]["torch"], rng["torch"])
    assert loaded["rng"]["numpy"] == rng["numpy"]
    fresh = torch.optim.Adam(make_source_model(seed=5).parameters(), lr=3e-4)
    fresh.load_state_dict(loaded["optimizer"])  # the optimizer state is usable as saved
    assert "WN.0.start.weight_v" in loaded["model"]
    assert_same_audio(source, path)


@pytest.mark.parametrize("config", [
    {**TINY_WAVEGLOW, "n_flows": 6, "n_early_every": 2, "n_early_size": 2},
    {**TINY_WAVEGLOW, "n_group": 16, "n_early_every": 3, "n_early_size": 4,
     "WN_config": {"n_layers": 3, "n_channels": 8, "kernel_size": 5}},
    {**TINY_WAVEGLOW, "n_flows": 2, "n_early_every": 4, "n_mel_channels": 40},  # no early outputs
], ids=["6flows", "group16", "no-early"])
def test_architecture_inferred_from_weights(tmp_path, config):
    source = make_source_model(config)
    inferred = ckpt.waveglow_config_from_state_dict(source.state_dict())
    for key in ("n_mel_channels", "n_flows", "n_group", "WN_config"):
        assert inferred[key] == config[key]
    if config["n_early_every"] < config["n_flows"]:
        assert inferred["n_early_every"] == config["n_early_every"]
        assert inferred["n_early_size"] == config["n_early_size"]
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    mel = torch.randn(1, config["n_mel_channels"], 6)
    loaded, _ = load_model(path)
    torch.testing.assert_close(loaded.infer(mel, 0.5, seed=0), source.infer(mel, 0.5, seed=0), rtol=1e-4, atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------------------

def test_truncated_empty_and_missing_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": make_source_model().state_dict(), "format": "waveglow-pytorch"})
    data = good.read_bytes()
    for name, content in (("truncated.pt", data[:len(data) // 2]), ("empty.pt", b""), ("text.pt", b"hello")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_model(tmp_path / name)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_checkpoints_of_other_models_or_architectures(tmp_path):
    other = tmp_path / "hifigan.pt"
    torch.save({"generator": {"conv_pre.weight": torch.zeros(512, 80, 7)}, "steps": 5}, other)
    with pytest.raises(CheckpointError, match="'generator'"):
        load_checkpoint(other)
    other_in_model = tmp_path / "other_model.pt"
    torch.save({"model": {"conv_pre.weight": torch.zeros(512, 80, 7)}}, other_in_model)
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(other_in_model)

    sd = make_source_model().state_dict()
    wider = {**TINY_WAVEGLOW, "WN_config": {"n_layers": 2, "n_channels": 32, "kernel_size": 3}}
    deeper = {**TINY_WAVEGLOW, "WN_config": {"n_layers": 3, "n_channels": 16, "kernel_size": 3}}
    for name, config, expected in (("wider", wider, "size mismatch"), ("deeper", deeper, "Missing key")):
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, {"model": sd, "config": {"waveglow_config": config}, "format": "waveglow-pytorch"})
        with pytest.raises(CheckpointError) as error:
            load_model(path)
        message = str(error.value)
        assert str(path) in message and expected in message and "another architecture" in message


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "waveglow_1000"
    save_checkpoint(path, {"model": make_source_model().state_dict(), "iteration": 1000, "format": "waveglow-pytorch"})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left") as error:
        save_checkpoint(path, {"iteration": 2000})
    assert str(path) in str(error.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["waveglow_1000"]  # no temp file left behind
    assert load_checkpoint(path)["iteration"] == 1000

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="a_file"):
        save_checkpoint(blocker / "waveglow_1", {"iteration": 1})
    with pytest.raises(CheckpointError, match="state_dict"):
        save_checkpoint(tmp_path / "module.pt", {"model": make_source_model()})


def test_converter_cli(tmp_path, monkeypatch):
    source = make_source_model()
    module, fake_glow = upstream_module(source, cond_layers=True)
    upstream = tmp_path / "waveglow_256channels.pt"
    save_upstream(upstream, module, fake_glow, monkeypatch, legacy=True)
    converted = tmp_path / "converted.pt"
    run = subprocess.run([sys.executable, str(REPO / "checkpoint.py"), str(upstream), str(converted)],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "nvidia-upstream" in run.stdout
    raw = torch.load(converted, weights_only=True)  # plain tensors and containers only
    assert raw["format"] == "waveglow-pytorch" and raw["converted_from"] == "nvidia-upstream"
    assert raw["iteration"] == 580000 and raw["optimizer"] is None
    assert raw["config"]["waveglow_config"]["n_flows"] == 4
    assert_same_audio(source, converted)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    assert ckpt.main([str(bad), str(tmp_path / "out.pt")]) == 1
    assert not (tmp_path / "out.pt").exists()
