"""Reading WaveGlow checkpoints written by other code bases, without running anything stored in them.

The flavours and how each one looks on disk:

  nvidia-upstream   NVIDIA/waveglow's train.py and the published waveglow_256channels*.pt files:
                    {'model': <a whole pickled glow.WaveGlow>, 'iteration', 'optimizer', 'learning_rate'}.
                    The module still carries torch's WeightNorm hooks (weight_g / weight_v per conv).
                    Older ones have one cond conv per layer (WN.k.cond_layers.i) instead of the shared
                    WN.k.cond_layer, and/or separate res_layers.i + skip_layers.i instead of
                    res_skip_layers.i. Published files use torch's pre-1.6 ("legacy") file format.
  ascend            the Ascend ModelZoo port: {'model': <state dict>, 'iteration', 'optimizer',
                    'learning_rate'}, but every Conv1d there was a Conv2d, so conv weights have a trailing
                    dimension of 1 (weight_v (512, 256, 3, 1), weight_g (512, 1, 1, 1)).
  nvidia-dle        NVIDIA DeepLearningExamples: {'state_dict', 'config', 'epoch', 'optimizer'}; keys may
                    carry DDP's 'module.' prefix, and conditioning is per layer (WN.k.cond_layers.i).

Why the unpickler is restricted: a pickle is a program, and torch.load(weights_only=False) runs whatever
callable the file names (os.system included). Every file therefore first goes through
torch.load(weights_only=True), torch's own audited reader, with the module classes upstream pickles
(glow.WaveGlow, nn.Conv1d, the WeightNorm hook, ...) registered as inert placeholders (_PickledObject)
that only keep their attribute dicts; the tensors are then collected by name (_module_state_dict). That
reader refuses pickled modules in the legacy format, so those files alone go through torch's legacy
loader driven by RestrictedUnpickler (_read_legacy_modules), which allows exactly:
  - tensor and parameter rebuilders of torch._utils, torch.Size, torch.device, the torch dtypes,
  - OrderedDict, set and frozenset,
  - placeholders for classes named under glow., glow_old., torch.nn.modules., torch.nn.parallel.,
    torch.nn.utils.weight_norm. or __main__.{WaveGlow, WN, Invertible1x1Conv}: the real class never runs,
    so these prefixes only decide which names may appear, not what code runs,
and refuses every other global with an error naming the file and the global.

Merging split layers is exact: weight norm is per output channel, so the g and v of per-layer convs stack
along the output dimension into the one conv glow.py has.
"""
import os
import pickle
import re
import warnings
from collections import OrderedDict

import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be read, written or used; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Placeholders for pickled classes

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


# ---------------------------------------------------------------------------------------------------------
# Reading a file

def read_without_running_code(path):
    """The raw object stored in `path` (any flavour), loaded on the CPU without executing anything from it."""
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


def is_pickled_module(value):
    """Whether `value` is what a whole pickled module (torch.save(model)) was read back as."""
    return isinstance(value, _PickledObject)


def is_tensor_dict(value):
    return isinstance(value, dict) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


def foreign_state_dict(raw):
    """(flavour, state dict) of a raw checkpoint dict written by another code base, or None if it is not one.

    A plain 'model' state dict without Conv2d-shaped weights is not foreign: the caller takes it as ours.
    """
    if is_pickled_module(raw.get("model")):
        return "nvidia-upstream", _module_state_dict(raw["model"])
    if is_tensor_dict(raw.get("state_dict")):
        return "nvidia-dle", raw["state_dict"]
    if is_tensor_dict(raw.get("model")) and any(v.dim() == 4 for v in raw["model"].values()):
        return "ascend", raw["model"]
    return None


# ---------------------------------------------------------------------------------------------------------
# Foreign names and shapes -> glow.py's

def conv1d_weight(value):
    """A tensor of the Ascend port's Conv2d layers with its dimension of 1 dropped; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        if value.size(-1) == 1:
            return value.squeeze(-1)
        if value.size(-2) == 1:
            return value.squeeze(-2)
    return value


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


def layer_indices(state_dict, flow_prefix, group):
    """The sorted i of the keys `{flow_prefix}{group}.i.*` in `state_dict`."""
    pattern = re.compile(re.escape(f"{flow_prefix}{group}.") + r"(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, state_dict) if m})


def merge_split_layers(state_dict):
    """In place: per-layer cond_layers and separate res_layers / skip_layers become glow.py's layers."""
    flows = sorted({int(m.group(1)) for m in (re.match(r"WN\.(\d+)\.", k) for k in state_dict) if m})
    for k in flows:
        flow = f"WN.{k}."
        cond = layer_indices(state_dict, flow, "cond_layers")
        if cond:  # per-layer conditioning (older upstream, DeepLearningExamples) -> one shared cond_layer
            _concat_layers(state_dict, [f"{flow}cond_layers.{i}." for i in cond], f"{flow}cond_layer.")
        skips = layer_indices(state_dict, flow, "skip_layers")
        if skips:  # older upstream: separate residual and skip 1x1 convs -> res_skip_layers
            res = set(layer_indices(state_dict, flow, "res_layers"))
            for i in skips:
                residual = [f"{flow}res_layers.{i}."] if i < len(skips) - 1 and i in res else []
                _concat_layers(state_dict, residual + [f"{flow}skip_layers.{i}."], f"{flow}res_skip_layers.{i}.")
            for key in [key for key in state_dict if key.startswith(f"{flow}res_layers.")]:
                del state_dict[key]  # a residual conv after the last layer feeds nothing
