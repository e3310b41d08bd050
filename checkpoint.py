"""Checkpoints: this project's format out, atomically; every WaveGlow flavour in, safely.

Flavours read (see load_checkpoint):
  waveglow-pytorch  ours, written by train.py through save_checkpoint: 'model' (a state dict in glow.py's
                    names), 'format', 'format_version', and what resuming needs ('iteration', 'optimizer',
                    'config', 'rng', ...)
  nvidia-upstream   NVIDIA/waveglow's pickled glow.WaveGlow modules   } read by legacy_checkpoints.py, which
  ascend            the Ascend ModelZoo port's Conv2d-shaped weights  } describes each and why nothing in a
  nvidia-dle        NVIDIA DeepLearningExamples' 'state_dict'         } checkpoint ever runs as code

    python checkpoint.py INPUT OUTPUT      # any flavour -> this project's format
"""
import argparse
import os
import re
import secrets
import sys
from collections import OrderedDict

import torch

from glow import WaveGlow, remove_weightnorm
from legacy_checkpoints import (CheckpointError, conv1d_weight, foreign_state_dict, is_pickled_module, is_tensor_dict,
                                layer_indices, merge_split_layers, read_without_running_code)

FORMAT_NAME = "waveglow-pytorch"
FORMAT_VERSION = 1
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
    """WaveGlow constructor arguments read off the weight shapes of a normalised state dict."""
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


def _model_config(checkpoint, path):
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("waveglow_config"), dict):
        return config["waveglow_config"]
    try:
        return waveglow_config_from_state_dict(checkpoint["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def build_model(checkpoint, path="checkpoint"):
    """A glow.WaveGlow (weight norm unfolded, training mode, CPU) holding the checkpoint's weights exactly."""
    config = _model_config(checkpoint, path)
    try:
        model = WaveGlow(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its WaveGlow config {config} is not valid: {error}") from None
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
        converted = {"iteration": checkpoint["iteration"], "learning_rate": checkpoint["learning_rate"],
                     "optimizer": None, "scaler": None,
                     "config": {"waveglow_config": _model_config(checkpoint, input_path)},
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
