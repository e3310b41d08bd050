"""Device, precision and process-group decisions, in one place, and the one-process-per-device launcher.

Everything that asks "which device?", "which autocast dtype?" or "which backend?" calls this file;
the training loop and inference read its answers instead of deriving their own. make_precision(device,
train_config) gives the loop one Precision (float32, native autocast with a GradScaler for float16, or apex O2)
with autocast(), backward() and step(); cpu_memory_reuse(device) wraps the loop, so that CPU training keeps the
memory a step frees for the next.

    python distributed.py -c config.json [train.py flags]          # one train.py per local GPU/NPU
    python distributed.py --nproc_per_node 2 --device cpu -c config.json
    python distributed.py --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 -c config.json
    torchrun --nproc_per_node=8 train.py -c config.json            # the same, started by hand
"""
import argparse
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import glow_fast


def npu_available():
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError:
        return False
    return torch.npu.is_available()


def select_device(name="auto", local_rank=0):
    """'auto' picks CUDA, then Ascend NPU, then CPU. 'cuda', 'npu', 'cpu' (optionally ':index') force one."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif npu_available():
            name = "npu"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if kind == "npu" and not npu_available():
        raise RuntimeError("device 'npu' was asked for but torch_npu is not installed or sees no NPU; "
                           "install the torch_npu build matching your torch and CANN, or use --device cpu")
    if kind not in ("cuda", "npu", "cpu"):
        raise ValueError(f"unknown device {name!r}: use auto, cuda, npu or cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if ":" in name:
        return torch.device(name)
    return torch.device(kind, local_rank)


# Measured on an AVX2 CPU (no bfloat16 units): a 2048x2048 matmul runs at 144 GFLOP/s in float32 and 0.34 in
# bfloat16, and one training step of config.json's model takes 24x as long under bf16 autocast, inference 65x.
EMULATED_BF16_SLOWDOWN = "about 20-60x slower than float32"


def cpu_supports_bf16():
    """True only where the CPU computes in bfloat16 natively (AVX512-BF16 or AMX on x86, the BF16 extension on ARM):
    glow_fast.cpu_has_bf16_units, the one statement of that rule, which the model's bf16 matmul routes follow too.
    oneDNN's own probe alone is not enough, as it also answers yes for plain AVX512, where oneDNN only emulates
    bfloat16; where the CPU cannot tell (no /proc/cpuinfo), the answer is no, and a run takes float32."""
    return glow_fast.cpu_has_bf16_units()


def cpu_capability():
    """What this CPU offers, for logs and the benchmark: {'isa': 'AVX2', 'bf16': False, 'fp16': False, 'threads': 2}.

    isa is torch's vector level (torch.backends.cpu.get_cpu_capability); bf16/fp16 say whether oneDNN computes in
    that dtype with native units here (fp16: AVX512-FP16 or AMX-FP16, oneDNN's own probe)."""
    return {"isa": torch.backends.cpu.get_cpu_capability(), "bf16": cpu_supports_bf16(),
            "fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()), "threads": torch.get_num_threads()}


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# What glibc's own sliding thresholds settle on once blocks of 32 MB have been freed (a training step frees many),
# put back on leaving cpu_memory_reuse: glibc has no call that reads them, or that turns the sliding back on.
_GLIBC_SETTLED = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 * 2 ** 20, _M_TRIM_THRESHOLD: 64 * 2 ** 20}
_NEVER_TRIM = 2 ** 31 - 1  # the largest trim threshold mallopt takes (an int)


@functools.cache
def _glibc():
    """The C library, where it is glibc (whose malloc cpu_memory_reuse tunes), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def cpu_memory_reuse(device, enabled=True):
    """Within the block, training on a CPU reuses the memory each step frees instead of taking fresh pages
    (enabled=False: a block that changes nothing, for code that runs either way).

    glibc's malloc serves every block over 32 MB (most of a step's activations and gradients) with a new mmap and
    unmaps it when freed, so each step faults its whole working set in again, a page at a time, every page
    zero-filled by the kernel. For config.json's model, 2 x 16000 samples on a 2-core AVX2 VM: 0.69-0.75 M page
    faults and 2.6-2.9 s of system time per step, and 24.0-24.8 s a step; with mmap and trimming off, 21-32 k
    faults, 0.1-0.2 s and 21.4-21.6 s (three alternating runs each). The process keeps the memory it has freed,
    so its resident size stays at its peak until the block ends, when glibc's usual thresholds come back and the
    heap's free memory goes back to the kernel. Elsewhere (GPU, NPU, no glibc) it changes nothing."""
    libc = _glibc() if enabled and device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        for parameter, value in _GLIBC_SETTLED.items():
            libc.mallopt(parameter, value)
        libc.malloc_trim(0)


