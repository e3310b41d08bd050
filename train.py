"""Train WaveGlow: one process per device, one visible loop.

    python train.py -c config.json                                 # one device (CUDA, Ascend NPU or CPU)
    torchrun --nproc_per_node=8 train.py -c config.json            # 8 devices (or: python distributed.py -c ...)
    python train.py -c config.json -checkpoint_path checkpoints/waveglow_4000     # resume exactly

Configuration is data: config.json, then command-line flags on top (the Ascend port's single-dash flags
and their double-dash forms); config.py holds every key, its default and its flag. The resolved configuration
is written to {output_directory}/config.json and into every checkpoint. Rank 0 prints the lines the launchers grep:

    {iteration}:\tloss:{loss}\ttime:{seconds}\t      loss averaged over ranks and micro-batches, seconds of this update
    Epoch {epoch} FPS:{fps}                          clips/s over all ranks, timed from the epoch's 5th iteration
    Epoch {epoch} samples/s:{rate}                   the same as output audio samples/s (DeepLearningExamples' unit)
    Validation loss {iteration}: {loss}              NLL of the held-out list (validation_files)

The file reads top to bottom: set_up() builds a Run (device, model, optimizer, the Precision from
distributed.py, data, the Progress to resume from); train_step() is one update: forward and backward over
grad_accum_steps micro-batches of batch_size clips, then the step (an iteration is one update);
save_checkpoint_for_run() and validate() do the periodic work; train() is the loop and finish() its end.

Signals: SIGTERM or SIGINT finish the current step, save a checkpoint, print "Received SIG...: checkpoint
saved to PATH" and exit 143 (SIGTERM) or 130 (SIGINT), the shell's 128 + signal number, so a stopped run is
never taken for a finished one; a second SIGINT stops at once. Other exit codes: 2 for a configuration error,
1 for unusable data or checkpoints, for an output directory another live run holds (its `.lock` names that
run; run_lock.py) and for max_nonfinite_steps non-finite steps in a row (such steps are skipped and never
change the weights).

Faults: unusable training files (unreadable, empty, NaN samples, shorter than a hop) are skipped and
counted, or stop the run naming the file with strict_data. Checkpoints are written atomically, so a
kill -9 leaves the previous ones whole (and the hidden partial file is removed at the next start); a
save that fails (disk full) stops the run naming the last good checkpoint. dist_timeout bounds how long
a rank waits for a dead or hung peer.
"""
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
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from checkpoint import (FORMAT_NAME, FORMAT_VERSION, CheckpointError, CheckpointMismatch, fit_weights, load_checkpoint,
                        mel_setting_changes, remove_interrupted_saves, save_checkpoint)
from config import ConfigError, resolve_config
from distributed import (Precision, all_reduce_sum, broadcast_from_rank0, cleanup_distributed, cpu_memory_reuse,
                         make_precision, setup_distributed, unwrap, wrap_ddp)
