"""Speed and memory of WaveGlow against the machine's own limit, all measured in one run.

    python bench.py                      # config.json model, CPU or GPU picked automatically
    python bench.py --device cuda --train_batch 10 --train_segment 16000
    python bench.py --quick              # small shapes, a smoke run

It prints the machine limit (a 256->512, k=3 Conv1d over a long sequence and a large matmul, float32 and
low precision), the model's FLOP count, training throughput (output audio samples per second) and
inference real-time factor, each with the achieved FLOP/s as a share of the measured limit, and peak
memory; then a Markdown table for the README. A straightforward float32 implementation of the same math
(baseline.py's BaselineWaveGlow: plain weight-normed Conv1d layers, the gate as separate ops) runs beside
ours so the speed-ups are measured in the same run, on the same weights; on CPUs an onnxruntime row times the
graph export.py writes (--onnx). Training and inference variants are timed in interleaved rounds (median of
each), so a drift of the machine's speed hits them alike; ours trains as train.py does (fused Adam, and on
CPUs distributed.cpu_memory_reuse), the baseline with torch's defaults, and each training row prints its page
faults and system CPU time per step. GPU timings synchronise the device. Float32 inference on CPUs
is timed as a model runs once it has synthesised ~7 s of audio (a server, a long list of clips): with its
frame-conditioning matrices (glow_fast.reverse_conditioning), whose build time is printed; the row "first ~7 s
of audio" times the path before them.
"""
import argparse
import copy
import datetime
import json
import math
import platform
import resource
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from baseline import BaselineWaveGlow
from config import load_config
from distributed import EMULATED_BF16_SLOWDOWN, autocast_dtype, cpu_capability, cpu_memory_reuse, select_device
from export import OnnxWaveGlow, export_onnx, snr_db
from glow import WaveGlow, WaveGlowLoss, compile_coupling_networks, remove_weightnorm
from glow_fast import frame_conditioning_built, prepare_frame_conditioning
from mel2samp import TacotronSTFT


def macs_per_sample(model):
    """Forward multiply-adds per output sample, from the layer shapes (weight norm folded; biases ignored).

    Every WN and 1x1-conv layer runs once per group of n_group samples, with out*in*k MACs each time; the
    upsampler makes hop samples per mel frame with 80*80*(4 hop) MACs per frame.
    """
    per_group = 0
    for flow in range(model.n_flows):
        per_group += model.convinv[flow].conv.weight.numel()
        for module in model.WN[flow].modules():
            if isinstance(module, nn.Conv1d) or hasattr(module, "effective_weight"):
                weight = module.weight if isinstance(module, nn.Conv1d) else module.effective_weight()
                per_group += weight.numel()
    upsample = model.upsample.weight.numel() / model.upsample.stride[0]
    return per_group / model.n_group + upsample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak resident set size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def machine_limit(device, low_dtypes, lengths, matmul_sizes, repeats):
    """Best achieved GFLOP/s of a 256->512 k=3 Conv1d over several sequence lengths and of NxN matmuls:
    what this machine's dense kernels reach here and now, the yardstick for the model's figures."""
    limits = {}
    for dtype in [torch.float32] + low_dtypes:
        w = torch.randn(512, 256, 3, device=device, dtype=dtype)
        best = 0.0
        for length in lengths:
            x = torch.randn(1, 256, length, device=device, dtype=dtype)
            seconds = timed(lambda x=x, w=w: F.conv1d(x, w, padding=1), device, repeats)
            best = max(best, 2 * 512 * 256 * 3 * length / seconds / 1e9)
        limits[f"conv1d {dtype_name(dtype)}"] = best
        best = 0.0
        for size in matmul_sizes:
            a = torch.randn(size, size, device=device, dtype=dtype)
            seconds = timed(lambda a=a: a @ a, device, repeats)
            best = max(best, 2 * size ** 3 / seconds / 1e9)
        limits[f"matmul {dtype_name(dtype)}"] = best
    return limits


def dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def training_step(model, device, amp, batch, segment, fused_adam):
    """A function running one full training step of `model` (forward, backward, Adam) on random data."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused_adam or None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = WaveGlowLoss(1.0)
    mel = torch.randn(batch, 80, segment // model.hop_length + 1, device=device)
    audio = torch.rand(batch, segment, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = criterion(model((mel, audio)))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def interleaved_training(train_steps, device, rounds):
    """Median wall seconds, page faults and system CPU seconds of each variant's training step, timed in rounds
    that take every variant in turn (train_steps: name -> (step, reuse_memory)). Each timed step comes right after
    an untimed one of the same variant, within cpu_memory_reuse for reuse_memory as in train.py, so it meets
    the allocator in that variant's own steady state, as in a process of its own."""
    samples = {name: [] for name in train_steps}
    for _ in range(rounds):
        for name, (step, reuse_memory) in train_steps.items():
            with cpu_memory_reuse(device, enabled=reuse_memory):
                step()
                sync(device)
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                step()
                sync(device)
                seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            samples[name].append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    for name, runs in samples.items():
        print(f"train     {name:<28} timed steps, round by round: {', '.join(f'{run[0]:.2f}' for run in runs)} s")
    return {name: [statistics.median(values) for values in zip(*runs, strict=True)] for name, runs in samples.items()}


def synthesis(model, device, amp, mel, seed=0):
    """A function that synthesises `mel` once (same noise each call) and returns the audio."""
    model.eval()

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            z = torch.randn(1, model.n_group, mel.size(2) * model.hop_length // model.n_group, device=device,
                            generator=torch.Generator(device).manual_seed(seed))
            return model.reverse(mel, 0.6 * z).float()
    return run


ONNX_VARIANT = "onnxruntime fp32"


def onnxruntime_model(model, device):
    """export.OnnxWaveGlow of a folded `model`, timed beside the PyTorch variants; None, with a word, where it
    cannot run (it times onnxruntime's CPU provider; export needs onnx, onnxscript and onnxruntime)."""
    if device.type != "cpu":
        print(f"{ONNX_VARIANT}: skipped, it times onnxruntime's CPU provider and this run is on {device}")
        return None
    try:
        with tempfile.TemporaryDirectory() as folder:  # the session keeps the graph in memory
            path = f"{folder}/waveglow.onnx"
            started = time.perf_counter()
            export_onnx(model, path)
            print(f"{ONNX_VARIANT}: exported in {time.perf_counter() - started:.0f} s")
            return OnnxWaveGlow(path)
    except RuntimeError as error:  # a package missing
        print(f"{ONNX_VARIANT}: skipped, {error}")
        return None


def interleaved_seconds(runs, device, rounds, first_round=None):
    """Median wall time of each run, timed in rounds that take every run in turn: a drift of the machine's
    speed during the benchmark (shared hosts, clocks) then hits all variants alike, not the last ones.
    first_round(name, output), if given, sees each run's output in the first round, its peak memory counted
    from just before it (so long runs need no warm-up call of their own)."""
    seconds = {name: [] for name in runs}
    for round_index in range(rounds):
        for name, run in runs.items():
            if first_round is not None and round_index == 0:
                reset_peak_memory(device)
            sync(device)
            start = time.perf_counter()
            output = run()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            if first_round is not None and round_index == 0:
                first_round(name, output)
    return {name: statistics.median(values) for name, values in seconds.items()}


def time_before_frame_matrices(run, model, audio_seconds):
    """Real-time factor of one call of `run` on float32 `model` before it has frame-conditioning matrices (the
    folded path of a model's first ~7 s of audio, glow_fast.reverse_conditioning), or None where this call
    would build them."""
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    return None if frame_conditioning_built(model) else audio_seconds / elapsed


