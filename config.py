"""The configuration: every key with its default, the flags that override keys, the checks, and the loaders.

    config, args = resolve_config(argv)        # train.py: config.json, then its flags on top, all of it checked
    config = load_config("config.json")        # the mel scripts: merged with the defaults, data_config checked
    data, sigma, source = checkpoint_data_config(checkpoint, config_path)   # inference.py's mel settings

A config file may leave keys out but not add unknown ones; a wrong key or value raises ConfigError naming it.
Only the standard library here, so reading a config never loads torch or the model.
"""
import argparse
import json
import math
import os

REPO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")
# The data_config keys that define the mel: a loader wants them given, since a mel made with settings other
# than the model's training ones sounds wrong, and a silent default would hide that.
MEL_KEYS = ("sampling_rate", "filter_length", "hop_length", "win_length", "mel_fmin", "mel_fmax")

# The first four train_config keys through with_tensorboard are upstream's; the ones after are this repo's.
DEFAULTS = {
    "train_config": {
        "fp16_run": False,            # mixed precision: fp16 on CUDA/NPU, bfloat16 on CPUs
        "output_directory": "checkpoints",
        "epochs": 100000,
        "learning_rate": 1e-4,
        "sigma": 1.0,                 # std of the Gaussian prior in training
        "iters_per_checkpoint": 2000,
        "batch_size": 12,             # per process
        "seed": 1234,
        "checkpoint_path": "",        # resume (ours) or warm start (other flavours, or ours with warm_start)
        "with_tensorboard": False,    # tensorboardX logs in {output_directory}/logs
        "warm_start": False,          # load only the weights of checkpoint_path, start at iteration 0
        "step_stop": 0,               # stop once this many iterations are done (0: no limit)
        "device": "auto",             # auto | cuda | npu | cpu (optionally with :index)
        "amp_backend": "native",      # native (torch.autocast + GradScaler) | apex (O2, where installed)
        "validation_files": "",       # held-out list or folder; "" skips validation
        "iters_per_validation": 2000,  # 0: validate at the end only
        "workers": 1,                 # DataLoader worker processes per rank
        "grad_clip_thresh": 0.0,      # clip the gradient norm to this (0: no clipping)
        "max_nonfinite_steps": 20,    # stop after this many non-finite steps in a row
        "strict_data": False,         # an unusable audio file stops the run (default: skipped and counted)
        "amp_dtype": "auto",          # fp16_run's dtype: auto (fp16 on CUDA/NPU, bf16 on CPUs) | float16 | bfloat16
        "compile": False,             # torch.compile the coupling networks (pays on GPUs; a minute to compile)
        "grad_accum_steps": 1,        # micro-batches of batch_size per update: the update of batch_size x this
    },
    "data_config": {
        "training_files": "train_files.txt",
        "segment_length": 16000,
        "sampling_rate": 22050,
        "filter_length": 1024,
        "hop_length": 256,
        "win_length": 1024,
        "mel_fmin": 0.0,
        "mel_fmax": 8000.0,
    },
    "dist_config": {
        "dist_backend": "auto",       # auto: nccl on CUDA, hccl on NPU, gloo on CPU
        "dist_url": "tcp://localhost:54321",  # rendezvous for the upstream `-r RANK` style only
        "dist_timeout": 1800,         # seconds a collective may wait for a peer before the run fails
    },
    "waveglow_config": {
        "n_mel_channels": 80,
        "n_flows": 12,
        "n_group": 8,
        "n_early_every": 4,
        "n_early_size": 2,
        "WN_config": {"n_layers": 8, "n_channels": 256, "kernel_size": 3},
    },
}

# Flags that override config keys: (names, section, key). Single-dash names are the Ascend port's.
OVERRIDES = [(("-" + key, "--" + key), "train_config", key) for key in (
    "fp16_run", "output_directory", "epochs", "learning_rate", "sigma", "iters_per_checkpoint", "seed",
    "checkpoint_path", "with_tensorboard", "step_stop", "warm_start", "device", "amp_backend",
    "validation_files", "iters_per_validation", "workers", "grad_clip_thresh", "max_nonfinite_steps", "strict_data",
    "amp_dtype", "compile", "grad_accum_steps")]
OVERRIDES += [(("-batch_size", "--batch_size", "--batch-size"), "train_config", "batch_size"),
              (("-training_files", "--training_files"), "data_config", "training_files"),
              (("-segment_length", "--segment_length"), "data_config", "segment_length"),
              (("-dist_backend", "--dist_backend"), "dist_config", "dist_backend"),
              (("-dist_timeout", "--dist_timeout"), "dist_config", "dist_timeout")]