from evaluate import mean_scores, validation_nll, vocoder_scores
from glow import WaveGlow, WaveGlowLoss, compile_coupling_networks
from mel2samp import AudioError, Mel2Samp
from run_lock import OutputDirectoryBusy, claim_directory, release_claims

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
    """Remembers SIGTERM/SIGINT so the loop can finish its step and save before leaving.

    The first signal names the stop (and the exit code); once a stop is pending a SIGINT stops at once (a second
    Ctrl-C: the user does not want to wait) and a further SIGTERM changes nothing (schedulers may repeat it).
    When a stop is pending, the handler stays installed past the loop, so that the closing save is not cut
    short; main() restores the previous handlers at the very end.
    """

    kept = {}  # signal -> the handler to restore at the end of main

    def __init__(self):
        self.signal_name, self.previous = None, {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        if self.signal_name is not None and exc[0] is None:
            for signum, handler in self.previous.items():
                StopRequest.kept.setdefault(signum, handler)
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @classmethod
    def restore_kept(cls):
        for signum, handler in cls.kept.items():
            signal.signal(signum, handler)
        cls.kept.clear()


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
    """The epoch's batches, after the first `skip_batches` (exact resume in the middle of an epoch).

    One batch is one update's clips on this rank (batch_size x grad_accum_steps); train_step cuts it into
    micro-batches, so the clips and crops of an update do not depend on how it is accumulated."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)  # crops are a function of (seed, rank, epoch, index)
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory, worker_init_fn=ignore_stop_signals)


def make_dataset(files, config, rank=0, deterministic=False):
    """Mel2Samp of `files` as the config says; ConfigError for a list without usable audio."""
    tc, n_mel_channels = config["train_config"], config["waveglow_config"]["n_mel_channels"]
    try:
        return Mel2Samp.from_config(files, config["data_config"], n_mel_channels=n_mel_channels, seed=tc["seed"],
                                    rank=rank, deterministic=deterministic, strict=tc["strict_data"])
    except ValueError as error:  # e.g. a list with no audio in it
        raise ConfigError(str(error)) from None


VALIDATION_CLIPS = 2  # held-out clips synthesised, scored and logged to tensorboard at each validation

# ---------------------------------------------------------------------------------------------------
# Set-up: everything the loop needs, built in the order that keeps a seeded run repeatable.

@dataclass
class Progress:
    """Where training stands. Checkpoints record the position, so a resume continues with the very next batch."""
    iteration: int = 0
    epoch: int = 0
    batches_done: int = 0        # of this epoch; at the start, the batches a resume skips
    samples_seen: int = 0
    last_saved: int = 0          # iteration of the newest checkpoint (at the start: the one the run began at)
    last_validated: Optional[int] = None
    saved: list = field(default_factory=list)  # paths of the checkpoints this run wrote
    reported_skipped: int = 0    # unusable training files the log has already counted


@dataclass
class Run:
    """What set_up builds and the loop reads; only `progress` changes while training."""
    config: dict
    device: torch.device
    rank: int
    world_size: int
    model: torch.nn.Module       # wrapped in DistributedDataParallel when a process group is up
    criterion: WaveGlowLoss
    optimizer: torch.optim.Optimizer
    precision: Precision
    parameters: list             # those whose gradient norm is clipped (apex: its fp32 master copies)
    clip_norm: float
    trainset: Mel2Samp
    sampler: DistributedSampler
    batches_per_epoch: int       # updates (iterations) per epoch
    global_batch: int            # clips per iteration (update) over all ranks and micro-batches
    val_loader: Optional[DataLoader]
    writer: object               # a tensorboardX SummaryWriter (rank 0, with_tensorboard) or None
    log: Callable[[str], None]
    progress: Progress           # from where the checkpoint left off (or zero); the loop advances it


def rank0_printer(rank):
    """print, flushed, on rank 0 only: every rank computes the same lines and one says them."""
    def log(message):
        if rank == 0:
            print(message, flush=True)
    return log


def build_model(config, device, precision):
    """(WaveGlow on `device`, its loss, Adam over its parameters)."""
    tc = config["train_config"]
    try:  # the upsampler's stride is the mel's hop, so the hop lives in data_config alone
        model = WaveGlow(**config["waveglow_config"], hop_length=config["data_config"]["hop_length"]).to(device)
    except ValueError as error:
        raise ConfigError(f"waveglow_config: {error}") from None
    criterion = WaveGlowLoss(tc["sigma"])
    # The fused Adam kernel makes one pass over the ~88 M parameters instead of several (CPU and CUDA);
    # apex and other devices keep the default implementation.
    fused = device.type in ("cpu", "cuda") and not precision.uses_apex
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["learning_rate"], fused=fused or None)
    return model, criterion, optimizer


def training_data(config, rank, world_size):
    """(dataset, sampler, batches per epoch) of data_config.training_files for this rank."""
    tc, data = config["train_config"], config["data_config"]
    trainset = make_dataset(data["training_files"], config, rank)  # raises naming the list or file
    sampler = DistributedSampler(trainset, num_replicas=world_size, rank=rank, shuffle=True, seed=tc["seed"])
    batches_per_epoch = len(sampler) // (tc["batch_size"] * tc["grad_accum_steps"])  # updates per epoch
    if batches_per_epoch == 0:
        accumulation = f" x {tc['grad_accum_steps']} grad_accum_steps" if tc["grad_accum_steps"] > 1 else ""
        raise ConfigError(f"{data['training_files']} has {len(trainset)} usable clips, fewer than one global batch "
                          f"(batch_size {tc['batch_size']} x {world_size} processes{accumulation}): lower batch_size "
                          f"{'or grad_accum_steps ' if accumulation else ''}or add data")
    return trainset, sampler, batches_per_epoch


def validation_loader(config):
    tc = config["train_config"]
    if not tc["validation_files"]:
        return None
    valset = make_dataset(tc["validation_files"], config, deterministic=True)
    return DataLoader(valset, batch_size=tc["batch_size"], shuffle=False, num_workers=tc["workers"])


def load_start(config, model, optimizer, precision, device, batches_per_epoch, global_batch, log):
    """Load train_config.checkpoint_path into the model; returns the Progress training starts from.

    Our own checkpoints resume exactly: optimizer, loss scale, RNG states and the position in the epoch.
    Other flavours (upstream, Ascend, DeepLearningExamples, converted files), or ours with warm_start,
    give the weights only and training starts at iteration 0; a warm start to another hop (another corpus's
    rate) takes every weight but the upsampler's. Weights that do not fit are a ConfigError naming the keys.
    """
    tc = config["train_config"]
    path = tc["checkpoint_path"]
    checkpoint = load_checkpoint(path, map_location="cpu")
    resumable = checkpoint["flavour"] == FORMAT_NAME and "converted_from" not in checkpoint
    warm_start = not resumable or tc["warm_start"]
    try:
        state_dict, not_taken = fit_weights(model, checkpoint, path, config, warm_start)
    except CheckpointMismatch as error:
        new_hop_only = error.keys == ["data_config.hop_length"]
        advice = (" (or -warm_start true for a new run from its weights, the upsampler starting fresh at the new "
                  "hop)") if new_hop_only else ""
        raise ConfigError(f"{error}. Use a config with the checkpoint's values{advice}") from None
    model.load_state_dict(state_dict, strict=not_taken is None)
    for line in (not_taken, mel_setting_changes(checkpoint, path, config["data_config"])):
        if line:
            log(f"note: {line}")
    if warm_start:
        log(f"Warm start from {path} ({checkpoint['flavour']}): weights only, iteration 0")
        return Progress()
    iteration = checkpoint["iteration"]
    if checkpoint.get("optimizer") is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = tc["learning_rate"]  # the config's rate wins, so a resume may change it
    precision.load_state_dict(checkpoint)  # the loss scale (apex's waits for precision.initialize)
    if checkpoint.get("rng"):
        restore_rng_states(checkpoint["rng"], device)
    epoch = checkpoint.get("epoch", iteration // batches_per_epoch)
    samples_in_epoch = checkpoint.get("samples_in_epoch", (iteration % batches_per_epoch) * global_batch)
    if samples_in_epoch % global_batch:
        log(f"note: the global batch changed since the checkpoint, so epoch {epoch} resumes near, "
            f"not exactly at, where it stopped")
    log(f"Resumed from {path} at iteration {iteration} (epoch {epoch}, batch {samples_in_epoch // global_batch})")
    return Progress(iteration=iteration, epoch=epoch, batches_done=samples_in_epoch // global_batch,
                    samples_seen=checkpoint.get("samples_seen", iteration * global_batch))


class OutputDirectoryRefused(Exception):
    """Rank 0 could not claim the output directory and said why; every rank leaves with this exit code."""

    def __init__(self, exit_code):
        super().__init__("")
        self.exit_code = exit_code


def claim_output_directory(output_directory, log):
    """Rank 0: create the directory and claim it for this run (run_lock); None, or (exit code, message)."""
    try:
        os.makedirs(output_directory, exist_ok=True)
        claim_directory(output_directory, log=log)
    except OutputDirectoryBusy as error:
        return 1, f"output_directory {error}"
    except OSError as error:
        return 1, f"cannot write to output_directory {output_directory}: {error}"
    return None


def prepare_output_directory(config, rank, device, log):
    """Rank 0 claims the output directory (one run per directory; every rank learns of a refusal), writes the
    resolved config, removes partial saves of killed runs and opens tensorboard (returned)."""
    tc = config["train_config"]
    refusal = claim_output_directory(tc["output_directory"], log) if rank == 0 else None
    exit_code = 0
    if refusal is not None:  # said before any rank can leave, so that a launcher stopping the others hides nothing
        exit_code, message = refusal
        print(f"error: {message}", file=sys.stderr, flush=True)
    exit_code = broadcast_from_rank0(exit_code, device)  # before anyone trains: no rank waits alone
    if exit_code:
        raise OutputDirectoryRefused(exit_code)
    if rank != 0:
        return None
    config_path = os.path.join(tc["output_directory"], "config.json")
    try:
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
    if not tc["with_tensorboard"]:
        return None
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(tc["output_directory"], "logs"))


def set_up(config, rank_flag=None, group_name=""):
    """The Run of `config`: device and process group, seeds, precision, model, data, resumed position, output."""
    tc, dc = config["train_config"], config["dist_config"]
    try:
        device, rank, world_size = setup_distributed(tc["device"], dc["dist_backend"], dc["dist_url"],
                                                     dc["dist_timeout"], rank_flag)
        precision = make_precision(device, tc)  # RuntimeError: apex asked for but not usable here
    except (RuntimeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    log = rank0_printer(rank)
    random.seed(tc["seed"])
    np.random.seed(tc["seed"])
    torch.manual_seed(tc["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: cuDNN times its algorithms once
    model, criterion, optimizer = build_model(config, device, precision)
    trainset, sampler, batches_per_epoch = training_data(config, rank, world_size)
    global_batch = tc["batch_size"] * world_size * tc["grad_accum_steps"]  # clips per update
    val_loader = validation_loader(config)
    progress = Progress()
    if tc["checkpoint_path"]:
        progress = load_start(config, model, optimizer, precision, device, batches_per_epoch, global_batch, log)
    progress.last_saved = progress.iteration
    model, optimizer = precision.initialize(model, optimizer)  # apex O2 casts the model here
    if tc["compile"]:
        compile_coupling_networks(model)  # in place: checkpoints keep their names
    writer = prepare_output_directory(config, rank, device, log)  # a refused run leaves before DDP's first broadcast
    model = wrap_ddp(model, device)
    run = Run(config, device, rank, world_size, model, criterion, optimizer, precision,
              precision.parameters_to_clip(unwrap(model), optimizer),
              tc["grad_clip_thresh"] if tc["grad_clip_thresh"] > 0 else math.inf,
              trainset, sampler, batches_per_epoch, global_batch, val_loader, writer, log, progress)
    log_set_up(run, group_name)
    if writer is not None and val_loader is not None:
        for i, original in enumerate(next(iter(val_loader))[1][:VALIDATION_CLIPS]):  # beside the syntheses
            writer.add_audio(f"validation/original_{i}", original, progress.iteration,
                             sample_rate=config["data_config"]["sampling_rate"])
    return run


def log_set_up(run, group_name):
    data, world_size = run.config["data_config"], run.world_size
    run.log(f"WaveGlow, {sum(p.numel() for p in unwrap(run.model).parameters()):,} parameters, on {run.device} x "
            f"{world_size} process{'es' if world_size > 1 else ''}; precision {run.precision.describe()}")
    if run.precision.note:
        run.log(f"note: {run.precision.note}")
    if group_name:
        run.log(f"note: group name {group_name!r} (upstream's -g) is accepted for compatibility; torch needs none")
    tc = run.config["train_config"]
    accumulation = f" x {tc['grad_accum_steps']} micro-batches" if tc["grad_accum_steps"] > 1 else ""
    run.log(f"{len(run.trainset)} training clips, global batch {tc['batch_size']} x {world_size}{accumulation} = "
            f"{run.global_batch} clips of {data['segment_length']} samples, {run.batches_per_epoch} iterations "
            f"per epoch")


# ---------------------------------------------------------------------------------------------------
# One step, and the work between steps.

def train_step(run, stop, mel, audio):
    """One update on this rank's batch_size x grad_accum_steps clips: forward and backward per micro-batch of
    batch_size clips, their gradients summed, then one step, skipped when not finite.

    Each micro-batch's loss is divided by the number of micro-batches: the loss is a mean over clips and samples,
    so the summed gradients are those of the whole batch at once. DDP all-reduces them once, in the last backward.
    Returns (loss averaged over micro-batches and ranks, gradient norm, finite, stop votes: ranks that caught
    a signal).
    """
    batch_size = run.config["train_config"]["batch_size"]
    micro_batches = list(zip(mel.split(batch_size), audio.split(batch_size), strict=True))  # (B, n_mel, F), (B, T)
    count = len(micro_batches)
    run.optimizer.zero_grad(set_to_none=True)
    losses = []
    for number, (micro_mel, micro_audio) in enumerate(micro_batches, start=1):
        micro_mel = micro_mel.to(run.device, non_blocking=True)
        micro_audio = micro_audio.to(run.device, non_blocking=True)
        local_only = number < count and isinstance(run.model, DistributedDataParallel)
        with run.model.no_sync() if local_only else nullcontext():
            with run.precision.autocast():
                loss = run.criterion(run.model((micro_mel, micro_audio)))
            run.precision.accumulate(loss / count if count > 1 else loss, run.optimizer, last=number == count)
        losses.append(loss.detach().float())
    grad_norm = run.precision.unscale_and_clip(run.optimizer, run.parameters, run.clip_norm)
    # One host sync per update, for the log line and the skip decision together: the loss summed over ranks
    # (averaged below), the gradient norm (the same on every rank after DDP's all-reduce) and the stop votes,
    # so that every rank skips or stops at the same step. A non-finite micro-batch loss makes the mean non-finite.
    stop_vote = torch.full((), float(stop.signal_name is not None), device=run.device)
    mean_loss = losses[0] if count == 1 else torch.stack(losses).mean()
    totals = all_reduce_sum(torch.stack([mean_loss, stop_vote]))
    loss_sum, stop_votes, norm = torch.cat([totals, grad_norm.detach().float().view(1)]).tolist()
    loss_value = loss_sum / run.world_size
    finite = math.isfinite(loss_value) and math.isfinite(norm)
    run.precision.step(run.optimizer, finite)
    return loss_value, norm, finite, stop_votes


class NonfiniteSteps:
    """Counts non-finite steps (skipped, so they never change the weights) and warns about each."""

    def __init__(self, limit):
        self.limit, self.in_row, self.total = limit, 0, 0

    def too_many(self, finite, loss_value, norm, iteration, log):
        """Count this step; True once `limit` non-finite steps came in a row."""
        if finite:
            self.in_row = 0
            return False
        self.in_row, self.total = self.in_row + 1, self.total + 1
        log(f"warning: non-finite loss ({loss_value}) or gradient norm ({norm}) at iteration {iteration}: "
            f"step skipped, weights unchanged ({self.in_row} in a row, {self.total} in all)")
        return self.in_row >= self.limit


def log_step(run, iteration, loss_value, norm, seconds):
    run.log(f"{iteration}:\tloss:{loss_value:.9f}\ttime:{seconds:.9f}\t")
    if run.writer is not None:
        run.writer.add_scalar("training/loss", loss_value, iteration)
        run.writer.add_scalar("training/learning_rate", run.optimizer.param_groups[0]["lr"], iteration)
        run.writer.add_scalar("training/grad_norm", norm, iteration)


def log_epoch(run, progress, step_seconds):
    """The epoch's throughput, and unusable training files found so far."""
    segment_length = run.config["data_config"]["segment_length"]
    if step_seconds:
        # The epoch's throughput from its 5th iteration on, so warm-up does not count. The Ascend port
        # divided one global batch by the whole epoch's time instead, hence its tiny "FPS" figures.
        timed = step_seconds[4:] if len(step_seconds) >= 5 else step_seconds
        clips_per_second = len(timed) * run.global_batch / sum(timed)
        run.log(f"Epoch {progress.epoch} FPS:{clips_per_second:.9f}")
        run.log(f"Epoch {progress.epoch} samples/s:{clips_per_second * segment_length:.1f}")
        if run.writer is not None:
            run.writer.add_scalar("training/samples_per_second", clips_per_second * segment_length,
                                  progress.iteration)
    if run.trainset.skipped > progress.reported_skipped:
        progress.reported_skipped = run.trainset.skipped
        run.log(f"note: {progress.reported_skipped} unusable training files skipped so far (warnings above name them)")


def save_checkpoint_for_run(run, progress):
    """Rank 0 writes waveglow_{iteration} (the others only name it); returns its path.

    A failed write (a full disk, say) raises CheckpointError naming what is safe to resume from.
    """
    tc = run.config["train_config"]
    epoch, batches_done = progress.epoch, progress.batches_done
    if batches_done == run.batches_per_epoch:
        epoch, batches_done = epoch + 1, 0
    path = os.path.join(tc["output_directory"], f"waveglow_{progress.iteration}")
    if run.rank != 0:
        return path
    try:
        save_checkpoint(path, {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "model": unwrap(run.model).state_dict(), "iteration": progress.iteration,
            "optimizer": run.optimizer.state_dict(), "learning_rate": tc["learning_rate"],
            **run.precision.state_dict(), "config": run.config,  # its 'scaler' and 'amp' entries
            "epoch": epoch, "samples_in_epoch": batches_done * run.global_batch,
            "samples_seen": progress.samples_seen, "world_size": run.world_size, "rng": rng_states(run.device)})
    except CheckpointError as error:
        saved = progress.saved
        kept = f"the newest complete checkpoint of this run is {saved[-1]}" if saved else \
            "this run saved no checkpoint before"
        if not saved and tc["checkpoint_path"]:
            kept += f"; it started from {tc['checkpoint_path']}"
        raise CheckpointError(f"{error}. Training stopped at iteration {progress.iteration}; {kept}") from None
    progress.saved.append(path)
    run.log(f"Saved checkpoint {path}")
    return path


def validate(run, iteration):
    """Rank 0: the validation NLL (and, with tensorboard, a short synthesis to listen to)."""
    if run.val_loader is None or run.rank != 0:
        return
    tc, model = run.config["train_config"], unwrap(run.model)
    loss = validation_nll(model, run.val_loader, tc["sigma"], run.device, run.precision.amp_dtype)
    run.log(f"Validation loss {iteration}: {loss:.9f}")
    if run.writer is not None:
        run.writer.add_scalar("validation/loss", loss, iteration)
        log_validation_clips(run, model, iteration)


def log_validation_clips(run, model, iteration, n_clips=None):
    """Tensorboard: a few held-out clips synthesised (audio, mel image) and their objective scores' means.

    Few clips, because the F0 tracker behind MCD / F0 RMSE / V/UV costs about twice a clip's length."""
    tc, rate, writer = run.config["train_config"], run.config["data_config"]["sampling_rate"], run.writer
    stft = run.val_loader.dataset.stft
    mels, references = next(iter(run.val_loader))
    clips = []
    for i in range(min(n_clips or VALIDATION_CLIPS, len(mels))):
        synthesis = model.infer(mels[i:i + 1].to(run.device), sigma=0.6, seed=tc["seed"] + i)[0]  # repeatable
        synthesis = synthesis.clamp(-1, 1).float().cpu()  # (T,)
        writer.add_audio(f"validation/synthesis_{i}", synthesis, iteration, sample_rate=rate)
        writer.add_image(f"validation/mel_{i}", mel_image(stft.mel_spectrogram(synthesis.unsqueeze(0))[0]),
                         iteration, dataformats="HW")
        clips.append(vocoder_scores(references[i], synthesis, rate, stft=stft))
    for key, value in mean_scores(clips).items():
        if value is not None:  # None: undefined on every clip (e.g. no frame voiced in both)
            writer.add_scalar(f"validation/{key}", value, iteration)


def mel_image(mel):
    """A log-mel (n_mel, F) as a [0, 1] image with the low bands at the bottom."""
    mel = mel.flip(0)
    return ((mel - mel.min()) / (mel.max() - mel.min()).clamp(min=1e-5)).numpy()


# ---------------------------------------------------------------------------------------------------
# The loop.

def train(config, rank_flag=None, group_name=""):
    """Run training as configured; returns the process exit code."""
    run = set_up(config, rank_flag, group_name)
    tc, progress = config["train_config"], run.progress
    nonfinite = NonfiniteSteps(tc["max_nonfinite_steps"])
    stop_reason = None  # None (ran all epochs), step_stop, signal or nonfinite
    if tc["step_stop"] and progress.iteration >= tc["step_stop"]:
        run.log(f"Already at iteration {progress.iteration}, step_stop is {tc['step_stop']}: no training left to do")
        stop_reason = "step_stop"
    skip_batches = progress.batches_done
    run.model.train()
    with StopRequest() as stop, cpu_memory_reuse(run.device):
        for epoch in range(progress.epoch, tc["epochs"] if stop_reason is None else progress.epoch):
            loader = epoch_loader(run.trainset, run.sampler, epoch, skip_batches,
                                  tc["batch_size"] * tc["grad_accum_steps"], tc["workers"], run.device.type == "cuda")
            progress.epoch, progress.batches_done, step_seconds = epoch, skip_batches, []
            tick = time.perf_counter()
            for batch_number, (mel, audio) in enumerate(loader, start=skip_batches + 1):
                loss_value, norm, finite, stop_votes = train_step(run, stop, mel, audio)
                progress.iteration, progress.batches_done = progress.iteration + 1, batch_number
                progress.samples_seen += run.global_batch
                now = time.perf_counter()
                step_seconds.append(now - tick)
                log_step(run, progress.iteration, loss_value, norm, now - tick)
                if nonfinite.too_many(finite, loss_value, norm, progress.iteration, run.log):
                    stop_reason = "nonfinite"
                    break
                if progress.iteration % tc["iters_per_checkpoint"] == 0:
                    save_checkpoint_for_run(run, progress)
                    progress.last_saved = progress.iteration
                if tc["iters_per_validation"] and progress.iteration % tc["iters_per_validation"] == 0:
                    validate(run, progress.iteration)
                    progress.last_validated = progress.iteration
                if stop_votes > 0:
                    stop_reason = "signal"
                    break
                if tc["step_stop"] and progress.iteration >= tc["step_stop"]:
                    run.log(f"Reached step_stop {tc['step_stop']}: stopping")
                    stop_reason = "step_stop"
                    break
                tick = time.perf_counter()  # checkpoints and validation are not part of the step time
            log_epoch(run, progress, step_seconds)
            if stop_reason:
                break
            skip_batches = 0
    return finish(run, progress, stop_reason, stop.signal_name, nonfinite.in_row)


def finish(run, progress, stop_reason, signal_name, nonfinite_in_row):
    """The last checkpoint and validation a stop calls for, the closing lines; returns the exit code."""
    tc, iteration, exit_code = run.config["train_config"], progress.iteration, 0
    if stop_reason == "nonfinite":
        exit_code = 1
        if run.rank == 0:
            print(f"error: {nonfinite_in_row} non-finite steps in a row (max_nonfinite_steps) at iteration "
                  f"{iteration}, stopping without a checkpoint; skipped steps never change the weights, so the "
                  f"last checkpoint, waveglow_{progress.last_saved} in {tc['output_directory']}, is sound. Lower "
                  f"learning_rate, set grad_clip_thresh, or check the training audio", file=sys.stderr, flush=True)
    elif stop_reason == "signal":
        path = save_checkpoint_for_run(run, progress) if progress.last_saved != iteration else \
            os.path.join(tc["output_directory"], f"waveglow_{iteration}")
        # The launchers read this line for the checkpoint to resume from.
        run.log(f"Received {signal_name or 'a stop signal (on another rank)'}: checkpoint saved to {path}")
        exit_code = STOP_EXIT_CODES.get(signal_name, STOP_EXIT_CODES["SIGTERM"])
    else:  # all epochs done, or step_stop
        if progress.last_saved != iteration:
            save_checkpoint_for_run(run, progress)
        if progress.last_validated != iteration:
            validate(run, iteration)
    if run.writer is not None:
        run.writer.close()
    cleanup_distributed()
    return exit_code


# Stopped by a signal, after the closing checkpoint: the shell's 128 + signal number, so that `train && next`
# and schedulers that restart failed jobs (a Kubernetes Job, Slurm's --requeue) never take a stopped run
# for a finished one. Ranks that saw no signal themselves (another host's) count as SIGTERM.
STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def main(argv=None):
    rank, output_directory = 0, None
    try:
        config, args = resolve_config(argv)
        rank = args.rank if args.rank is not None else int(os.environ.get("RANK") or 0)
        output_directory = config["train_config"]["output_directory"]
        return train(config, args.rank, args.group_name)
    except OutputDirectoryRefused as refusal:
        return refusal.exit_code
    except (ConfigError, CheckpointError, AudioError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one during set-up: stop at once, without a traceback
        if rank == 0:
            kept = f"the checkpoints already in {output_directory} are whole" if output_directory else "nothing saved"
            print(f"error: stopped at once by SIGINT (Ctrl-C), without saving; {kept}", file=sys.stderr, flush=True)
        return STOP_EXIT_CODES["SIGINT"]
    finally:
        cleanup_distributed()
        release_claims()
        StopRequest.restore_kept()


if __name__ == "__main__":
    sys.exit(main())
