"""Checkpoints: this project's format out, atomically; every WaveGlow flavour in, safely.

Flavours read (see load_checkpoint):
  waveglow-pytorch  ours, written by train.py through save_checkpoint: 'model' (a state dict in glow.py's
                    names), 'format', 'format_version', and what resuming needs ('iteration', 'optimizer',
                    'config', 'rng', ...)
  nvidia-upstream   NVIDIA/waveglow's pickled glow.WaveGlow modules   } read by legacy_checkpoints.py, which
  ascend            the Ascend ModelZoo port's Conv2d-shaped weights  } describes each and why nothing in a
  nvidia-dle        NVIDIA DeepLearningExamples' 'state_dict'         } checkpoint ever runs as code

Every flavour's upsampler tells its hop (kernel = 4 x hop); ours record the sampling rate in their config,
others count as 22050 Hz at upstream's hop of 256 (checkpoint_audio). fit_weights decides what a resume or
warm start takes from a checkpoint, and names the config keys that keep it from fitting.

    python checkpoint.py INPUT OUTPUT      # any flavour -> this project's format
"""
import argparse
import os
import re
import secrets
import sys
from collections import OrderedDict

import torch

from config import MEL_KEYS
from glow import DEFAULT_HOP_LENGTH, UPSAMPLE_KERNEL_PER_HOP, WaveGlow, remove_weightnorm
from legacy_checkpoints import (CheckpointError, conv1d_weight, foreign_state_dict, is_pickled_module, is_tensor_dict,
                                layer_indices, merge_split_layers, read_without_running_code)

FORMAT_NAME = "waveglow-pytorch"
FORMAT_VERSION = 1
UPSTREAM_SAMPLING_RATE = 22050  # what other flavours' models with upstream's hop of 256 were trained at
TEMP_SUFFIX = ".tmp"  # save_checkpoint writes ".<name>.<random>.tmp" first, then renames it to <name>


# ---------------------------------------------------------------------------------------------------------
# Writing

def save_checkpoint(path, checkpoint):
    """Write `checkpoint` (a dict of tensors, numbers and containers) to `path` atomically.

    The data goes to a hidden temp file in the same folder, is flushed to disk, then renamed over `path`,
    so a crash, a kill or a full disk mid-save leaves the previous checkpoint as it was.
    """
    path = os.fspath(path)
    modules = [key for key, value in checkpoint.items() if isinstance(value, torch.nn.Module)]
    if modules:
        raise CheckpointError(f"not saving {path}: {modules} hold whole nn.Module objects; save their "
                              f"state_dict() instead (pickled modules cannot be loaded safely)")
    folder = os.path.dirname(os.path.abspath(path))
    temp_path = None
    try:
        os.makedirs(folder, exist_ok=True)
        candidate = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        # Created like any new file (0666 less the umask), so a team or an inference service running as
        # another user can read the checkpoint; tempfile.mkstemp would make it private to its owner.
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        temp_path = candidate
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
        temp_path = None
        _fsync_folder(folder)  # makes the rename itself durable
    except Exception as error:
        if temp_path is not None and os.path.exists(temp_path):
            os.remove(temp_path)
        raise CheckpointError(f"could not save checkpoint {path}: {error}; any previous file there is "
                              f"unchanged (check free disk space and that the folder is writable)") from error


def remove_interrupted_saves(folder, prefix=""):
    """Delete the hidden temp files that interrupted saves (kill -9, power loss) left in `folder`.

    Only those of checkpoints whose names start with `prefix` are touched. They are never mistaken for
    checkpoints, but each is as large as one. Call this only where nothing else is saving into `folder`
    at the same time. Returns the names removed.
    """
    # save_checkpoint's temp names: "." + checkpoint name + "." + 8 random characters + suffix
    pattern = re.compile(r"^\." + re.escape(prefix) + r".*\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")
    try:
        names = sorted(name for name in os.listdir(folder) if pattern.match(name))
    except OSError:
        return []
    removed = []
    for name in names:
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Reading: normalising a state dict to glow.py's names

