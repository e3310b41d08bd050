"""Train WaveGlow: one process per device, one visible loop.

    python train.py -c config.json                                 # one device (CUDA, Ascend NPU or CPU)
    torchrun --nproc_per_node=8 train.py -c config.json            # 8 devices (or: python distributed.py -c ...)
    python train.py -c config.json -checkpoint_path checkpoints/waveglow_4000     # resume exactly

Configuration is data: config.json, then command-line flags on top (the Ascend port's single-dash flags
and their double-dash forms). The resolved configuration is written to {output_directory}/config.json and
into every checkpoint. Rank 0 prints the lines the launchers grep:

    {iteration}:\tloss:{loss}\ttime:{seconds}\t      loss averaged over all ranks, seconds of this iteration
    Epoch {epoch} FPS:{fps}                          clips/s over all ranks, timed from the epoch's 5th iteration
    Epoch {epoch} samples/s:{rate}                   the same as output audio samples/s (DeepLearningExamples' unit)
    Validation loss {iteration}: {loss}              NLL of the held-out list (validation_files)

Signals: SIGTERM or SIGINT finish the current step, save a checkpoint and exit (code 0 for SIGTERM,
130 for SIGINT, the shell convention); a second SIGINT stops at once. Other exit codes: 2 for a
configuration error, 1 for unusable data or checkpoints and for max_nonfinite_steps non-finite steps
in a row (such steps are skipped and never change the weights).

Faults: unusable training files (unreadable, empty, NaN samples, shorter than a hop) are skipped and
counted, or stop the run naming the file with strict_data. Checkpoints are written atomically, so a
kill -9 leaves the previous ones whole (and the hidden partial file is removed at the next start); a
save that fails (disk full) stops the run naming the last good checkpoint. dist_timeout bounds how long
a rank waits for a dead or hung peer.
"""
import argparse
import atexit
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from checkpoint import (FORMAT_NAME, FORMAT_VERSION, CheckpointError, load_checkpoint, remove_interrupted_saves,
                        save_checkpoint)
from distributed import (all_reduce_sum, autocast_dtype, cleanup_distributed, load_apex_amp, make_grad_scaler,
                         setup_distributed, unwrap, wrap_ddp)
from evaluate import validation_nll
from glow import UPSAMPLE_STRIDE, WaveGlow, WaveGlowLoss, compile_coupling_networks
from mel2samp import AudioError, Mel2Samp

# ---------------------------------------------------------------------------------------------------
# Configuration. Every key and its default; a config file may leave keys out but not add unknown ones.
# The first four sections are upstream's; the train_config keys after with_tensorboard are this repo's.

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
    "amp_dtype", "compile")]
OVERRIDES += [(("-batch_size", "--batch_size", "--batch-size"), "train_config", "batch_size"),
              (("-training_files", "--training_files"), "data_config", "training_files"),
              (("-segment_length", "--segment_length"), "data_config", "segment_length"),
              (("-dist_backend", "--dist_backend"), "dist_config", "dist_backend"),
              (("-dist_timeout", "--dist_timeout"), "dist_config", "dist_timeout")]
NULLABLE = {("data_config", "mel_fmax")}  # None: up to half the sampling rate


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


def check_values(config):
    train, data, model = config["train_config"], config["data_config"], config["waveglow_config"]
    rules = [
        ("train_config", ("epochs", "iters_per_checkpoint", "batch_size", "max_nonfinite_steps"), lambda v: v > 0,
         "must be positive"),
        ("train_config", ("learning_rate", "sigma"), lambda v: v > 0, "must be positive"),
        ("train_config", ("step_stop", "iters_per_validation", "workers", "grad_clip_thresh"), lambda v: v >= 0,
         "must not be negative"),
        ("data_config", ("segment_length", "sampling_rate", "filter_length", "hop_length", "win_length"),
         lambda v: v > 0, "must be positive"),
        ("data_config", ("mel_fmin",), lambda v: v >= 0, "must not be negative"),
        ("dist_config", ("dist_timeout",), lambda v: v > 0, "must be positive (seconds)"),
    ]
    for section, keys, ok, problem in rules:
        for key in keys:
            if not ok(config[section][key]):
                raise ConfigError(f"{section}.{key} {problem}, got {config[section][key]!r}")
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
    if data["win_length"] > data["filter_length"]:
        raise ConfigError(f"data_config.win_length {data['win_length']} exceeds filter_length {data['filter_length']}")
    if data["mel_fmax"] is not None and not data["mel_fmin"] < data["mel_fmax"] <= data["sampling_rate"] / 2:
        raise ConfigError(f"data_config.mel_fmax must lie above mel_fmin and at most half the sampling rate, "
                          f"got {data['mel_fmax']!r}")
    if data["hop_length"] != UPSAMPLE_STRIDE:
        raise ConfigError(f"data_config.hop_length must be {UPSAMPLE_STRIDE}, got {data['hop_length']}: the model's "
                          f"upsampler turns each mel frame into {UPSAMPLE_STRIDE} samples, so mels of another hop "
                          f"would not line up with the audio")
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