NULLABLE = {("data_config", "mel_fmax")}  # None: up to half the sampling rate

# (section, keys, test, what a failing value breaks); checked in this order, so the first problem is reported
RANGE_RULES = [
    ("train_config", ("epochs", "iters_per_checkpoint", "batch_size", "max_nonfinite_steps"), lambda v: v > 0,
     "must be positive"),
    ("train_config", ("grad_accum_steps",), lambda v: v > 0, "must be positive (1: no accumulation)"),
    ("train_config", ("learning_rate", "sigma"), lambda v: v > 0, "must be positive"),
    ("train_config", ("step_stop", "iters_per_validation", "workers", "grad_clip_thresh"), lambda v: v >= 0,
     "must not be negative"),
    ("data_config", ("segment_length", "sampling_rate", "filter_length", "hop_length", "win_length"),
     lambda v: v > 0, "must be positive"),
    ("data_config", ("mel_fmin",), lambda v: v >= 0, "must not be negative"),
    ("dist_config", ("dist_timeout",), lambda v: v > 0, "must be positive (seconds)"),
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file and what to do."""


def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, 1/0 or yes/no, got {text!r}")


def build_parser():
    """train.py's command line: -c, upstream's -r and -g, and one flag per OVERRIDES entry."""
    parser = argparse.ArgumentParser(description="Train WaveGlow.", allow_abbrev=False)
    parser.add_argument("-c", "--config", default="config.json", help="JSON configuration (default: config.json)")
    parser.add_argument("-r", "--rank", type=int, default=None,
                        help="upstream style: this process's rank; world size from WORLD_SIZE or the local "
                             "device count, rendezvous at dist_config.dist_url (torchrun needs neither)")
    parser.add_argument("-g", "--group_name", default="", help="upstream style: accepted, only logged")
    for names, section, key in OVERRIDES:
        default = DEFAULTS[section][key]
        if isinstance(default, bool):
            parser.add_argument(*names, dest=key, type=parse_bool, nargs="?", const=True, metavar="BOOL",
                                help=f"overrides {section}.{key} (true/false/1/0/yes/no)")
        else:
            parser.add_argument(*names, dest=key, type=type(default), help=f"overrides {section}.{key}")
    return parser


def merge(defaults, given, where):
    """defaults updated with `given`, rejecting unknown keys and values of the wrong type by name."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where} must be a JSON object, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}".replace(" .", " ") +
                          f" (known: {', '.join(sorted(defaults))})")
    merged = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        name = f"{where}.{key}".lstrip(".")
        if isinstance(default, dict):
            value = merge(default, value, name)
        elif value is None and tuple(name.split(".")) in NULLABLE:
            pass
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        merged[key] = value
    return merged


def _check_ranges(config, sections):
    for section, keys, ok, problem in RANGE_RULES:
        for key in keys:
            if section in sections and not ok(config[section][key]):
                raise ConfigError(f"{section}.{key} {problem}, got {config[section][key]!r}")


def _check_mel_settings(data):
    if data["win_length"] > data["filter_length"]:
        raise ConfigError(f"data_config.win_length {data['win_length']} exceeds filter_length {data['filter_length']}")
    if data["hop_length"] > data["win_length"]:
        raise ConfigError(f"data_config.hop_length {data['hop_length']} exceeds win_length {data['win_length']}: "
                          f"the mel's frames would skip audio between them")
    if data["mel_fmax"] is not None and not data["mel_fmin"] < data["mel_fmax"] <= data["sampling_rate"] / 2:
        raise ConfigError(f"data_config.mel_fmax must lie above mel_fmin and at most half the sampling rate, "
                          f"got {data['mel_fmax']!r}")


def n_groups_for_hop(hop_length):
    """The n_group values a hop allows: even (each coupling halves the channels) and dividing the hop (a mel
    frame's samples fold into whole groups). glow.py uses it too when it builds a model."""
    return [g for g in range(2, hop_length + 1, 2) if hop_length % g == 0]


def _check_n_group_fits_hop(n_group, hop_length):
    # The upsampler's stride is data_config.hop_length (glow.WaveGlow's hop_length), and the model folds
    # the upsampled mel into groups of n_group samples, so a frame must hold whole groups.
    if isinstance(n_group, int) and n_group > 0 and (hop_length % n_group or n_group % 2):
        raise ConfigError(f"waveglow_config.n_group {n_group} does not fit data_config.hop_length {hop_length}: "
                          f"n_group must be even and divide the hop; values that work for hop {hop_length}: "
                          f"{', '.join(map(str, n_groups_for_hop(hop_length)))}")