def autocast_dtype(device, low_precision, preferred="auto"):
    """The autocast dtype for `low_precision` runs on `device`, or None for plain float32.

    preferred "auto": fp16 on CUDA and NPU (as the seed's apex O2); on CPUs bfloat16 where the CPU has bfloat16
    units (cpu_supports_bf16), else float32, which is then the faster choice by far. "bfloat16" asks for it on any
    device (it needs no loss scaling), honoured on CPUs without the units too, with a warning. "float16" is not a
    CPU autocast type: on CPUs it reads as "auto". Returns (dtype, note) where the note is one line the caller
    should log, explaining a substitution or a warning.
    """
    if not low_precision:
        return None, ""
    if device.type in ("cuda", "npu"):
        if preferred == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16, "this GPU has no bfloat16 support: mixed precision runs in float16"
        return (torch.bfloat16 if preferred == "bfloat16" else torch.float16), ""
    isa = torch.backends.cpu.get_cpu_capability()
    if cpu_supports_bf16():
        if preferred == "bfloat16":
            return torch.bfloat16, ""
        return torch.bfloat16, f"mixed precision on this CPU ({isa}, bfloat16 units) runs in bfloat16"
    if preferred == "bfloat16":
        return torch.bfloat16, (f"warning: bfloat16 was asked for, but this CPU ({isa}) has no bfloat16 units, so it "
                                f"is emulated: {EMULATED_BF16_SLOWDOWN}; leave amp_dtype at auto for float32")
    return None, (f"mixed precision was asked for, but this CPU ({isa}) has no bfloat16 units "
                  "(AVX512-BF16 or AMX): running float32, the fast choice here")


# ---------------------------------------------------------------------------------------------------
# Process group. torchrun (or `python distributed.py`, below) sets RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT and we initialise from the environment (env://), which also covers
# several hosts. The upstream style `train.py -r RANK -g GROUP` still works: the rank comes from the
# flag, the world size from WORLD_SIZE or else the number of local GPUs/NPUs (as upstream counted
# them), and the rendezvous address from dist_config.dist_url.

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def local_device_count(kind):
    """How many accelerators of `kind` ('cuda', 'npu', 'cpu') this host has; 1 for the CPU."""
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count() if npu_available() else 0
    return 1


def default_device_kind(name="auto"):
    """The device type a run with --device `name` will use on this host (without touching it)."""
    name = (name or "auto").lower().split(":")[0]
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "npu" if npu_available() else "cpu"


