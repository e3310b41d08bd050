"""Checkpoints: every WaveGlow flavour in, safely; this project's format out, atomically.

Flavours read (see load_checkpoint):
  nvidia-upstream   NVIDIA/waveglow train.py and the published .pt files: a whole pickled glow.WaveGlow
                    (weight norm hooks), possibly with the older cond_layers / res_layers + skip_layers
  ascend            the Ascend ModelZoo port: a state dict whose Conv1d weights were Conv2d (trailing dim 1)
  nvidia-dle        NVIDIA DeepLearningExamples: 'state_dict' (maybe 'module.'-prefixed), per-layer cond_layers
  waveglow-pytorch  ours, written by train.py through save_checkpoint

Nothing in a checkpoint runs as code. Every file first goes through torch.load(weights_only=True),
torch's own audited reader, with the module classes upstream pickles (glow.WaveGlow, nn.Conv1d, the
WeightNorm hook) registered as inert placeholders that only keep their attributes (_PickledObject);
their tensors are then collected by name. That reader refuses pickled modules in the "legacy" file
format of torch < 1.6, in which upstream's published checkpoints were saved, so those alone go through
torch's legacy loader driven by a restricted unpickler that hands out the same placeholders and tensor
rebuilders and refuses every other global.

    python checkpoint.py INPUT OUTPUT      # any flavour -> this project's format
"""
import argparse
import os
import pickle
import re
import secrets
import sys
import warnings
from collections import OrderedDict

import torch

from glow import WaveGlow, remove_weightnorm

FORMAT_NAME = "waveglow-pytorch"
FORMAT_VERSION = 1
TEMP_SUFFIX = ".tmp"  # save_checkpoint writes ".<name>.<random>.tmp" first, then renames it to <name>


class CheckpointError(Exception):
    """A checkpoint that cannot be read, written or used; the message names the file and what to do."""


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
# Reading without running code

class _PickledObject:
    """Stands in for a pickled class (glow.WaveGlow, nn.Conv1d, the WeightNorm hook, ...).

    Unpickling calls __new__ and __setstate__ only; here they keep the attribute dict and run nothing,
    so a module's _parameters / _buffers / _modules can be walked like plain data.
    """
    pickled_name = "?"
    state = None

    def __init__(self, *args, **kwargs):  # reached only if a pickle calls the class; do nothing
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = state[0]
        self.state = state if isinstance(state, dict) else {}


# Classes upstream checkpoints pickle. Others under these prefixes get a placeholder too: a placeholder
# never runs the real class, so the prefix only decides which names may appear, not what code runs.
_KNOWN_PICKLED_CLASSES = [
    "glow.WaveGlow", "glow.WN", "glow.Invertible1x1Conv",
    "glow_old.WaveGlow", "glow_old.WN", "glow_old.Invertible1x1Conv",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.ConvTranspose1d",
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv.ConvTranspose2d",
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    "torch.nn.utils.weight_norm.WeightNorm",
]
_PLACEHOLDER_PREFIXES = ("glow.", "glow_old.", "torch.nn.modules.", "torch.nn.parallel.", "torch.nn.utils.weight_norm.")
_PLACEHOLDER_MAIN = {"__main__.WaveGlow", "__main__.WN", "__main__.Invertible1x1Conv"}


def _may_be_placeholder(full_name):
    return full_name.startswith(_PLACEHOLDER_PREFIXES) or full_name in _PLACEHOLDER_MAIN


def _placeholder(full_name):
    return type(full_name.rsplit(".", 1)[1], (_PickledObject,), {"pickled_name": full_name})


def _unsupported_global(error):
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def _short_reason(error):
    text = str(error)
    found = re.search(r"WeightsUnpickler error: (.*)", text)
    return (found.group(1) if found else text.strip().splitlines()[0] if text.strip() else repr(error)).strip()