def resolve_config(argv=None):
    """(config, args): config.json merged with the defaults and the flags, checked. Raises ConfigError."""
    args = build_parser().parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as f:
            given = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {args.config} not found: pass -c path/to/config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {args.config} is not valid JSON: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {args.config}: {error}") from None
    if not isinstance(given, dict):
        raise ConfigError(f"config file {args.config} must hold a JSON object with train_config, data_config, "
                          f"dist_config and waveglow_config sections, got {type(given).__name__}")
    config = merge(DEFAULTS, given, "")
    for _, section, key in OVERRIDES:
        if getattr(args, key) is not None:
            config[section][key] = merge({key: DEFAULTS[section][key]}, {key: getattr(args, key)}, section)[key]
    check_values(config)
    return config, args


# ---------------------------------------------------------------------------------------------------
# Helpers for the loop: RNG states, stop signals, the epoch's data.

def rng_states(device):
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain data: loads with weights_only
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type in ("cuda", "npu"):
        states["device"] = getattr(torch, device.type).get_rng_state(device)
    return states


def restore_rng_states(states, device):
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", np.array(numpy_state["state"]["key"], dtype=np.uint32),
                         numpy_state["state"]["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    if device.type in ("cuda", "npu") and states.get("device") is not None:
        getattr(torch, device.type).set_rng_state(states["device"], device)


class StopRequest:
    """Remembers SIGTERM/SIGINT so the loop can finish its step and save before leaving."""

    def __init__(self):
        self.signal_name, self.previous = None, {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id):
    # DataLoader workers share the terminal's process group: without this, Ctrl-C or a SIGTERM to the group
    # kills them mid-batch and the main process could not finish its step and save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit handler (imported with torch), so it runs before it
def kill_leftover_workers():
    """At exit multiprocessing stops daemonic children with SIGTERM, then waits for them. Workers that ignore
    SIGTERM (above) and belong to a loader still alive at exit (kept by a traceback's reference cycle, say)
    would make the process wait forever; they hold nothing worth keeping, so kill them (and drop torch's
    SIGCHLD handler first, which would report each as a failed worker)."""
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover and hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftover:
        child.kill()


def epoch_loader(dataset, sampler, epoch, skip_batches, batch_size, workers, pin_memory):
    """The epoch's batches, after the first `skip_batches` (exact resume in the middle of an epoch)."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)  # crops are a function of (seed, rank, epoch, index)
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory, worker_init_fn=ignore_stop_signals)


def mel2samp(files, config, rank=0, deterministic=False):
    data = config["data_config"]
    try:
        return Mel2Samp(files, data["segment_length"], data["filter_length"], data["hop_length"],
                        data["win_length"], data["sampling_rate"], data["mel_fmin"], data["mel_fmax"],
                        n_mel_channels=config["waveglow_config"]["n_mel_channels"], seed=config["train_config"]["seed"],
                        rank=rank, deterministic=deterministic, strict=config["train_config"]["strict_data"])
    except ValueError as error:  # e.g. a list with no audio in it
        raise ConfigError(str(error)) from None


def load_start(tc, model, optimizer, scaler, device, batches_per_epoch, global_batch, log):
    """Load tc['checkpoint_path'] into the model; returns where training starts.

    Our own checkpoints resume exactly: optimizer, loss scale, RNG states and the position in the epoch.
    Other flavours (upstream, Ascend, DeepLearningExamples, converted files), or ours with warm_start,
    give the weights only and training starts at iteration 0.
    """
    path = tc["checkpoint_path"]
    checkpoint = load_checkpoint(path, map_location="cpu")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {path} does not fit waveglow_config: {error}") from None
    resumable = checkpoint["flavour"] == FORMAT_NAME and "converted_from" not in checkpoint
    if not resumable or tc["warm_start"]:
        log(f"Warm start from {path} ({checkpoint['flavour']}): weights only, iteration 0")
        return {"iteration": 0, "epoch": 0, "samples_in_epoch": 0, "samples_seen": 0, "amp": None}
    iteration = checkpoint["iteration"]
    if checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = tc["learning_rate"]  # the config's rate wins, so a resume may change it
    if checkpoint.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint.get("rng"):
        restore_rng_states(checkpoint["rng"], device)
    epoch = checkpoint.get("epoch", iteration // batches_per_epoch)
    samples_in_epoch = checkpoint.get("samples_in_epoch", (iteration % batches_per_epoch) * global_batch)
    if samples_in_epoch % global_batch:
        log(f"note: the global batch changed since the checkpoint, so epoch {epoch} resumes near, "
            f"not exactly at, where it stopped")
    log(f"Resumed from {path} at iteration {iteration} (epoch {epoch}, batch {samples_in_epoch // global_batch})")
    return {"iteration": iteration, "epoch": epoch, "samples_in_epoch": samples_in_epoch,
            "samples_seen": checkpoint.get("samples_seen", iteration * global_batch), "amp": checkpoint.get("amp")}


# ---------------------------------------------------------------------------------------------------
# Training.

def train(config, rank_flag=None, group_name=""):
    """Run training as configured; returns the process exit code."""
    tc, data, dc = config["train_config"], config["data_config"], config["dist_config"]
    try:
        device, rank, world_size = setup_distributed(tc["device"], dc["dist_backend"], dc["dist_url"],
                                                     dc["dist_timeout"], rank_flag)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(str(error)) from None

    def log(message):
        if rank == 0:
            print(message, flush=True)

    random.seed(tc["seed"])
    np.random.seed(tc["seed"])
    torch.manual_seed(tc["seed"])

    amp_dtype, note = autocast_dtype(device, tc["fp16_run"], tc["amp_dtype"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: cuDNN times its algorithms once
    apex_amp = None
    if tc["amp_backend"] == "apex" and tc["fp16_run"]:
        try:
            apex_amp = load_apex_amp(device)
        except RuntimeError as error:
            raise ConfigError(str(error)) from None
        amp_dtype, note = None, "apex O2: fp16 model with fp32 master weights"
    try:
        model = WaveGlow(**config["waveglow_config"]).to(device)
    except ValueError as error:
        raise ConfigError(f"waveglow_config: {error}") from None
    criterion = WaveGlowLoss(tc["sigma"])
    # The fused Adam kernel makes one pass over the ~88 M parameters instead of several (CPU and CUDA);
    # apex and other devices keep the default implementation.
    fused = device.type in ("cpu", "cuda") and apex_amp is None
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["learning_rate"], fused=fused or None)
    scaler = make_grad_scaler(device, amp_dtype)

    trainset = mel2samp(data["training_files"], config, rank)  # raises naming the list or file
    sampler = DistributedSampler(trainset, num_replicas=world_size, rank=rank, shuffle=True, seed=tc["seed"])
    batch_size, global_batch = tc["batch_size"], tc["batch_size"] * world_size
    batches_per_epoch = len(sampler) // batch_size
    if batches_per_epoch == 0:
        raise ConfigError(f"{data['training_files']} has {len(trainset)} usable clips, fewer than one global batch "
                          f"(batch_size {batch_size} x {world_size} processes): lower batch_size or add data")
    val_loader = None
    if tc["validation_files"]:
        valset = mel2samp(tc["validation_files"], config, deterministic=True)
        val_loader = DataLoader(valset, batch_size=batch_size, shuffle=False, num_workers=tc["workers"])

    start = {"iteration": 0, "epoch": 0, "samples_in_epoch": 0, "samples_seen": 0, "amp": None}
    if tc["checkpoint_path"]:
        start = load_start(tc, model, optimizer, scaler, device, batches_per_epoch, global_batch, log)
    iteration, epoch = start["iteration"], start["epoch"]
    skip_batches = start["samples_in_epoch"] // global_batch

    if apex_amp is not None:
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level="O2", loss_scale="dynamic")
        if start["amp"]:
            apex_amp.load_state_dict(start["amp"])
    if tc["compile"]:
        compile_coupling_networks(model)  # in place: checkpoints keep their names
    model = wrap_ddp(model, device)
    parameters = list(unwrap(model).parameters())

    writer = None
    if rank == 0:
        config_path = os.path.join(tc["output_directory"], "config.json")
        try:
            os.makedirs(tc["output_directory"], exist_ok=True)
            with open(config_path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(config, f, indent=4)
            os.replace(config_path + ".tmp", config_path)  # a kill mid-write leaves the previous one whole
        except OSError as error:
            raise CheckpointError(f"cannot write to output_directory {tc['output_directory']}: {error}") from None
        # A run killed mid-save (kill -9, a pre-empted job) leaves a hidden partial file as large as a checkpoint;
        # restarts after many such kills would fill the disk with them.
        removed = remove_interrupted_saves(tc["output_directory"], prefix="waveglow_")
        if removed:
            log(f"note: removed {len(removed)} partial checkpoint file{'s' if len(removed) > 1 else ''} that an "
                f"interrupted save left in {tc['output_directory']} ({', '.join(removed[:3])})")
        if tc["with_tensorboard"]:
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(os.path.join(tc["output_directory"], "logs"))
    log(f"WaveGlow, {sum(p.numel() for p in parameters):,} parameters, on {device} x {world_size} "
        f"process{'es' if world_size > 1 else ''}; precision {amp_dtype or 'float32'}"
        f"{' with a GradScaler' if scaler.is_enabled() else ''}")
    if note:
        log(f"note: {note}")
    if group_name:
        log(f"note: group name {group_name!r} (upstream's -g) is accepted for compatibility; torch needs none")
    log(f"{len(trainset)} training clips, global batch {batch_size} x {world_size} = {global_batch} clips of "
        f"{data['segment_length']} samples, {batches_per_epoch} iterations per epoch")

    saved = []  # paths of the checkpoints this run wrote

    def save(iteration, epoch, batches_done):
        if batches_done == batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        path = os.path.join(tc["output_directory"], f"waveglow_{iteration}")
        if rank == 0:
            try:
                save_checkpoint(path, {
                    "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                    "model": unwrap(model).state_dict(), "iteration": iteration, "optimizer": optimizer.state_dict(),
                    "learning_rate": tc["learning_rate"],
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "amp": apex_amp.state_dict() if apex_amp is not None else None, "config": config,
                    "epoch": epoch, "samples_in_epoch": batches_done * global_batch,
                    "samples_seen": samples_seen, "world_size": world_size, "rng": rng_states(device)})
            except CheckpointError as error:  # a full disk, say: stop, pointing at what is safe to resume from
                kept = f"the newest complete checkpoint of this run is {saved[-1]}" if saved else \
                    "this run saved no checkpoint before"
                if not saved and tc["checkpoint_path"]:
                    kept += f"; it started from {tc['checkpoint_path']}"
                raise CheckpointError(f"{error}. Training stopped at iteration {iteration}; {kept}") from None
            saved.append(path)
            log(f"Saved checkpoint {path}")
        return path

    def validate(iteration):
        if val_loader is None or rank != 0:
            return
        loss = validation_nll(unwrap(model), val_loader, tc["sigma"], device, amp_dtype)
        log(f"Validation loss {iteration}: {loss:.9f}")
        if writer is not None:
            writer.add_scalar("validation/loss", loss, iteration)
            mel = next(iter(val_loader))[0][:1].to(device)
            synthesis = unwrap(model).infer(mel, sigma=0.6, seed=tc["seed"])  # a short, repeatable listen
            writer.add_audio("validation/synthesis", synthesis[0].clamp(-1, 1).float().cpu(), iteration,
                             sample_rate=data["sampling_rate"])

    if writer is not None and val_loader is not None:
        writer.add_audio("validation/original", next(iter(val_loader))[1][0], iteration,
                         sample_rate=data["sampling_rate"])
    if apex_amp is not None:
        parameters = list(apex_amp.master_params(optimizer))  # the fp32 copies the optimizer updates
    clip_norm = tc["grad_clip_thresh"] if tc["grad_clip_thresh"] > 0 else math.inf
    last_saved, last_validated = iteration, None
    nonfinite_in_row = nonfinite_total = reported_skipped = 0
    samples_seen, batches_done = start["samples_seen"], skip_batches
    stop_reason, exit_code = None, 0  # stop_reason: None (ran all epochs), step_stop, signal, nonfinite
    if tc["step_stop"] and iteration >= tc["step_stop"]:
        log(f"Already at iteration {iteration}, step_stop is {tc['step_stop']}: no training left to do")
        stop_reason = "step_stop"
    model.train()
    with StopRequest() as stop:
        for epoch in range(epoch, tc["epochs"] if stop_reason is None else epoch):
            loader = epoch_loader(trainset, sampler, epoch, skip_batches, batch_size, tc["workers"],
                                  device.type == "cuda")
            step_seconds, batches_done = [], skip_batches
            tick = time.perf_counter()
            for batches_done, (mel, audio) in enumerate(loader, start=skip_batches + 1):
                mel, audio = mel.to(device, non_blocking=True), audio.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    loss = criterion(model((mel, audio)))
                if apex_amp is not None:
                    with apex_amp.scale_loss(loss, optimizer) as scaled_loss:
                        scaled_loss.backward()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
                # One host sync per step, for the log line and the skip decision together: the loss summed
                # over ranks (averaged below), the gradient norm (the same on every rank after DDP's
                # all-reduce) and the stop votes, so that every rank skips or stops at the same step.
                stop_vote = torch.full((), float(stop.signal_name is not None), device=device)
                totals = all_reduce_sum(torch.stack([loss.detach().float(), stop_vote]))
                loss_sum, stop_votes, norm = torch.cat([totals, grad_norm.detach().float().view(1)]).tolist()
                loss_value = loss_sum / world_size
                finite = math.isfinite(loss_value) and math.isfinite(norm)
                if apex_amp is not None:
                    optimizer.step()  # apex skips overflowing steps itself
                elif scaler.is_enabled():
                    scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
                    scaler.update()
                elif finite:
                    optimizer.step()
                iteration, samples_seen = iteration + 1, samples_seen + global_batch

                now = time.perf_counter()
                step_seconds.append(now - tick)
                log(f"{iteration}:\tloss:{loss_value:.9f}\ttime:{now - tick:.9f}\t")
                if writer is not None:
                    writer.add_scalar("training/loss", loss_value, iteration)
                    writer.add_scalar("training/learning_rate", optimizer.param_groups[0]["lr"], iteration)
                    writer.add_scalar("training/grad_norm", norm, iteration)
                if finite:
                    nonfinite_in_row = 0
                else:
                    nonfinite_in_row, nonfinite_total = nonfinite_in_row + 1, nonfinite_total + 1
                    log(f"warning: non-finite loss ({loss_value}) or gradient norm ({norm}) at iteration "
                        f"{iteration}: step skipped, weights unchanged ({nonfinite_in_row} in a row, "
                        f"{nonfinite_total} in all)")
                    if nonfinite_in_row >= tc["max_nonfinite_steps"]:
                        stop_reason = "nonfinite"
                        break

                if iteration % tc["iters_per_checkpoint"] == 0:
                    save(iteration, epoch, batches_done)
                    last_saved = iteration
                if tc["iters_per_validation"] and iteration % tc["iters_per_validation"] == 0:
                    validate(iteration)
                    last_validated = iteration
                if stop_votes > 0:
                    stop_reason = "signal"
                    break
                if tc["step_stop"] and iteration >= tc["step_stop"]:
                    log(f"Reached step_stop {tc['step_stop']}: stopping")
                    stop_reason = "step_stop"
                    break
                tick = time.perf_counter()  # checkpoints and validation are not part of the step time

            if step_seconds:
                # The epoch's throughput from its 5th iteration on, so warm-up does not count. The Ascend port
                # divided one global batch by the whole epoch's time instead, hence its tiny "FPS" figures.
                timed = step_seconds[4:] if len(step_seconds) >= 5 else step_seconds
                clips_per_second = len(timed) * global_batch / sum(timed)
                log(f"Epoch {epoch} FPS:{clips_per_second:.9f}")
                log(f"Epoch {epoch} samples/s:{clips_per_second * data['segment_length']:.1f}")
                if writer is not None:
                    writer.add_scalar("training/samples_per_second", clips_per_second * data["segment_length"],
                                      iteration)
            if trainset.skipped > reported_skipped:
                reported_skipped = trainset.skipped
                log(f"note: {reported_skipped} unusable training files skipped so far (warnings above name them)")
            if stop_reason:
                break
            skip_batches = 0

    if stop_reason == "nonfinite":
        exit_code = 1
        if rank == 0:
            print(f"error: {nonfinite_in_row} non-finite steps in a row (max_nonfinite_steps) at iteration "
                  f"{iteration}, stopping without a checkpoint; skipped steps never change the weights, so the "
                  f"last checkpoint, waveglow_{last_saved} in {tc['output_directory']}, is sound. Lower "
                  f"learning_rate, set grad_clip_thresh, or check the training audio", file=sys.stderr, flush=True)
    elif stop_reason == "signal":
        path = save(iteration, epoch, batches_done) if last_saved != iteration else \
            os.path.join(tc["output_directory"], f"waveglow_{iteration}")
        log(f"Received {stop.signal_name or 'a stop signal (on another rank)'}: checkpoint saved to {path}")
        exit_code = 130 if stop.signal_name == "SIGINT" else 0
    else:  # all epochs done, or step_stop
        if last_saved != iteration:
            save(iteration, epoch, batches_done)
        if last_validated != iteration:
            validate(iteration)
    if writer is not None:
        writer.close()
    cleanup_distributed()
    return exit_code


def main(argv=None):
    try:
        config, args = resolve_config(argv)
        return train(config, args.rank, args.group_name)
    except (ConfigError, CheckpointError, AudioError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, ConfigError) else 1
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