def normalise_state_dict(state_dict):
    """Any flavour's WaveGlow state dict -> glow.py's names and shapes (a new dict)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        # DDP ('module.') and torch.compile ('_orig_mod.') wrappers add a name segment anywhere
        key = ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))
        out[key] = conv1d_weight(value)  # the Ascend port's Conv2d weights lose their dimension of 1
    merge_split_layers(out)
    return out


def _looks_like_waveglow(state_dict):
    return ("upsample.weight" in state_dict and "convinv.0.conv.weight" in state_dict
            and any(k.startswith("WN.0.") for k in state_dict))


def _describe(raw):
    if isinstance(raw, dict):
        items = [f"{k!r}: {type(v).__name__}" for k, v in list(raw.items())[:8]]
        return "a dict with " + ", ".join(items) + (" ..." if len(raw) > 8 else "")
    return f"a {type(raw).__name__}"


def load_checkpoint(path, map_location="cpu"):
    """Read any WaveGlow checkpoint flavour and return it normalised:

    'model' (state dict in glow.py's names), 'iteration' (int, 0 if absent), 'optimizer' (ours only, else
    None: foreign optimizers order their parameters differently), 'learning_rate' (or None), 'config' (our
    full config, or None), 'flavour'; all other keys pass through (a foreign 'config' / 'optimizer' as
    'source_config' / 'source_optimizer').
    """
    path = os.fspath(path)
    raw = read_without_running_code(path)
    if is_pickled_module(raw):  # torch.save(model) alone
        raw = {"model": raw}
    if is_tensor_dict(raw):  # a state dict saved alone
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a WaveGlow checkpoint: it holds {_describe(raw)}")
    marked_ours = raw.get("format") == FORMAT_NAME and is_tensor_dict(raw.get("model"))
    foreign = None if marked_ours else foreign_state_dict(raw)
    if foreign is not None:
        flavour, state_dict = foreign
    elif is_tensor_dict(raw.get("model")):  # ours, or a plain state dict in glow.py's shapes
        flavour, state_dict = FORMAT_NAME, raw["model"]
    else:
        raise CheckpointError(f"{path} is not a WaveGlow checkpoint of a known flavour (upstream NVIDIA, Ascend, "
                              f"DeepLearningExamples or this project's): found {_describe(raw)}")
    state_dict = normalise_state_dict(state_dict)
    if not _looks_like_waveglow(state_dict):
        keys = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"{path} does not hold WaveGlow weights (no upsample / WN / convinv layers); "
                              f"its first keys are: {keys}. Is it a checkpoint of another model?")
    ours = flavour == FORMAT_NAME and raw.get("format") == FORMAT_NAME
    checkpoint = {k: v for k, v in raw.items() if k not in ("model", "state_dict")}
    if not ours:
        for key in ("config", "optimizer"):
            if key in checkpoint:
                checkpoint["source_" + key] = checkpoint.pop(key)
    checkpoint.update(
        model=OrderedDict((k, v.to(map_location)) for k, v in state_dict.items()),
        iteration=int(raw.get("iteration") or 0),
        optimizer=raw.get("optimizer") if ours else None,
        learning_rate=raw.get("learning_rate"),
        config=raw.get("config") if ours else None,
        flavour=flavour,
    )
    return checkpoint


def waveglow_config_from_state_dict(state_dict):
    """WaveGlow constructor arguments read off the weight shapes of a normalised state dict (the hop, a keyword of
    the constructor, from hop_length_from_state_dict)."""
    try:
        n_mel_channels = state_dict["upsample.weight"].shape[0]
        n_flows = len({int(m.group(1)) for m in (re.match(r"WN\.(\d+)\.", k) for k in state_dict) if m})
        channels = [state_dict[f"convinv.{k}.conv.weight"].shape[0] for k in range(n_flows)]
        start = state_dict.get("WN.0.start.weight_v", state_dict.get("WN.0.start.weight"))
        in_layer = state_dict.get("WN.0.in_layers.0.weight_v", state_dict.get("WN.0.in_layers.0.weight"))
        n_layers = len(layer_indices(state_dict, "WN.0.", "in_layers"))
        n_channels, kernel_size = start.shape[0], in_layer.shape[2]
    except (KeyError, AttributeError, IndexError, TypeError) as error:
        raise ValueError(f"cannot infer the WaveGlow architecture from these weights (missing {error})") from None
    n_group = channels[0]
    drops = [k for k in range(1, n_flows) if channels[k] < channels[k - 1]]
    if drops:
        n_early_every, n_early_size = drops[0], channels[drops[0] - 1] - channels[drops[0]]
    else:  # no early outputs at all
        n_early_every, n_early_size = n_flows, 0
    return {"n_mel_channels": n_mel_channels, "n_flows": n_flows, "n_group": n_group,
            "n_early_every": n_early_every, "n_early_size": n_early_size,
            "WN_config": {"n_layers": n_layers, "n_channels": n_channels, "kernel_size": kernel_size}}


def hop_length_from_state_dict(state_dict):
    """The hop (audio samples per mel frame) of any flavour's weights: the upsampler's kernel is 4 x its stride."""
    kernel = state_dict["upsample.weight"].shape[-1]
    if kernel % UPSAMPLE_KERNEL_PER_HOP:
        raise ValueError(f"its upsampler's kernel of {kernel} taps is not {UPSAMPLE_KERNEL_PER_HOP} x a hop length")
    return kernel // UPSAMPLE_KERNEL_PER_HOP


def _recorded_data_config(checkpoint):
    config = checkpoint.get("config")
    data = config.get("data_config") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def checkpoint_audio(checkpoint, path="checkpoint"):
    """{'sampling_rate', 'hop_length'} of a loaded checkpoint's model. The hop is read off the weights (any
    flavour's upsampler tells it); the rate is what the checkpoint records (ours: its config), else 22050 Hz for
    the upstream hop of 256 (every other flavour's published models), else None: unknown."""
    try:
        hop = hop_length_from_state_dict(checkpoint["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    rate = _recorded_data_config(checkpoint).get("sampling_rate")
    source_config = checkpoint.get("source_config")
    if rate is None and isinstance(source_config, dict):
        rate = source_config.get("sampling_rate")
    if rate is None and hop == DEFAULT_HOP_LENGTH:
        rate = UPSTREAM_SAMPLING_RATE
    return {"sampling_rate": int(rate) if rate is not None else None, "hop_length": hop}


def waveglow_config_of(checkpoint, path="checkpoint"):
    """The checkpoint's WaveGlow constructor arguments (without the hop): recorded in its config, else read
    off the weights (other flavours)."""
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("waveglow_config"), dict):
        return config["waveglow_config"]
    try:
        return waveglow_config_from_state_dict(checkpoint["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def build_model(checkpoint, path="checkpoint"):
    """A glow.WaveGlow (weight norm unfolded, training mode, CPU) holding the checkpoint's weights exactly, at
    the hop its upsampler was made for."""
    config = waveglow_config_of(checkpoint, path)
    hop = checkpoint_audio(checkpoint, path)["hop_length"]
    recorded_hop = _recorded_data_config(checkpoint).get("hop_length")
    if recorded_hop is not None and recorded_hop != hop:
        raise CheckpointError(f"{path}: its config records hop_length {recorded_hop}, but its upsampler is made "
                              f"for hop {hop}; the file is inconsistent (edited by hand?)")
    try:
        model = WaveGlow(**config, hop_length=hop)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its WaveGlow config {config} (hop {hop}) is not valid: {error}") from None
    try:
        model.load_state_dict(checkpoint["model"], strict=True)  # never a silent partial load
    except RuntimeError as error:
        # torch lists missing keys, unexpected keys and size mismatches, one kind per line; keep them short
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        details = "; ".join(d if len(d) < 240 else d[:240] + "..." for d in details[:4])
        raise CheckpointError(f"{path}: weights do not fit a WaveGlow with {config}: {details or error}; is "
                              f"this a WaveGlow checkpoint of another architecture, or a config that does not "
                              f"match it?") from None
    return model


# ---------------------------------------------------------------------------------------------------------
# Fitting a checkpoint to a configured model (train.py's resume and warm start)

class CheckpointMismatch(CheckpointError):
    """A checkpoint whose weights do not fit the configured model; the message names the config keys that differ,
    `keys` lists them."""

    def __init__(self, message, keys):
        super().__init__(message)
        self.keys = keys


def _shape_in(state_dict, name):
    """The shape `name` of a model would get from `state_dict`, where weight norm may be folded on either side."""
    if name in state_dict:
        return tuple(state_dict[name].shape)
    prefix, _, leaf = name.rpartition(".")
    plain, direction = state_dict.get(prefix + ".weight"), state_dict.get(prefix + ".weight_v")
    if leaf == "weight_v" and plain is not None:
        return tuple(plain.shape)
    if leaf == "weight_g" and plain is not None:
        return (plain.shape[0],) + (1,) * (plain.dim() - 1)
    if leaf == "weight" and direction is not None:
        return tuple(direction.shape)
    return None


def misfits(model, state_dict):
    """Names of the model's tensors that `state_dict` has none of the same shape for, then of the state dict's
    tensors the model has no place for (e.g. extra flows)."""
    expected = model.state_dict()
    missing = [name for name, tensor in expected.items() if _shape_in(state_dict, name) != tuple(tensor.shape)]
    places = {name.rpartition(".")[0] + leaf for name in expected for leaf in (".weight", ".weight_g", ".weight_v")}
    return missing + [name for name in state_dict if name not in expected and name not in places]


def _without_unused_exits(waveglow_config):
    # a model whose flows never reach an early exit is the same whatever n_early_every and n_early_size say;
    # written as the weights read (waveglow_config_from_state_dict), so that no difference is reported there
    config = dict(waveglow_config)
    n_flows, every = config.get("n_flows"), config.get("n_early_every")
    if isinstance(n_flows, int) and isinstance(every, int) and every > 0 and (
            (n_flows - 1) // every == 0 or config.get("n_early_size") == 0):
        config.update(n_early_every=n_flows, n_early_size=0)
    return config


def _differences(where, ours, theirs):
    """(where.key, 'where.key is A in the checkpoint, B in the config') for each key whose values differ (nested
    dicts too)."""
    lines = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(f"{where}.{key}", a, b)
        elif a != b:
            lines.append((f"{where}.{key}", f"{where}.{key} is {a!r} in the checkpoint, {b!r} in the config"))
    return lines


def mismatch(checkpoint, path, config, model, compare_hop=True):
    """CheckpointMismatch whose one line names the config keys with values other than the checkpoint's (the
    waveglow_config, recorded or read off other flavours' weights, and the hop), else the first misfit tensors."""
    ours = _without_unused_exits(waveglow_config_of(checkpoint, path))
    differences = _differences("waveglow_config", ours, _without_unused_exits(config["waveglow_config"]))
    hop = checkpoint_audio(checkpoint, path)["hop_length"]
    if compare_hop and hop != config["data_config"]["hop_length"]:
        differences.append(("data_config.hop_length", f"data_config.hop_length is {hop} in the checkpoint, "
                                                      f"{config['data_config']['hop_length']} in the config"))
    if not differences:
        differences = [(name, f"{name} does not fit") for name in misfits(model, checkpoint["model"])[:4]]
    return CheckpointMismatch(f"checkpoint {path} does not fit the config: " +
                              "; ".join(line for _, line in differences), [key for key, _ in differences])


def fit_weights(model, checkpoint, path, config, warm_start):
    """(the checkpoint's weights for `model`, a line naming what was not taken or None); model and config are
    the run's. A resume takes every tensor. A warm start takes every tensor but the upsampler's when the hop
    changed (it then starts fresh: its kernel is 4 x the hop). Anything else that does not fit raises
    CheckpointMismatch naming the config keys that differ, and nothing is ever dropped silently."""
    state_dict = checkpoint["model"]
    old_hop, new_hop = checkpoint_audio(checkpoint, path)["hop_length"], model.hop_length
    note = None
    if warm_start and old_hop != new_hop:
        upsampler = [name for name in state_dict if name.startswith("upsample.")]
        state_dict = {name: tensor for name, tensor in state_dict.items() if name not in upsampler}
        note = f"{', '.join(upsampler)} not taken: hop {old_hop} -> {new_hop} (the upsampler starts fresh)"
        problems = [name for name in misfits(model, state_dict) if not name.startswith("upsample.")]
    else:
        problems = misfits(model, state_dict)
    if problems:
        raise mismatch(checkpoint, path, config, model, compare_hop=not warm_start)
    return state_dict, note


def mel_setting_changes(checkpoint, path, data_config):
    """One line naming the mel settings (config.MEL_KEYS but the hop, which fit_weights handles) that the config
    changes from the checkpoint's, or None: the weights fit, but they learnt from other mels."""
    recorded = {**checkpoint_audio(checkpoint, path), **_recorded_data_config(checkpoint)}
    changes = [f"{key} {recorded[key]!r} -> {data_config[key]!r}" for key in MEL_KEYS
               if key != "hop_length" and recorded.get(key) is not None and recorded[key] != data_config[key]]
    return f"data_config changes the mel of {path}: {', '.join(changes)}" if changes else None


def load_model(path, device="cpu", for_inference=True):
    """(model, checkpoint): a glow.WaveGlow with the checkpoint's weights, on `device`.

    for_inference folds weight norm and switches to eval mode; otherwise the model stays trainable.
    """
    path = os.fspath(path)
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint, path)
    if for_inference:
        remove_weightnorm(model).eval()
    return model.to(device), checkpoint


def convert(input_path, output_path):
    """Rewrite any flavour as this project's format; returns the flavour read."""
    checkpoint = load_checkpoint(input_path)
    model = build_model(checkpoint, input_path)  # proves the weights load before anything is written
    if checkpoint["flavour"] == FORMAT_NAME and checkpoint.get("format") == FORMAT_NAME:
        converted = {k: v for k, v in checkpoint.items() if k != "flavour"}
    else:
        audio = checkpoint_audio(checkpoint, input_path)
        data = {key: value for key, value in audio.items() if value is not None}  # the rate may be unknown
        converted = {"iteration": checkpoint["iteration"], "learning_rate": checkpoint["learning_rate"],
                     "optimizer": None, "scaler": None,
                     "config": {"waveglow_config": waveglow_config_of(checkpoint, input_path), "data_config": data},
                     "converted_from": checkpoint["flavour"]}
    converted.update(model=model.state_dict(), format=FORMAT_NAME, format_version=FORMAT_VERSION)
    save_checkpoint(output_path, converted)
    return checkpoint["flavour"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a WaveGlow checkpoint of any flavour (NVIDIA upstream, "
                                                 "Ascend port, DeepLearningExamples) to this project's format")
    parser.add_argument("input", help="checkpoint to read")
    parser.add_argument("output", help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    try:
        flavour = convert(args.input, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.input} ({flavour}) -> {args.output} ({FORMAT_NAME} v{FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