def _read(path):
    """The raw object stored in `path`, loaded on the CPU without executing anything from the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or save?")
    placeholders = {name: _placeholder(name) for name in _KNOWN_PICKLED_CLASSES}
    for _ in range(64):  # each round may discover one more module class name
        try:
            safe = [(cls, name) for name, cls in placeholders.items()]
            with warnings.catch_warnings(), torch.serialization.safe_globals(safe):
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            name = _unsupported_global(error)
            if name is not None and _may_be_placeholder(name) and name not in placeholders:
                placeholders[name] = _placeholder(name)
                continue
            if name is not None:
                raise CheckpointError(f"refusing to load {path}: it needs the Python global {name}, which is "
                                      f"not tensor data or a WaveGlow/torch.nn module, so loading it could run "
                                      f"code from the file. If you trust where it came from, load it with "
                                      f"torch.load(weights_only=False) yourself and save its state_dict()") from None
            if "Only persistent_load of storage" in str(error):
                # torch's weights_only reader refuses the pre-1.6 (legacy) format whenever it contains
                # pickled modules, which every published upstream checkpoint does
                return _read_legacy_modules(path, placeholders)
            raise CheckpointError(f"cannot read checkpoint {path}: {_short_reason(error)}") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
            raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
                                  f"PyTorch checkpoint ({_short_reason(error)}); copy or download it again") from None
    raise CheckpointError(f"cannot read checkpoint {path}: too many distinct module classes in it")


# Globals a plain tensor checkpoint needs (the same set torch's weights_only reader allows for them).
def _restricted_globals():
    allowed = {"collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.frozenset": frozenset,
               "torch.Size": torch.Size, "torch.device": torch.device,
               "torch.nn.parameter.Parameter": torch.nn.Parameter}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


def _read_legacy_modules(path, placeholders):
    """Read a legacy-format file holding pickled modules with a restricted unpickler.

    torch's legacy reader does the storage bookkeeping; every global the pickle names passes through
    find_class below, which returns tensor rebuilders, containers and placeholders, and refuses the rest.
    """
    allowed = _restricted_globals()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            import _compat_pickle  # map Python 2 names (torch.save uses protocol 2) as pickle itself does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            full_name = f"{module}.{name}"
            if full_name in allowed:
                return allowed[full_name]
            if _may_be_placeholder(full_name):
                return placeholders.setdefault(full_name, _placeholder(full_name))
            raise CheckpointError(f"refusing to load {path}: it needs the Python global {full_name}, which "
                                  f"is not tensor data or a WaveGlow/torch.nn module")

    class RestrictedPickle:  # the two names torch.load uses from a pickle module
        Unpickler = RestrictedUnpickler

        @staticmethod
        def load(file, **kwargs):
            return RestrictedUnpickler(file, **kwargs).load()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "couldn't retrieve source code for container" notes
            # weights_only=False only hands the reading to RestrictedPickle; it runs nothing itself
            return torch.load(path, map_location="cpu", pickle_module=RestrictedPickle, weights_only=False)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
                              f"PyTorch checkpoint ({_short_reason(error)})") from None


def _module_state_dict(module, prefix=""):
    """Tensors of a placeholder module tree by dotted name, as nn.Module.state_dict() would name them."""
    state = module.state or {}
    tensors = OrderedDict()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skip:
                tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _PickledObject):
            tensors.update(_module_state_dict(child, f"{prefix}{name}."))
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Normalising a state dict to glow.py's names

def _weight(state_dict, prefix):
    """The effective conv weight of the layer at `prefix` (weight norm folded)."""
    if prefix + "weight" in state_dict:
        return state_dict[prefix + "weight"]
    g, v = state_dict[prefix + "weight_g"], state_dict[prefix + "weight_v"]
    return v * (g / torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))


def _concat_layers(state_dict, prefixes, new_prefix):
    """Stack conv layers along the output channels into one layer.

    Weight norm is per output channel, so stacking g and v row-wise is exact; layers stored in mixed
    forms are folded to plain weights first.
    """
    if all(p + "weight_g" in state_dict and p + "weight_v" in state_dict for p in prefixes):
        names = ["weight_g", "weight_v"]
    else:
        for p in prefixes:
            state_dict[p + "weight"] = _weight(state_dict, p)
        names = ["weight"]
    if all(p + "bias" in state_dict for p in prefixes):
        names.append("bias")
    for name in names:
        state_dict[new_prefix + name] = torch.cat([state_dict[p + name] for p in prefixes], 0)
    for p in prefixes:
        for key in [k for k in state_dict if k.startswith(p)]:
            del state_dict[key]


def _layer_indices(state_dict, flow_prefix, group):
    pattern = re.compile(re.escape(f"{flow_prefix}{group}.") + r"(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, state_dict) if m})


def normalise_state_dict(state_dict):
    """Any flavour's WaveGlow state dict -> glow.py's names and shapes (a new dict)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        # DDP ('module.') and torch.compile ('_orig_mod.') wrappers add a name segment anywhere
        key = ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))
        if isinstance(value, torch.Tensor) and value.dim() == 4:  # the Ascend port's Conv2d weights
            if value.size(-1) == 1:
                value = value.squeeze(-1)
            elif value.size(-2) == 1:
                value = value.squeeze(-2)
        out[key] = value
    flows = sorted({int(m.group(1)) for m in (re.match(r"WN\.(\d+)\.", k) for k in out) if m})
    for k in flows:
        flow = f"WN.{k}."
        cond = _layer_indices(out, flow, "cond_layers")
        if cond:  # per-layer conditioning (older upstream, DeepLearningExamples) -> one shared cond_layer
            _concat_layers(out, [f"{flow}cond_layers.{i}." for i in cond], f"{flow}cond_layer.")
        skips = _layer_indices(out, flow, "skip_layers")
        if skips:  # older upstream: separate residual and skip 1x1 convs -> res_skip_layers
            res = set(_layer_indices(out, flow, "res_layers"))
            for i in skips:
                residual = [f"{flow}res_layers.{i}."] if i < len(skips) - 1 and i in res else []
                _concat_layers(out, residual + [f"{flow}skip_layers.{i}."], f"{flow}res_skip_layers.{i}.")
            for key in [key for key in out if key.startswith(f"{flow}res_layers.")]:
                del out[key]  # a residual conv after the last layer feeds nothing
    return out


def _looks_like_waveglow(state_dict):
    return ("upsample.weight" in state_dict and "convinv.0.conv.weight" in state_dict
            and any(k.startswith("WN.0.") for k in state_dict))


def _is_tensor_dict(value):
    return isinstance(value, dict) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


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
    raw = _read(path)
    if isinstance(raw, _PickledObject):  # torch.save(model) alone
        raw = {"model": raw}
    if _is_tensor_dict(raw):  # a state dict saved alone
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a WaveGlow checkpoint: it holds {_describe(raw)}")
    if raw.get("format") == FORMAT_NAME and _is_tensor_dict(raw.get("model")):
        flavour, state_dict = FORMAT_NAME, raw["model"]
    elif isinstance(raw.get("model"), _PickledObject):
        flavour, state_dict = "nvidia-upstream", _module_state_dict(raw["model"])
    elif _is_tensor_dict(raw.get("state_dict")):
        flavour, state_dict = "nvidia-dle", raw["state_dict"]
    elif _is_tensor_dict(raw.get("model")):
        four_d = any(v.dim() == 4 for v in raw["model"].values())
        flavour, state_dict = ("ascend" if four_d else FORMAT_NAME), raw["model"]
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
        n_layers = len(_layer_indices(state_dict, "WN.0.", "in_layers"))
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