def distributed_env(rank_flag=None, device_name="auto", environ=None):
    """(rank, world_size, local_rank, launched_by) for this process.

    launched_by is 'env' (torchrun / distributed.py set RANK and WORLD_SIZE), 'rank-flag' (upstream's
    -r with WORLD_SIZE or the local device count) or 'single'.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        if rank_flag is not None and rank_flag != rank:
            raise ValueError(f"-r {rank_flag} conflicts with RANK={rank} set by the launcher; "
                             "drop -r when starting with torchrun or distributed.py")
        local_rank = int(environ.get("LOCAL_RANK", rank))
        return rank, world_size, local_rank, "env"
    if rank_flag is not None:
        kind = default_device_kind(device_name)
        per_host = max(1, local_device_count(kind))
        world_size = int(environ.get("WORLD_SIZE", per_host))
        if not 0 <= rank_flag < world_size:
            raise ValueError(f"-r {rank_flag} is outside the world of {world_size} processes "
                             "(set WORLD_SIZE for the total number of processes)")
        return rank_flag, world_size, int(environ.get("LOCAL_RANK", rank_flag % per_host)), "rank-flag"
    return 0, 1, 0, "single"


def choose_backend(device, requested="auto"):
    """The collective backend for `device`: nccl (CUDA), hccl (Ascend), gloo (CPU), unless asked otherwise."""
    requested = (requested or "auto").lower()
    natural = BACKENDS[device.type]
    if requested == "auto":
        return natural
    if requested == "nccl" and device.type != "cuda" or requested == "hccl" and device.type != "npu":
        raise ValueError(f"dist_config.dist_backend is {requested!r} but training runs on {device.type}; "
                         f"set it to \"auto\" (or {natural!r})")
    return requested


def setup_distributed(device_name="auto", backend="auto", dist_url="env://", timeout_s=1800, rank_flag=None):
    """Pick this process's device and, for more than one process, join the process group.

    Returns (device, rank, world_size). The timeout bounds every collective, so a dead peer ends the
    run with an error instead of hanging it forever.
    """
    rank, world_size, local_rank, launched_by = distributed_env(rank_flag, device_name)
    device = select_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)
    if world_size > 1:
        if launched_by == "env" or "MASTER_ADDR" in os.environ:
            init_method = "env://"
        else:
            init_method = dist_url or "env://"
        dist.init_process_group(backend=choose_backend(device, backend), init_method=init_method,
                                world_size=world_size, rank=rank, timeout=timedelta(seconds=timeout_s))
    return device, rank, world_size


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def wrap_ddp(model, device):
    """DistributedDataParallel around `model` when a process group is up; the model itself otherwise."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type in ("cuda", "npu") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor):
    """Sum `tensor` over all processes in place (no-op for a single process); returns it."""
    if is_distributed():
        _settled(tensor, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
    return tensor


def broadcast_from_rank0(value, device):
    """Rank 0's integer `value`, on every process (`value` itself for a single process); `device` is the run's (NCCL
    and HCCL broadcast from the accelerator)."""
    if not is_distributed():
        return value
    shared = torch.tensor([value], dtype=torch.int64, device=device)
    return int(_settled(shared, lambda: dist.broadcast(shared, src=0, async_op=True))[0])


def _settled(tensor, collective):
    """Run `collective` (an async op on `tensor`), wait for it, then until gloo's worker thread lets go of `tensor`.

    A gloo worker drops its references to a finished operation's tensors a moment after the waiting thread wakes, and
    needs the GIL for a tensor Python made. A process that leaves right after a collective (a rank with nothing to save,
    a refused output directory) can be in the interpreter's exit by then, and the worker's bid for the GIL aborts it
    with SIGABRT ("terminate called without an active exception"). destroy_process_group does not prevent it: once
    torch._dynamo is imported (fused Adam imports it) the group outlives it, and its threads are never joined. Seen in
    3 of 30 refused 2-process runs on a busy 2-core machine; 0 of 45 with this wait. NCCL and HCCL keep their own
    bookkeeping and are not waited on.
    """
    before = tensor._use_count()  # C++ references to the tensor; the operation holds more until the worker is done
    collective().wait()
    if dist.get_backend() != "gloo":
        return tensor
    deadline = time.monotonic() + 5.0  # never hang on it: the worker lets go within microseconds when it runs
    while tensor._use_count() > before and time.monotonic() < deadline:
        time.sleep(0.0002)  # sleeping releases the GIL, which the worker may be waiting for
    return tensor


# ---------------------------------------------------------------------------------------------------
# Mixed precision back-ends.

def make_grad_scaler(device, amp_dtype):
    """A GradScaler that is active only for float16 (bfloat16 has float32's range and needs none)."""
    enabled = amp_dtype == torch.float16
    if device.type == "npu" and enabled:
        return torch.npu.amp.GradScaler()  # torch_npu's own: NPUs report fp16 overflow their own way
    return torch.amp.GradScaler(device.type, enabled=enabled)


def load_apex_amp(device):
    """apex.amp for --amp_backend apex (NVIDIA apex on CUDA, Ascend apex on NPU), or a clear error."""
    if device.type == "cpu":
        raise RuntimeError("--amp_backend apex needs a CUDA GPU or an Ascend NPU; on a CPU use --amp_backend native")
    try:
        from apex import amp
    except ImportError:
        raise RuntimeError("--amp_backend apex was asked for but apex is not installed; install NVIDIA apex (CUDA) "
                           "or Ascend apex (NPU), or use --amp_backend native (torch.autocast + GradScaler)") from None
    return amp


class Precision:
    """A run's arithmetic: the autocast dtype (None: float32), loss scaling, and the backward and step around them.

    One of three set-ups, chosen once by make_precision: plain float32; native (torch.autocast, with a GradScaler
    for float16); apex O2 (an fp16 model with fp32 master weights, apex's own loss scaling). The loop calls
    autocast(), accumulate() per micro-batch, unscale_and_clip() and step() once per update (backward() is the
    one-micro-batch pair of the middle two) and never asks which one it is.
    """

    def __init__(self, device, amp_dtype, note="", apex_amp=None):
        self.device, self.amp_dtype, self.note, self.apex_amp = device, amp_dtype, note, apex_amp
        self.scaler = make_grad_scaler(device, amp_dtype)
        self._initialized, self._pending_apex_state = apex_amp is None, None

    @property
    def uses_apex(self):
        return self.apex_amp is not None

    def describe(self):
        """As the start-up line says it: 'float32', 'torch.bfloat16', 'torch.float16 with a GradScaler'."""
        return f"{self.amp_dtype or 'float32'}{' with a GradScaler' if self.scaler.is_enabled() else ''}"

    def initialize(self, model, optimizer):
        """apex casts the model and wraps the optimizer here (a no-op otherwise); returns (model, optimizer)."""
        if self.apex_amp is not None and not self._initialized:
            model, optimizer = self.apex_amp.initialize(model, optimizer, opt_level="O2", loss_scale="dynamic")
            self._initialized = True
            if self._pending_apex_state:
                self.apex_amp.load_state_dict(self._pending_apex_state)
        return model, optimizer

    def parameters_to_clip(self, model, optimizer):
        """The parameters whose gradients are clipped: apex's fp32 master copies (what the optimizer updates)."""
        if self.apex_amp is not None:
            return list(self.apex_amp.master_params(optimizer))
        return list(model.parameters())

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def backward(self, loss, optimizer, parameters, clip_norm):
        """Scale the loss, backpropagate, unscale the gradients and clip their norm to clip_norm; returns the norm
        (a tensor, before clipping: inf or NaN when the gradients overflowed). One micro-batch per update."""
        self.accumulate(loss, optimizer, last=True)
        return self.unscale_and_clip(optimizer, parameters, clip_norm)

    def accumulate(self, loss, optimizer, last=True):
        """Backpropagate one micro-batch's scaled loss, adding to the gradients of the micro-batches before it.
        The caller divides each loss by the number of micro-batches; `last` marks the update's final one."""
        if self.apex_amp is not None:
            # apex unscales into its fp32 master gradients on leaving scale_loss: only after the last micro-batch
            with self.apex_amp.scale_loss(loss, optimizer, delay_unscale=not last) as scaled_loss:
                scaled_loss.backward()
        else:
            self.scaler.scale(loss).backward()  # scale does nothing for a disabled scaler

    def unscale_and_clip(self, optimizer, parameters, clip_norm):
        """Once per update, after the last accumulate(): unscale the summed gradients and clip their norm;
        returns the norm before clipping (a tensor: inf or NaN when the gradients overflowed)."""
        if self.apex_amp is None:
            self.scaler.unscale_(optimizer)  # nothing for a disabled scaler
        return torch.nn.utils.clip_grad_norm_(parameters, clip_norm)

    def step(self, optimizer, finite):
        """The optimizer step, which leaves the weights alone when the step was not finite."""
        if self.apex_amp is not None:
            optimizer.step()  # apex skips overflowing steps itself
        elif self.scaler.is_enabled():
            self.scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
            self.scaler.update()
        elif finite:
            optimizer.step()

    def state_dict(self):
        """{'scaler': ..., 'amp': ...} as a checkpoint holds them (None where not in use)."""
        return {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "amp": self.apex_amp.state_dict() if self.apex_amp is not None else None}

    def load_state_dict(self, state):
        """Load a checkpoint's 'scaler' and 'amp' entries where they apply; apex's waits for initialize()."""
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.apex_amp is not None and state.get("amp"):
            if self._initialized:
                self.apex_amp.load_state_dict(state["amp"])
            else:
                self._pending_apex_state = state["amp"]


def make_precision(device, train_config):
    """The Precision of train_config's fp16_run, amp_dtype and amp_backend on `device`.

    Raises RuntimeError when amp_backend apex is asked for but cannot run here.
    """
    amp_dtype, note = autocast_dtype(device, train_config["fp16_run"], train_config["amp_dtype"])
    if train_config["amp_backend"] == "apex" and train_config["fp16_run"]:
        return Precision(device, None, "apex O2: fp16 model with fp32 master weights", load_apex_amp(device))
    return Precision(device, amp_dtype, note)


# ---------------------------------------------------------------------------------------------------
# Launcher: `python distributed.py -c config.json [train.py flags]` runs train.py once per local
# device through torch's own launcher (torch.distributed.run, the code behind torchrun). The flags
# below belong to the launcher; everything else is passed to train.py unchanged.

def launcher_args(argv):
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # never take a train.py flag for an abbreviated launcher flag
        description="Start train.py once per local GPU/NPU (or --nproc_per_node processes) via torchrun.",
        epilog="All other flags (e.g. -c config.json -batch_size 8) are passed to train.py.")
    parser.add_argument("--nproc_per_node", type=int, default=None,
                        help="processes on this host (default: number of local GPUs/NPUs; 1 on a CPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="number of hosts")
    parser.add_argument("--node_rank", type=int, default=0, help="this host's index, 0..nnodes-1")
    parser.add_argument("--master_addr", default="127.0.0.1", help="address of the host with node_rank 0")
    parser.add_argument("--master_port", type=int, default=None,
                        help="a free port on the master (default: any free port for a single host, else 29500)")
    launcher, train_argv = parser.parse_known_args(argv)
    device_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    device_parser.add_argument("--device", "-device", default="auto")
    device_name = device_parser.parse_known_args(train_argv)[0].device  # read, not consumed: train.py needs it too
    if launcher.nproc_per_node is None:
        launcher.nproc_per_node = max(1, local_device_count(default_device_kind(device_name)))
    for name in ("nproc_per_node", "nnodes"):
        if getattr(launcher, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= launcher.node_rank < launcher.nnodes:
        parser.error(f"--node_rank {launcher.node_rank} must be in 0..{launcher.nnodes - 1}")
    return launcher, train_argv


def torchrun_argv(launcher, script, train_argv):
    argv = [f"--nproc_per_node={launcher.nproc_per_node}"]
    if launcher.nnodes == 1 and launcher.master_port is None:
        argv.append("--standalone")  # single host: torch finds a free port itself
    else:
        argv += [f"--nnodes={launcher.nnodes}", f"--node_rank={launcher.node_rank}",
                 f"--master_addr={launcher.master_addr}", f"--master_port={launcher.master_port or 29500}"]
    return argv + [script] + list(train_argv)


def worker_pids(script):
    """This process's children that run `script` (Linux: /proc; elsewhere none are found)."""
    pids = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                pids += [int(pid) for pid in f.read().split()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if os.fsencode(script) in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            pass  # ended meanwhile
    return found


class LauncherStop:
    """Ctrl-C and SIGTERM for the launcher: the workers finish their step, save and exit; the job exits 130 or 143.

    torchrun starts each worker in a session of its own, so a terminal's Ctrl-C or a signal to the launcher's
    process group (Slurm, `timeout`) reaches the launcher alone: each SIGINT or SIGTERM is passed on to the
    workers as it came, which train.py takes as a stop (a second SIGINT: stop at once; a third, for a worker
    stuck in a collective, kills them). torchrun's own handling (turned off here) would kill the workers 30 s
    after the first signal and end in a SignalException traceback.
    """

    def __init__(self, script):
        self.script, self.signal_name, self.interrupts, self.previous = script, None, 0, {}

    def _handle(self, signum, frame):
        first = self.signal_name is None
        if first:
            self.signal_name = signal.Signals(signum).name
            for name in ("torch.distributed.elastic", "torch.distributed.run"):  # its report of the workers' exit
                logging.getLogger(name).setLevel(logging.CRITICAL)
        self.interrupts += signum == signal.SIGINT
        if not self.signal_workers(signal.SIGKILL if self.interrupts > 2 else signum) and first:
            # No worker yet (or no /proc to find them): stop torchrun itself, which stops any it started
            # with SIGTERM (they save, in its 30 s).
            raise KeyboardInterrupt

    def signal_workers(self, signum):
        """Send `signum` to the workers; returns how many there were."""
        pids = worker_pids(self.script)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except OSError:
                pass  # ended meanwhile
        return len(pids)

    @property
    def exit_code(self):
        return 128 + signal.Signals[self.signal_name].value

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def describe_failure(error):
    """One line for the first failed worker of torchrun's ChildFailedError."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    return f"error: a training process failed: rank {rank} (pid {failure.pid}) {how}; see its output above"


def main(argv=None):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    launcher, train_argv = launcher_args(sys.argv[1:] if argv is None else argv)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    # torchrun's lines about each worker's exit and the ones it stops: the one line below says what matters.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    with LauncherStop(script) as stop:
        try:
            # SIGINT and SIGTERM are LauncherStop's; torchrun keeps its handling of the others.
            torchrun_main(["--signals_to_handle=SIGHUP,SIGQUIT"] + torchrun_argv(launcher, script, train_argv))
        except KeyboardInterrupt:  # a stop before any worker ran
            return stop.exit_code if stop.signal_name is not None else 130
        except ChildFailedError as error:
            if stop.signal_name is not None:
                return stop.exit_code  # train.py said where it saved
            _, first = error.get_first_failure()  # the others were stopped because of it
            if first.exitcode in (1, 2, 130, 143):  # train.py's own exits, each after saying why (on rank 0)
                return first.exitcode
            print(describe_failure(error), file=sys.stderr, flush=True)
            return 1
    return 0  # every worker ran to the end (a signal that came after the last step stops nothing)


if __name__ == "__main__":
    sys.exit(main())
