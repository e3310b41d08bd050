"""Speech from mel spectrograms (or copy synthesis from wavs) with a trained WaveGlow, and checkpoint evaluation.

    python inference.py -f mel_files.txt -w checkpoints/waveglow_21000 -o out/ --is_fp16 -s 0.6 -d 0.1
    python inference.py -w checkpoints/waveglow_21000 --eval_list test_files.txt -o eval/ [-c config.json]

The list holds mels, as `.pt` tensors or `.npy` arrays of shape (80, F) or (1, 80, F) (e.g. from `mel2samp.py`,
Tacotron 2 or FastPitch), and/or audio files, which are turned into mels first. Each input gives
`<name without .pt/.npy>_synthesis.wav`, 16-bit PCM.
File i of the list draws its noise from seed + i, so its audio does not depend on batching or chunking.
A mel of F frames gives exactly hop x F samples (the checkpoint's hop, read off its upsampler), written at the
checkpoint's sampling rate (or --sampling_rate). A mel file whose statistics look like another scale than the
natural-log magnitude mel (log10, decibels, normalised) gets one warning naming it (mel_scale_problem).
The mel settings for audio inputs and evaluation come from -c (read by config.load_config: unknown keys are
refused), else the checkpoint's own config, else the repo's config.json (config.checkpoint_data_config).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from scipy.io import wavfile
from tqdm import tqdm

from checkpoint import CheckpointError, checkpoint_audio, load_model
from config import checkpoint_data_config
from denoiser import Denoiser
from distributed import autocast_dtype, select_device
from evaluate import (SCORE_LABELS, copy_synthesis_score, json_safe, mean_scores, plot_mel_comparison,
                      require_score_packages, validation_nll, vocoder_scores)
from glow import compile_coupling_networks
from mel2samp import (MAX_WAV_VALUE, SILENT_LOG_MEL, AudioError, Mel2Samp, TacotronSTFT, files_to_list,
                      load_wav_to_torch)

EVAL_SIGMA, EVAL_SEED = 0.6, 1234


class InputError(Exception):
    """One input that cannot be synthesised; the others still are."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="WaveGlow inference: mels or wavs to speech; --eval_list evaluates")
    parser.add_argument("-f", "--filelist_path", help="list of mel files (.pt or .npy) and/or audio files, one per "
                                                      "line (relative paths: from the list's folder, else the cwd)")
    parser.add_argument("-w", "--waveglow_path", help="checkpoint of any flavour")
    parser.add_argument("--onnx", help="instead of -w: a graph from export.py, run with onnxruntime on the CPU")
    parser.add_argument("-o", "--output_dir", required=True)
    parser.add_argument("-s", "--sigma", type=float, default=None,
                        help=f"noise scale (default 1.0, as upstream; {EVAL_SIGMA} in evaluation)")
    parser.add_argument("--sampling_rate", type=int, default=None,
                        help="rate written into the wavs (default: the checkpoint's; else -c's)")
    parser.add_argument("--is_fp16", action="store_true",
                        help="mixed precision: float16 autocast on CUDA/NPU, bfloat16 on CPU (see --amp_dtype)")
    parser.add_argument("--amp_dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                        help="the dtype of --is_fp16 (auto: as above; bfloat16 also on GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the coupling networks: faster on GPUs after a compile of each new "
                             "length (up to a minute), so for long lists of similar lengths")
    parser.add_argument("-d", "--denoiser_strength", type=float, default=0.0, help="bias-spectrum denoiser (0 = off)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:i] or npu[:i]")
    parser.add_argument("--batch_size", type=int, default=1, help="mels per forward pass (grouped by length)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"noise seed; list file i uses seed + i (default random; {EVAL_SEED} in evaluation)")
    parser.add_argument("-c", "--config", help="config.json for the mel of audio inputs (default: the "
                                               "checkpoint's config, else the repo's config.json)")
    parser.add_argument("--max_frames", type=int, default=None,
                        help="longest mel per pass; longer ones go in crossfaded chunks "
                             "(default 2000 frames on CPU, 4000 on GPU/NPU)")
    parser.add_argument("--chunk_overlap", type=int, default=32, help="frames shared by neighbouring chunks")
    parser.add_argument("--eval_list", help="evaluate on these clips: validation NLL and copy-synthesis scores "
                                            "(mel L1, MCD, F0 RMSE, V/UV error, MR-STFT, PESQ, STOI)")
    args = parser.parse_args(argv)
    if not args.filelist_path and not args.eval_list:
        parser.error("give -f/--filelist_path to synthesise, or --eval_list to evaluate")
    if bool(args.waveglow_path) == bool(args.onnx):
        parser.error("give one model: -w/--waveglow_path (a checkpoint) or --onnx (an exported graph)")
    if args.onnx:  # the graph holds float32 weights for onnxruntime's CPU provider, and no training path
        unsupported = [flag for flag, given in (("--eval_list", args.eval_list), ("--is_fp16", args.is_fp16),
                                                ("--compile", args.compile),
                                                ("--device " + args.device, args.device not in ("auto", "cpu")))
                       if given]
        if unsupported:
            parser.error(f"--onnx runs float32 synthesis on the CPU; drop {', '.join(unsupported)} or use -w")
        args.device = "cpu"
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.chunk_overlap < 0:
        parser.error("--chunk_overlap must not be negative")
    return args


MEL_SUFFIXES = (".pt", ".npy")


def output_name(path):
    name = os.path.basename(path)
    return (name[:-3] if name.endswith(".pt") else os.path.splitext(name)[0]) + "_synthesis.wav"


def load_mel(path, n_mel_channels):
    """A mel file, .pt (torch tensor) or .npy (numpy array, never unpickled) -> (n_mel, F) float32 CPU tensor."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    is_array = path.endswith(".npy")
    try:
        if is_array:
            mel = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        else:
            mel = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kind = "a numpy array" if is_array else "a torch tensor"
        raise InputError(f"{path}: cannot read it as {kind} file ({reason})") from None
    if not isinstance(mel, torch.Tensor):
        raise InputError(f"{path}: holds a {type(mel).__name__}, not a mel tensor")
    if mel.dim() == 3 and mel.size(0) == 1:
        mel = mel[0]
    if mel.dim() != 2 or mel.size(0) != n_mel_channels or mel.size(1) < 1:
        # ESPnet-style and many other pipelines store mels time-major
        hint = (f"; it looks time-major (frames, {n_mel_channels}): save its transpose"
                if mel.dim() == 2 and mel.size(1) == n_mel_channels else "")
        raise InputError(f"{path}: mel of shape {tuple(mel.shape)}; the model takes ({n_mel_channels}, frames) "
                         f"or (1, {n_mel_channels}, frames){hint}")
    mel = mel.float()
    if not torch.isfinite(mel).all():
        raise InputError(f"{path}: the mel contains NaN or infinite values")
    return mel


EXPECTED_MEL = ("Tacotron 2's natural-log magnitude mel, log(clamp(mel, 1e-5)): about -11.5 (its floor) to 2, "
                "mean -3 (loud) to -10 (mostly silence), std near 2")


def mel_scale_problem(mel):
    """(what it looks like, how to convert it) for a mel whose statistics are not those of a natural-log
    magnitude mel, or None. Its min, max, mean and std only, so that any loudness and any share of silence pass.

    Calibrated on LJ-Speech through TacotronSTFT: natural-log mels span the floor log(1e-5) = -11.51 to about 2
    (2.4 for clips made 4x louder and clipped), mean -5 (-3 loud, -10.5 for clips mostly silence), std 1.8-3.4
    (1.4 for the tests' synthetic clips); predicted mels go a little under the floor, none reaches 6; with a
    floor of 1e-10 (-23) the std stays under 10. Of the same clips, log10 mels span its floor -5 to 0.9, std
    0.8-1.5; decibels (20 log10) -100 to 18 (-80 to 0 relative to the maximum), std 16-30; min-max [0, 1];
    mean-variance normalised: mean 0, std 1.
    """
    low, high, mean = mel.min().item(), mel.max().item(), mel.mean().item()
    std = mel.std(unbiased=False).item()
    if std < 1e-3:  # a constant mel: only its level can tell
        return None if SILENT_LOG_MEL - 1 <= mean <= 3 else (f"constant at {mean:.3g}", "check how it was made")
    if low >= 0:
        if high <= 1.001:
            return "min-max normalised to [0, 1]", "undo the normalisation with the min and max it was made with"
        return ("a linear (not log-compressed) mel, all values >= 0",
                "take log(clamp(mel, min=1e-5)) of a magnitude mel (of a power mel, half that of clamp 1e-10)")
    if low < -40 or (low < -20 and std > 10):  # no log floor in use goes under -28 (log 1e-12)
        return ("in decibels (20 log10 of the magnitude, or 10 log10 of the power)",
                "undo any reference-level shift, then multiply by ln(10) / 20 = 0.1151")
    if low < -13:
        return ("a log mel with a floor below log(1e-5)",
                f"clamp it at log(1e-5) = {SILENT_LOG_MEL:.2f}, as in training")
    if any(abs(high - bound) < 1e-3 and abs(low + bound) < 1e-3 for bound in (1, 4)):  # the usual such ranges
        return (f"min-max normalised to [-{high:.0f}, {high:.0f}]",
                "undo the normalisation with the range it was made with")
    if abs(mean) < 0.75 and 0.6 < std < 1.6:
        return "mean-variance normalised", "undo the normalisation with the mean and std it was made with"
    at_log10_floor = abs(low - math.log10(1e-5)) < 0.05
    narrow = std < 1.3 and -4.5 < mean and high - low < 6.5  # no floor reached: a log10 mel's narrow spread
    if high <= 1.6 and mean < -0.75 and (at_log10_floor or narrow):
        return "log10-compressed", "multiply it by ln(10) = 2.3026"
    if high > 6:
        return "beyond the range of a natural-log mel", "check how it was made"
    return None


def warn_of_mel_scale(path, mel):
    problem = mel_scale_problem(mel)
    if problem:
        looks, hint = problem
        print(f"warning: {path}: this mel looks {looks} (values {mel.min().item():.2f} to {mel.max().item():.2f}, "
              f"mean {mel.mean().item():.2f}, std {mel.std(unbiased=False).item():.2f}), but the model takes "
              f"{EXPECTED_MEL}; {hint}. Synthesising it as it is", file=sys.stderr)


def mel_of_audio(path, stft):
    """(mel (n_mel, F), audio (T,) in [-1, 1]) of an audio file at the config's sample rate."""
    try:
        audio, _ = load_wav_to_torch(path, stft.sampling_rate)
        audio = audio / MAX_WAV_VALUE
        return stft.mel_spectrogram(audio.unsqueeze(0))[0], audio
    except (AudioError, ValueError) as error:
        raise InputError(str(error) if str(path) in str(error) else f"{path}: {error}") from None


def make_noise(model, frames, sigma, seed, device):
    """z (1, n_group, hop * frames / n_group) as model.infer(mel, sigma, seed=seed) draws it."""
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    steps = model.hop_length * frames // model.n_group
    return torch.randn(1, model.n_group, steps, device=device, generator=generator) * sigma


def _reverse(model, mel, z, amp_dtype):
    cast = torch.autocast(mel.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.no_grad(), cast:
        return model.reverse(mel, z).float()


def _fade_in(overlap_samples, device):
    """0 over the first quarter of the overlap, a raised cosine to 1 over the middle half, 1 after.

    The quarters are margins: there each chunk's edge (the upsampler's missing left context, the
    convolutions' zero padding) would leak into the output, so only the other chunk is heard.
    """
    margin = overlap_samples // 4
    ramp = overlap_samples - 2 * margin
    rise = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, ramp + 2, device=device)[1:-1])
    return torch.cat([torch.zeros(margin, device=device), rise, torch.ones(margin, device=device)])


def synthesize(model, mel, z, amp_dtype=None, max_frames=2000, overlap=32):
    """mel (B, n_mel, F), z (B, g, hop F/g) -> audio (B, hop F) float32; long mels in crossfaded chunks."""
    frames, hop = mel.size(2), model.hop_length
    if frames <= max_frames:
        return _reverse(model, mel, z, amp_dtype)
    steps_per_frame = hop // model.n_group
    fade_in = _fade_in(overlap * hop, mel.device)
    audio = torch.zeros(mel.size(0), frames * hop, device=mel.device)
    start = 0
    while True:
        end = min(start + max_frames, frames)
        chunk = _reverse(model, mel[:, :, start:end], z[:, :, start * steps_per_frame:end * steps_per_frame],
                         amp_dtype)
        if start > 0:  # fade in over the overlap with the previous chunk, which fades out there
            chunk[:, :fade_in.numel()] *= fade_in
        if end < frames:
            chunk[:, chunk.size(1) - fade_in.numel():] *= 1 - fade_in
        audio[:, start * hop:end * hop] += chunk
        if end == frames:
            return audio
        start = end - overlap


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def write_wav(path, audio, sampling_rate):
    """16-bit PCM; clipped first, so loud peaks saturate instead of wrapping around to the opposite sign."""
    samples = np.clip(audio.detach().float().cpu().numpy() * MAX_WAV_VALUE, -MAX_WAV_VALUE, MAX_WAV_VALUE - 1)
    wavfile.write(path, sampling_rate, samples.astype(np.int16))


class Synthesizer:
    """Everything a pass needs, so synthesis and evaluation share one code path.

    A batch pads its mels with silence (and zero noise) to the longest. Each clip then matches its
    one-by-one synthesis except in its last few milliseconds, within the network's receptive field of
    the end, where it hears silence instead of the end of the signal.
    """

    def __init__(self, model, device, amp_dtype, sigma, seed, max_frames, overlap, denoiser_strength):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.sigma, self.seed, self.max_frames, self.overlap = sigma, seed, max_frames, overlap
        self.denoiser_strength, self.denoiser = denoiser_strength, None
        if denoiser_strength > 0:
            cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with cast:  # the bias is measured in the precision the audio will be made in
                self.denoiser = Denoiser(model).to(device)

    def warm_up(self):
        """One short untimed pass: first calls pay for kernel selection and the cached 1x1 inverses."""
        self([torch.full((self.model.n_mel_channels, 16), SILENT_LOG_MEL)], [0])

    def __call__(self, mels, indices):
        """[(n_mel, F_i)] and their list positions -> [audio (hop F_i,)], one batch; returns (audios, seconds)."""
        longest, hop = max(mel.size(1) for mel in mels), self.model.hop_length
        batch = torch.full((len(mels), mels[0].size(0), longest), SILENT_LOG_MEL, device=self.device)
        z = torch.zeros(len(mels), self.model.n_group, hop * longest // self.model.n_group, device=self.device)
        for row, (mel, index) in enumerate(zip(mels, indices, strict=True)):
            batch[row, :, :mel.size(1)] = mel.to(self.device)
            seed = None if self.seed is None else self.seed + index
            z[row, :, :hop * mel.size(1) // self.model.n_group] = \
                make_noise(self.model, mel.size(1), self.sigma, seed, self.device)[0]
        synchronize(self.device)
        started = time.perf_counter()
        audio = synthesize(self.model, batch, z, self.amp_dtype, self.max_frames, self.overlap)
        outputs = [audio[row, :hop * mel.size(1)] for row, mel in enumerate(mels)]
        if self.denoiser is not None:
            outputs = [self.denoiser(out, self.denoiser_strength) for out in outputs]
        synchronize(self.device)
        return outputs, time.perf_counter() - started


def synthesize_list(args, synth, stft_maker, sampling_rate):
    """Synthesise every listed input; returns the number of inputs that failed."""
    paths = files_to_list(args.filelist_path)  # path or path|text lines; relative to the list, else the cwd
    names = [output_name(path) for path in paths]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"several inputs in {args.filelist_path} would be written to the same file "
                         f"({', '.join(clashes[:3])}); list them in separate runs with their own -o")
    n_mel = synth.model.n_mel_channels
    items, failures = [], []
    for index, path in enumerate(paths):
        try:
            if path.endswith(MEL_SUFFIXES):
                mel = load_mel(path, n_mel)
                warn_of_mel_scale(path, mel)
            else:
                mel = mel_of_audio(path, stft_maker())[0]
            items.append((mel.size(1), index, path, mel))
        except InputError as error:
            failures.append(str(error))
            print(f"error: {error}", file=sys.stderr)
    items.sort(key=lambda item: item[0])  # similar lengths share a batch, so little padding
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    if batches:
        synth.warm_up()
    total_audio, total_time = 0.0, 0.0
    for batch in tqdm(batches, unit="batch", disable=not batches):
        audios, seconds = synth([item[3] for item in batch], [item[1] for item in batch])
        batch_audio = sum(a.numel() for a in audios) / sampling_rate
        total_audio, total_time = total_audio + batch_audio, total_time + seconds
        for (_, _, path, _), audio in zip(batch, audios, strict=True):
            out_path = os.path.join(args.output_dir, output_name(path))
            write_wav(out_path, audio, sampling_rate)
            tqdm.write(f"{out_path}: {audio.numel() / sampling_rate:.2f} s of audio, real-time factor "
                       f"{batch_audio / seconds:.2f}" + (f" (batch of {len(batch)})" if len(batch) > 1 else ""))
    if items:
        print(f"Synthesised {len(items)} files, {total_audio:.2f} s of audio in {total_time:.2f} s: "
              f"real-time factor {total_audio / total_time:.2f}")
    if failures:
        print(f"{len(failures)} of {len(paths)} inputs failed: " + "; ".join(failures), file=sys.stderr)
    return len(failures)


def evaluate_checkpoint(args, synth, checkpoint, data, train_sigma, sampling_rate):
    """Validation NLL and copy-synthesis scores (evaluate.SCORE_KEYS) over the eval list; writes eval.json with
    each clip's scores and their means ("mean"). Returns failures."""
    require_score_packages()  # before the long NLL pass, not after it
    model = synth.model
    dataset = Mel2Samp.from_config(args.eval_list, data, n_mel_channels=model.n_mel_channels, deterministic=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    nll = validation_nll(model, loader, train_sigma, synth.device, synth.amp_dtype)
    print(f"Validation NLL: {nll:.6f}")
    stft = dataset.stft
    synth.warm_up()
    clips, failures, total_audio, total_time = [], [], 0.0, 0.0
    for index, path in enumerate(tqdm(files_to_list(args.eval_list), unit="clip")):
        try:
            mel, audio = mel_of_audio(path, stft)
        except InputError as error:
            failures.append(str(error))
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        (output,), seconds = synth([mel], [index])
        output = output[:audio.numel()]  # the input's length: the mel covered whole hops
        score, reference_mel, output_mel = copy_synthesis_score(stft, audio, output)
        stem = os.path.splitext(os.path.basename(path))[0]
        wav_path = os.path.join(args.output_dir, f"{stem}_synthesis.wav")
        png_path = os.path.join(args.output_dir, f"{stem}_mel.png")
        write_wav(wav_path, output, sampling_rate)
        plot_mel_comparison(reference_mel, output_mel, png_path, f"{stem}: copy synthesis, mel L1 {score:.3f}")
        scores = json_safe({**vocoder_scores(audio, output, stft.sampling_rate), "mel_l1": score})
        clips.append({"file": path, **scores, "wav": wav_path, "png": png_path})
        total_audio, total_time = total_audio + audio.numel() / sampling_rate, total_time + seconds
    mean_l1 = float(np.mean([clip["mel_l1"] for clip in clips])) if clips else float("nan")
    print(f"Copy-synthesis mel L1: {mean_l1:.6f}")
    means = mean_scores(clips)
    for key, label in SCORE_LABELS.items():  # one line each, the value last (the launchers read it so)
        print(f"Copy-synthesis {label}: {'nan' if means.get(key) is None else f'{means[key]:.6f}'}")
    if total_time > 0:
        print(f"Copy synthesis: {total_audio:.2f} s of audio, real-time factor {total_audio / total_time:.2f}")
    report = {"checkpoint": args.waveglow_path or args.onnx, "flavour": checkpoint["flavour"], "iteration": checkpoint["iteration"],
              "validation_nll": nll, "nll_sigma": train_sigma, "copy_synthesis_mel_l1": mean_l1,
              "sigma": synth.sigma, "seed": synth.seed, "denoiser_strength": args.denoiser_strength,
              "real_time_factor": total_audio / total_time if total_time > 0 else None,
              "mean": means, "clips": clips, "failed": failures}
    with open(os.path.join(args.output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return len(failures) + (0 if clips else 1)


def output_sampling_rate(args, checkpoint, data):
    """The rate the wavs are written at: --sampling_rate, else the checkpoint's (ours record it, other flavours'
    models of upstream's hop are 22050 Hz), else -c's."""
    # an ONNX graph (export.py) says its rate and hop in its metadata, a checkpoint by its config and weights
    model_path = args.waveglow_path or args.onnx
    recorded = checkpoint.get("audio") or checkpoint_audio(checkpoint, model_path)
    if args.sampling_rate:
        return args.sampling_rate
    if recorded["sampling_rate"] is None and not args.config:
        raise ValueError(f"{model_path} ({checkpoint['flavour']}, hop {recorded['hop_length']}) does not "
                         f"record its sampling rate: pass --sampling_rate, or -c with the config it was trained with")
    if args.config and recorded["sampling_rate"] not in (None, data["sampling_rate"]):
        print(f"warning: {args.config} says {data['sampling_rate']} Hz, but {model_path} was trained at "
              f"{recorded['sampling_rate']} Hz: audio inputs are read at {data['sampling_rate']} Hz, the wavs "
              f"written at {recorded['sampling_rate']} Hz", file=sys.stderr)
    return recorded["sampling_rate"] or int(data["sampling_rate"])


def check_mel_hop(data, source, model, path):
    """Mels made from audio here must have the model's hop: its upsampler makes hop samples per frame."""
    if data["hop_length"] != model.hop_length:
        raise ValueError(f"the mel settings from {source} have hop_length {data['hop_length']}, but the model of "
                         f"{path} takes hop {model.hop_length} (its upsampler): pass -c with the config it was "
                         f"trained with")


def main(argv=None):
    args = parse_args(argv)
    try:
        device = select_device(args.device)
        amp_dtype, note = autocast_dtype(device, args.is_fp16, args.amp_dtype)
        if note:  # one line: the precision this CPU or GPU runs, where it differs from what was asked
            print(note if note.startswith("warning:") else f"note: {note}")
        if args.onnx:  # onnxruntime runs the graph; torch still draws the same noise and does the denoiser's STFTs
            from export import OnnxWaveGlow
            model = OnnxWaveGlow(args.onnx)
            checkpoint = model.checkpoint
        else:
            model, checkpoint = load_model(args.waveglow_path, device, for_inference=True)
        print(f"Loaded {args.onnx or args.waveglow_path} ({checkpoint['flavour']}, iteration {checkpoint['iteration']}) "
              f"on {device}")
        if args.compile:  # a second new length recompiles once, for any length
            compile_coupling_networks(model, amp_dtype if device.type == "cpu" else None, dynamic=None)
        data, train_sigma, source = checkpoint_data_config(checkpoint, args.config)
        sampling_rate = output_sampling_rate(args, checkpoint, data)
        os.makedirs(args.output_dir, exist_ok=True)
        evaluating = bool(args.eval_list)
        sigma = args.sigma if args.sigma is not None else (EVAL_SIGMA if evaluating else 1.0)
        seed = args.seed if args.seed is not None or not evaluating else EVAL_SEED
        max_frames = args.max_frames or (2000 if device.type == "cpu" else 4000)
        if max_frames <= 2 * args.chunk_overlap:  # neighbouring crossfades must not overlap each other
            raise ValueError(f"--max_frames {max_frames} must exceed twice --chunk_overlap {args.chunk_overlap}")
        synth = Synthesizer(model, device, amp_dtype, sigma, seed, max_frames, args.chunk_overlap,
                            args.denoiser_strength)
        stft_cache = []

        def stft_maker():  # built on first use: only audio inputs need it
            if not stft_cache:
                check_mel_hop(data, source, model, args.waveglow_path or args.onnx)
                print(f"mel settings of audio inputs from {source}")
                stft_cache.append(TacotronSTFT.from_config(data, model.n_mel_channels))
            return stft_cache[0]

        failed = 0
        if args.filelist_path:
            failed += synthesize_list(args, synth, stft_maker, sampling_rate)
        if evaluating:
            check_mel_hop(data, source, model, args.waveglow_path or args.onnx)
            failed += evaluate_checkpoint(args, synth, checkpoint, data, train_sigma, sampling_rate)
    except (CheckpointError, ValueError, RuntimeError, OSError, AudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