def speech_mel(seconds, device, data_config):
    """Mel of a pitch-gliding harmonic signal: realistic conditioning without any data files."""
    sampling_rate = data_config["sampling_rate"]
    t = torch.arange(int(seconds * sampling_rate), dtype=torch.float64) / sampling_rate
    phase = 2 * math.pi * torch.cumsum(120 * (1 + 0.2 * torch.sin(2 * math.pi * 1.3 * t)), 0) / sampling_rate
    signal = sum(torch.sin(h * phase) / h for h in range(1, 15)) * 0.3
    mel = TacotronSTFT.from_config(data_config).mel_spectrogram(signal.float().unsqueeze(0))
    return mel[:, :, :int(seconds * sampling_rate) // data_config["hop_length"]].to(device)


def trained_like(model, seed=0):
    """Give the zero-initialised output layers small random weights so couplings do real work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wn in model.WN:
            wn.end.weight.copy_(torch.randn(wn.end.weight.shape, generator=generator) * 2e-3)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train_batch", type=int, default=None, help="default: 2 on CPU, 12 on GPU")
    parser.add_argument("--train_segment", type=int, default=None, help="default: 16000")
    parser.add_argument("--train_steps", type=int, default=None)
    parser.add_argument("--infer_seconds", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds of each inference (median) and of the machine limit (default: 10 GPU, 3 CPU)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the plain float32 yardstick")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with torch.compile'd coupling networks (compile time not counted)")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the onnxruntime graph export.py writes (CPUs; the export of config.json's "
                             "model takes minutes, which is why it is not part of the default run)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks that everything runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = select_device(args.device)
    gpu = device.type != "cpu"
    torch.manual_seed(0)
    low_dtype, note = autocast_dtype(device, True)  # None on CPUs without bfloat16 units
    if device.type == "cpu":
        low_dtypes = [torch.bfloat16] if low_dtype is not None else []
    else:
        low_dtypes = [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float16]
    batch = args.train_batch or (12 if gpu else 2)
    segment = args.train_segment or 16000
    steps = args.train_steps or (10 if gpu else 2)
    repeats = args.repeats or (10 if gpu else 3)
    if args.quick:
        batch, segment, steps, repeats, args.infer_seconds = 1, 2048, 1, 1, [0.5, 1.0]
    config = load_config(args.config)  # merged with the defaults, so a config may leave model keys out
    waveglow_config = config["waveglow_config"]
    sampling_rate, hop_length = config["data_config"]["sampling_rate"], config["data_config"]["hop_length"]

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {datetime.date.today()}")
    if device.type == "cpu":
        capability = cpu_capability()
        print(f"cpu capability: {capability['isa']}, native bfloat16: {'yes' if capability['bf16'] else 'no'}, "
              f"native float16: {'yes' if capability['fp16'] else 'no'}, {capability['threads']} threads")
        if low_dtype is None:
            print(f"skipped: the bf16 variants and limits (no bfloat16 units here, emulated bf16 is "
                  f"{EMULATED_BF16_SLOWDOWN}); float32 is this CPU's fast path")
    elif note:
        print(note)
    lengths = [4096] if args.quick else ([2048, 16384, 65536] if not gpu else [16384, 262144])
    sizes = [512] if args.quick else ([1024, 2048, 3072] if not gpu else [4096, 8192])
    limits, peak = {}, {}

    def measure_limits(when):
        """The machine's limits, measured now and kept at their best so far: a shared host can be slower at the
        start than later, and a share of a limit measured in a slow moment would overstate the model's."""
        for name, value in machine_limit(device, low_dtypes, lengths, sizes, repeats + 1).items():
            print(f"machine limit  {name:<12} {value:10.1f} GFLOP/s ({when})")
            limits[name] = max(value, limits.get(name, 0.0))
        for key, dtype in [("fp32", torch.float32)] + [(dtype_name(dtype), dtype) for dtype in low_dtypes]:
            peak[key] = max(limits[f"conv1d {dtype_name(dtype)}"], limits[f"matmul {dtype_name(dtype)}"])
    measure_limits("at the start")

    ours = trained_like(WaveGlow(**waveglow_config, hop_length=hop_length)).to(device)
    macs = macs_per_sample(remove_weightnorm(copy.deepcopy(ours)))
    forward_flop = 2 * macs
    print(f"model: {sum(p.numel() for p in ours.parameters()):,} parameters; {macs * waveglow_config['n_group'] / 1e6:.1f} M "
          f"multiply-adds per group of {waveglow_config['n_group']} samples = {forward_flop / 1e6:.1f} MFLOP per output "
          f"sample forward ({forward_flop * sampling_rate / 1e9:.0f} GFLOP per second of audio); training ~3x")

    rows = []

    def report(kind, name, rate, unit, flop_per_unit, dtype_key, memory):
        achieved = rate * flop_per_unit / 1e9
        share = 100 * achieved / peak[dtype_key]
        rows.append({"kind": kind, "variant": name, "rate": rate, "unit": unit, "gflops": achieved,
                     "share_of_peak": share, "peak_key": dtype_key, "peak_memory_mib": memory})
        print(f"{kind:<9} {name:<28} {rate:12.2f} {unit:<10} {achieved:8.1f} GFLOP/s = {share:5.1f}% of "
              f"{dtype_key} peak   peak memory {memory:8.0f} MiB")

    baseline = None
    if not args.no_baseline:
        baseline = BaselineWaveGlow(**waveglow_config, hop_length=hop_length).to(device)
        baseline.load_upstream_state_dict(ours.state_dict())
    train_variants = [("ours fp32", ours, None)]
    if baseline is not None:
        train_variants.insert(0, ("baseline fp32", baseline, None))
    if low_dtype is not None:
        train_variants.append((f"ours {dtype_name(low_dtype)} autocast", ours, low_dtype))
    if device.type == "cuda":
        train_variants.append(("ours bf16 autocast", ours, torch.bfloat16))
    if args.compile:
        train_variants += [(f"{name}, compiled", model, amp) for name, model, amp in train_variants if model is ours]
    # Training shapes never change, so cuDNN may time its algorithms once and keep the fastest (as train.py).
    torch.backends.cudnn.benchmark = True
    train_steps, train_memory = {}, {}
    for name, model, amp in train_variants:
        # Ours trains as train.py does (fused Adam on CPU/CUDA, cpu_memory_reuse); the baseline with torch's default
        # Adam and allocator.
        fused_adam = model is ours and device.type in ("cpu", "cuda")
        reuse_memory = model is ours
        model = copy.deepcopy(model)
        if name.endswith("compiled"):
            compile_coupling_networks(model)
        step = training_step(model, device, amp, batch, segment, fused_adam)
        train_steps[name] = (step, reuse_memory)
        # A first step makes the optimizer's state; a compiled model compiles then and may again at the second (a
        # guard on the first's state).
        reset_peak_memory(device)
        with cpu_memory_reuse(device, enabled=reuse_memory):
            for _ in range(2 if name.endswith("compiled") else 1):
                step()
            sync(device)
            train_memory[name] = peak_memory_mib(device)  # the process's, holding the variants warmed up before too
    train_rates = {}
    timings = interleaved_training(train_steps, device, steps)
    measure_limits("again after training; the shares use the best of both")
    for name, _, amp in train_variants:
        seconds, faults, system_seconds = timings[name]
        train_rates[name] = rate = batch * segment / seconds
        report("train", f"{name} b{batch}x{segment}", rate, "samples/s", 3 * forward_flop,
               dtype_name(amp) if amp else "fp32", train_memory[name])
        rows[-1].update(page_faults_per_step=faults, system_seconds_per_step=system_seconds)
        print(f"          {'':<28} {faults:,.0f} page faults and {system_seconds:.2f} s of system CPU time per step")
    del train_steps, step, model  # the training copies and their optimizers

    folded = remove_weightnorm(copy.deepcopy(ours)).eval()
    infer_variants = [("ours fp32", folded, None)]
    if low_dtype is not None:
        infer_variants.append((f"ours {dtype_name(low_dtype)} autocast", folded, low_dtype))
    if args.compile:
        infer_variants.append(("ours fp32, compiled", compile_coupling_networks(copy.deepcopy(folded)), None))
    if args.compile and low_dtype is not None:
        # As inference.py --compile: on CPUs the low-precision model keeps its WN weights in that dtype.
        compiled_low = compile_coupling_networks(copy.deepcopy(folded), low_dtype if device.type == "cpu" else None)
        infer_variants.append((f"ours {dtype_name(low_dtype)} autocast, compiled", compiled_low, low_dtype))
    if baseline is not None:
        infer_variants.insert(0, ("baseline fp32", baseline, None))
    onnx_model = onnxruntime_model(folded, device) if args.onnx else None
    if onnx_model is not None:
        infer_variants.append((ONNX_VARIANT, onnx_model, None))
    torch.backends.cudnn.benchmark = False  # inference.py meets a new length with every clip
    infer_rtf, snrs = {}, {}
    for index, seconds in enumerate(args.infer_seconds):
        mel = speech_mel(seconds, device, config["data_config"])
        runs = {name: synthesis(model, device, amp, mel) for name, model, amp in infer_variants}
        audio, memory = {}, {}
        # Warm-up, one variant at a time for its peak memory: every variant at the first length (first calls build
        # caches and kernels), compiled ones at each (they compile for a new shape). Other runs take their peak
        # memory and output from the first timed round.
        for name, run in runs.items():
            if index > 0 and not name.endswith("compiled"):
                continue
            reset_peak_memory(device)
            started = time.perf_counter()
            for _ in range(2 if name.endswith("compiled") else 1):
                audio[name] = run()
            sync(device)
            memory[name] = peak_memory_mib(device)
            if name.startswith("ours"):
                print(f"first call of infer {name} {seconds:g}s, building what it caches: "
                      f"{time.perf_counter() - started:.2f} s")
        if device.type == "cpu" and not frame_conditioning_built(folded):
            cold_rtf = time_before_frame_matrices(runs["ours fp32"], folded, mel.size(2) * hop_length / sampling_rate)
            if cold_rtf is not None:
                report("infer", f"ours fp32 {seconds:g}s, first ~7 s of audio", cold_rtf, "x realtime",
                       forward_flop * sampling_rate, "fp32", memory["ours fp32"])
            started = time.perf_counter()
            size = prepare_frame_conditioning(folded)
            print(f"ours fp32: frame-conditioning matrices built in {time.perf_counter() - started:.1f} s "
                  f"({size / 2 ** 30:.1f} GiB), as a model does by itself once it has synthesised ~7 s of audio; "
                  f"the timed runs use them")

        def first_round(name, output, audio=audio, memory=memory):
            audio.setdefault(name, output)
            memory[name] = max(memory.get(name, 0), peak_memory_mib(device))
        timings = interleaved_seconds(runs, device, repeats, first_round)
        for name, _, amp in infer_variants:
            infer_rtf[(name, seconds)] = rtf = mel.size(2) * hop_length / sampling_rate / timings[name]
            if amp is not None or name == ONNX_VARIANT:
                snrs[(name, seconds)] = snr_db(audio["ours fp32"], audio[name])
            report("infer", f"{name} {seconds:g}s", rtf, "x realtime", forward_flop * sampling_rate,
                   dtype_name(amp) if amp else "fp32", memory[name])
    for (name, seconds), value in snrs.items():
        print(f"SNR of {name} audio against float32, {seconds:g} s, same weights and noise: {value:.1f} dB")
    if baseline is not None:
        for name, rate in train_rates.items():
            if name != "baseline fp32":
                print(f"training speed-up over the float32 baseline, {name}: {rate / train_rates['baseline fp32']:.2f}x")
        for (name, seconds), rtf in infer_rtf.items():
            if name != "baseline fp32":
                print(f"inference speed-up over the float32 baseline, {seconds:g} s, {name}: "
                      f"{rtf / infer_rtf[('baseline fp32', seconds)]:.2f}x")

    print("\n| what | variant | rate | share of measured peak | peak memory |\n|---|---|---|---|---|")
    for row in rows:
        rate = f"{row['rate']:,.1f}" if row["rate"] >= 10 else f"{row['rate']:.3f}"
        print(f"| {row['kind']} | {row['variant']} | {rate} {row['unit']} | {row['share_of_peak']:.1f}% of "
              f"{row['peak_key']} ({peak[row['peak_key']]:.0f} GFLOP/s) | {row['peak_memory_mib']:,.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "limits": limits, "macs_per_sample": macs, "rows": rows,
                       "snr_db": {f"{k[0]} {k[1]}s": v for k, v in snrs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
