"""Export a trained WaveGlow to ONNX, and run the exported graph with onnxruntime.

    python export.py -w checkpoints/waveglow_21000 -o waveglow.onnx
    python inference.py --onnx waveglow.onnx -f mel_files.txt -o out/ -s 0.6 --seed 1 -d 0.1

The graph computes WaveGlow.reverse with weight norm folded: inputs `mel` (B, n_mel, F) and `z`
(B, n_group, hop F / n_group), both float32, where z is the noise already scaled by sigma, in the channel order
WaveGlow.reverse takes (inference.make_noise draws it); output `audio` (B, hop F), hop being the model's (256 for upstream's). B and F are dynamic.

What we measured, config.json's model on a 2-core AVX2 AMD EPYC (heavily shared, so ratios only), onnxruntime
1.32, torch 2.13's exporter (dynamo, opset 20, its optimiser folds the constants):
- onnxruntime float32 made 1 s of audio in 31.9 s where PyTorch's float32 path (glow.py's folded matrix-product
  inference) took 41.2 s: 1.3x as fast; 10 s of audio in 261.7 s against 291.7 s: 1.1x. Parity 135 dB SNR at
  16 frames, 1 s and 10 s, z = 0 against sigma 0 121 dB.
- Graph optimisation level ENABLE_ALL and ENABLE_BASIC ran equally fast (31.8 s and 31.9 s): the graph is
  convolutions, matrix products and pointwise ops, which the exporter's optimiser has already cleaned up.
- intra_op_num_threads 0 (one per physical core) beat 1 thread (35.0 s); 0 is the default here.
- Opsets were not timed: after opset 13 this graph's ops (Conv, ConvTranspose, MatMul, Tanh, Sigmoid, Exp, the
  shape ops) only gained types or attributes it does not use, so another opset runs the same kernels; the
  exporter's default (20) stays, and --opset picks another.
- The plain layer-by-layer graph was already faster than PyTorch's rearranged path, so the graph does not
  copy glow.py's fused matrices.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, checkpoint_audio, load_model
from glow import DEFAULT_HOP_LENGTH


class TraceableReverse(nn.Module):
    """WaveGlow.reverse(mel, z) -> audio written with plain tensor operations only, for export.

    glow.py's CPU inference path rearranges the math into cached matrices and in-place products, which an
    exporter cannot follow; this module reads the same (folded) weights and computes the same function layer by
    layer, so the exported graph has no dependence on glow.py's speed paths.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model  # folded weights, shared, not copied
        self.n_group, self.n_flows = model.n_group, model.n_flows
        self.n_early_every, self.n_early_size = model.n_early_every, model.n_early_size
        # W^-1 in float64 then float32, as glow.py's cached inverse, so both paths multiply by the same matrix
        for k, inv in enumerate(model.convinv):
            weight = inv.conv.weight.detach().squeeze(2).double()
            self.register_buffer(f"inverse_{k}", torch.linalg.inv(weight).float(), persistent=False)

    def coupling(self, wn, audio_0, spect):
        C = wn.n_channels
        h = F.conv1d(audio_0, wn.start.weight, wn.start.bias)  # (B, C, T/g)
        conds = F.conv1d(spect, wn.cond_layer.weight, wn.cond_layer.bias).split(2 * C, dim=1)
        skip = None
        for i, (in_layer, res_skip_layer) in enumerate(zip(wn.in_layers, wn.res_skip_layers, strict=True)):
            x = F.conv1d(h, in_layer.weight, in_layer.bias, padding=in_layer.padding,
                         dilation=in_layer.dilation) + conds[i]  # (B, 2C, T/g)
            acts = torch.tanh(x[:, :C]) * torch.sigmoid(x[:, C:])
            res_skip = F.conv1d(acts, res_skip_layer.weight, res_skip_layer.bias)
            if i < wn.n_layers - 1:
                h = h + res_skip[:, :C]
                res_skip = res_skip[:, C:]
            skip = res_skip if skip is None else skip + res_skip
        return F.conv1d(skip, wn.end.weight, wn.end.bias)  # (B, 2 n_rest, T/g)

    def forward(self, mel, z):
        # mel (B, n_mel, F), z (B, g, hop F / g) -> audio (B, hop F)
        batch, n_mel, frames = mel.shape
        g = self.n_group
        upsample = self.model.upsample
        hop, kernel = self.model.hop_length, upsample.kernel_size[0]
        spect = F.conv_transpose1d(mel, upsample.weight, upsample.bias, stride=hop)
        spect = spect[:, :, :spect.size(2) - (kernel - hop)]  # (B, n_mel, hop F)
        steps = spect.size(2) // g
        spect = spect.reshape(batch, n_mel, steps, g).permute(0, 1, 3, 2).reshape(batch, n_mel * g, steps)
        early_end = self.n_early_size * ((self.n_flows - 1) // self.n_early_every)
        audio = z[:, early_end:]  # (B, n_remaining, T/g)
        for k in reversed(range(self.n_flows)):
            n_half = audio.size(1) // 2
            audio_0, audio_1 = audio[:, :n_half], audio[:, n_half:]
            output = self.coupling(self.model.WN[k], audio_0, spect)
            n_rest = audio_1.size(1)
            audio_1 = (audio_1 - output[:, :n_rest]) * torch.exp(-output[:, n_rest:])
            audio = torch.matmul(getattr(self, f"inverse_{k}"), torch.cat([audio_0, audio_1], 1))
            if k % self.n_early_every == 0 and k > 0:
                early_end -= self.n_early_size
                audio = torch.cat([z[:, early_end:early_end + self.n_early_size], audio], 1)
        return audio.permute(0, 2, 1).reshape(batch, -1)


def _missing(package, purpose):
    return RuntimeError(f"{purpose} needs the '{package}' package, which is not installed: pip install {package} "
                        f"(it is listed in requirements.txt; CPU wheels are enough)")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise _missing("onnxruntime", "running an ONNX graph") from None
    return onnxruntime


def export_onnx(model, path, opset=None, metadata=None):
    """Write `model` (a folded, eval-mode glow.WaveGlow on the CPU) to `path` as an ONNX graph; returns the opset.

    The file appears whole or not at all: it is written beside `path`, then renamed.
    """
    for package in ("onnx", "onnxscript"):  # torch.onnx's exporter builds the graph with both
        try:
            __import__(package)
        except ImportError:
            raise _missing(package, "export") from None
    module = TraceableReverse(model).eval()
    steps_per_frame = model.hop_length // model.n_group
    # example shapes of size >= 2, which torch.export keeps symbolic (a 1 would be specialised)
    mel = torch.zeros(2, model.n_mel_channels, 4)
    z = torch.zeros(2, model.n_group, 4 * steps_per_frame)
    batch, frames = torch.export.Dim("batch", min=1), torch.export.Dim("frames", min=1)
    # torch's exporter warns about its own internals (a deprecated pytree check, the naming of the batch axis it
    # shares between mel and z, torchvision operators this graph never uses); nothing a user can act on
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    registry_level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(LeafSpec|axis name: batch)")
            program = torch.onnx.export(
                module, (mel, z), None, input_names=["mel", "z"], output_names=["audio"], opset_version=opset,
                dynamic_shapes={"mel": {0: batch, 2: frames}, "z": {0: batch, 2: steps_per_frame * frames}},
                dynamo=True, external_data=False, verbose=False)
    finally:
        registry_log.setLevel(registry_level)
    metadata = {"hop_length": model.hop_length, **(metadata or {})}  # the graph's noise is hop x F samples long
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    partial = f"{path}.partial"
    try:
        program.save(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return program.model.opset_imports[""]


def session_options(onnxruntime, threads=0):
    """What we measured fastest on CPUs (see the notes in this module's docstring)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads  # 0: one per physical core
    return options


class OnnxWaveGlow(nn.Module):
    """An exported graph behind glow.WaveGlow's inference interface (n_mel_channels, n_group, reverse, infer), so
    inference.py's batching, noise, chunking and denoiser run it unchanged. Holds no PyTorch weights."""

    def __init__(self, path, threads=0):
        super().__init__()
        onnxruntime = import_onnxruntime()
        if not os.path.isfile(path):
            raise ValueError(f"{path}: ONNX file not found; make one with python export.py -w CHECKPOINT -o {path}")
        try:
            self.session = onnxruntime.InferenceSession(path, session_options(onnxruntime, threads),
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{path}: onnxruntime cannot load it as an ONNX graph ({reason})") from None
        inputs = {node.name: node.shape for node in self.session.get_inputs()}
        outputs = [node.name for node in self.session.get_outputs()]
        if set(inputs) != {"mel", "z"} or outputs != ["audio"]:
            raise ValueError(f"{path}: not a graph from export.py (inputs {sorted(inputs)}, outputs {outputs}; "
                             f"expected mel, z -> audio)")
        self.n_mel_channels, self.n_group = inputs["mel"][1], inputs["z"][1]
        metadata = {}
        for key, value in self.session.get_modelmeta().custom_metadata_map.items():
            with contextlib.suppress(json.JSONDecodeError):  # export.py writes JSON; other tools' notes are skipped
                metadata[key] = json.loads(value)
        # what inference.py reads off a checkpoint: the mel settings of audio inputs and its log line
        self.checkpoint = {"config": metadata.get("config"), "flavour": f"ONNX of {metadata.get('flavour', '?')}",
                           "iteration": metadata.get("iteration", 0),
                           "audio": {"sampling_rate": metadata.get("sampling_rate"),
                                     "hop_length": int(metadata.get("hop_length", DEFAULT_HOP_LENGTH))}}
        self.hop_length = self.checkpoint["audio"]["hop_length"]  # audio samples per mel frame

    def reverse(self, mel, z):
        """mel (B, n_mel, F), z (B, g, hop F / g) -> audio (B, hop F) float32, on the mel's device."""
        feeds = {"mel": np.ascontiguousarray(mel.detach().float().cpu().numpy()),
                 "z": np.ascontiguousarray(z.detach().float().cpu().numpy())}
        return torch.from_numpy(self.session.run(["audio"], feeds)[0]).to(mel.device)

    forward = reverse

    def infer(self, mel, sigma=1.0, seed=None):
        """As glow.WaveGlow.infer: noise N(0, sigma^2), from `seed` when given."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(mel.size(0), self.n_group, self.hop_length * mel.size(2) // self.n_group, generator=generator)
        return self.reverse(mel, z * sigma)


def snr_db(reference, test):
    noise = float(((reference.double() - test.double()) ** 2).sum())
    signal = float((reference.double() ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def parity(model, graph, frames_list, sigma=0.6, seed=0):
    """[(frames, SNR dB of the graph's audio against model.reverse)] for seeded noise at each length, then
    (0, SNR) for z = 0 against model.infer at sigma 0."""
    results = []
    for frames in frames_list:
        generator = torch.Generator().manual_seed(seed + frames)
        mel = torch.randn(1, model.n_mel_channels, frames, generator=generator) * 1.5 - 5.0  # log-mel-like levels
        z = torch.randn(1, model.n_group, model.hop_length * frames // model.n_group, generator=generator) * sigma
        with torch.no_grad():
            results.append((frames, snr_db(model.reverse(mel, z), graph.reverse(mel, z))))
    mel = torch.randn(1, model.n_mel_channels, frames_list[0], generator=torch.Generator().manual_seed(seed)) - 5.0
    with torch.no_grad():
        results.append((0, snr_db(model.infer(mel, sigma=0.0), graph.infer(mel, sigma=0.0))))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a WaveGlow checkpoint (any flavour) to ONNX: mel, z -> audio")
    parser.add_argument("-w", "--waveglow_path", required=True, help="checkpoint of any flavour")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's own)")
    parser.add_argument("--parity_frames", type=int, nargs=3, default=[16, 87, 400], metavar="F",
                        help="mel lengths of the parity check against PyTorch (default: 16 87 400 frames)")
    parser.add_argument("--sigma", type=float, default=0.6, help="noise scale of the parity check")
    args = parser.parse_args(argv)
    if min(args.parity_frames) < 1:
        parser.error("--parity_frames must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model, checkpoint = load_model(args.waveglow_path, "cpu", for_inference=True)  # weight norm folded
        print(f"Loaded {args.waveglow_path} ({checkpoint['flavour']}, iteration {checkpoint['iteration']})")
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise ValueError(f"cannot write {args.output}: folder {folder} does not exist")
        metadata = {"flavour": checkpoint["flavour"], "iteration": checkpoint["iteration"],
                    "config": checkpoint.get("config"), "checkpoint": os.path.basename(args.waveglow_path),
                    **checkpoint_audio(checkpoint, args.waveglow_path)}  # its hop and sampling rate
        opset = export_onnx(model, args.output, args.opset, metadata)
        graph = OnnxWaveGlow(args.output)
    except (CheckpointError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.output) / 2 ** 20
    print(f"Wrote {args.output} ({size:.1f} MiB), opset {opset}")
    for node in graph.session.get_inputs() + graph.session.get_outputs():
        print(f"  {node.name}: {node.type} {node.shape}")
    results = parity(model, graph, args.parity_frames, args.sigma)
    lengths = ", ".join(f"{frames} frames {snr:.1f} dB" for frames, snr in results[:-1])
    print(f"Parity against PyTorch float32 (SNR, sigma {args.sigma}): {lengths}; z = 0 against sigma 0: "
          f"{results[-1][1]:.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