def check_data_values(config):
    """The checks a merged config's data_config must pass to make mels (any hop: the mel scripts allow one)."""
    _check_ranges(config, ("data_config",))
    _check_mel_settings(config["data_config"])


def check_values(config):
    """Every check a training run's merged config must pass; raises ConfigError naming the first problem."""
    train, data, model = config["train_config"], config["data_config"], config["waveglow_config"]
    _check_ranges(config, ("train_config", "data_config", "dist_config"))
    if train["device"].split(":")[0] not in ("auto", "cuda", "npu", "cpu"):
        raise ConfigError(f"train_config.device must be auto, cuda, npu or cpu, got {train['device']!r}")
    if train["amp_backend"] not in ("native", "apex"):
        raise ConfigError(f"train_config.amp_backend must be native or apex, got {train['amp_backend']!r}")
    if train["amp_dtype"] not in ("auto", "float16", "bfloat16"):
        raise ConfigError(f"train_config.amp_dtype must be auto, float16 or bfloat16, got {train['amp_dtype']!r}")
    if config["dist_config"]["dist_backend"] not in ("auto", "nccl", "hccl", "gloo"):
        raise ConfigError("dist_config.dist_backend must be auto, nccl, hccl or gloo, "
                          f"got {config['dist_config']['dist_backend']!r}")
    if not data["training_files"]:
        raise ConfigError("data_config.training_files is empty: give a file list or an LJ-Speech folder")
    _check_mel_settings(data)
    _check_n_group_fits_hop(model["n_group"], data["hop_length"])
    segment, n_group = data["segment_length"], model["n_group"]
    if isinstance(n_group, int) and n_group > 0 and segment % n_group:
        raise ConfigError(f"data_config.segment_length {segment} must be a multiple of waveglow_config.n_group "
                          f"{n_group} (the model folds the audio into groups of n_group samples)")
    # A training segment's mel is one STFT of filter_length-sample windows with filter_length/2 of reflect
    # padding each side: a segment shorter than one window gives mels made mostly of padding (and under
    # filter_length/2 samples the padding itself fails).
    if segment < data["filter_length"]:
        raise ConfigError(f"data_config.segment_length {segment} is shorter than one STFT window "
                          f"(filter_length {data['filter_length']}); use at least that, 16000 is upstream's")


def read_config_file(path):
    """The JSON object in the file at `path`, as given (not merged); ConfigError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            given = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass -c path/to/config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid JSON: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if not isinstance(given, dict):
        raise ConfigError(f"config file {path} must hold a JSON object with train_config, data_config, "
                          f"dist_config and waveglow_config sections, got {type(given).__name__}")
    return given


def resolve_config(argv=None):
    """(config, args) for train.py: config.json merged with the defaults and the flags, checked. Raises ConfigError."""
    args = build_parser().parse_args(argv)
    config = merge(DEFAULTS, read_config_file(args.config), "")
    for _, section, key in OVERRIDES:
        if getattr(args, key) is not None:
            config[section][key] = merge({key: DEFAULTS[section][key]}, {key: getattr(args, key)}, section)[key]
    check_values(config)
    return config, args


def load_config(path):
    """The config at `path` for the scripts that make mels or models (inference.py, mel2samp.py, bench.py):
    merged with the defaults (unknown keys rejected) and its data_config checked. The MEL_KEYS must be given."""
    given = read_config_file(path)
    data = given.get("data_config")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} has no 'data_config' section (see config.json in this repo)")
    missing = [key for key in MEL_KEYS if key not in data]
    if missing:
        raise ConfigError(f"config {path}: data_config lacks {', '.join(missing)} (see config.json in this repo)")
    config = merge(DEFAULTS, given, "")
    check_data_values(config)
    return config


def checkpoint_data_config(checkpoint, config_path=None, default_path=REPO_CONFIG):
    """(data_config, training sigma, where they came from) for the mels of a checkpoint's model.

    `config_path` (inference.py's -c) wins; else the config the checkpoint was trained with, where it has the
    MEL_KEYS; else `default_path`, the repo's config.json. `checkpoint` is checkpoint.load_checkpoint's dict.
    """
    if not config_path:
        config = checkpoint.get("config") or {}
        data = config.get("data_config") if isinstance(config, dict) else None
        if isinstance(data, dict) and all(key in data for key in MEL_KEYS):
            return data, config.get("train_config", {}).get("sigma", 1.0), "the checkpoint's config"
        config_path = default_path
    config = load_config(config_path)
    return config["data_config"], config["train_config"]["sigma"], config_path
