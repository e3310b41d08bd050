"""WaveGlow: a flow-based generative network for speech synthesis (Prenger, Valle, Catanzaro 2018).

Model math only: no files, devices or logging here. The layer layout, state-dict names and numbers
match NVIDIA/waveglow, so its checkpoints load, but the code runs on today's PyTorch on any device and
dtype. Under torch.autocast the WaveNet-like layers run in low precision while everything that touches
the audio itself (1x1 convolutions, coupling, log-determinants, loss) stays in float32.

The layers' measured fast paths (convolutions as matrix products, cached inference weights, the folded CPU
inference of WN, its float32 CPU forward with fewer multiply-adds, the CPU upsampler) live in glow_fast.py;
each layer reaches them through one call.
"""
import torch
from torch import nn

import glow_fast
from config import n_groups_for_hop

compile_coupling_networks = glow_fast.compile_coupling_networks  # a speed tool, importable from here as ever

# The upsampler is a transposed convolution of stride hop_length and kernel 4 * hop_length: F mel frames become
# hop * F + 3 * hop samples (upstream's 256 * F + 768), of which inference keeps the first hop * F.
DEFAULT_HOP_LENGTH = 256  # upstream's, for 22050 Hz audio
UPSAMPLE_KERNEL_PER_HOP = 4  # a model's own: model.hop_length, model.upsample.kernel_size[0]


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation w = g * v / ||v|| (norm over all dims but 0).

    Keeps upstream's parameter names (weight_g, weight_v, bias) without torch's deprecated hooks.
    After fold() it holds a plain `weight`; loading accepts either form, so a folded state dict
    loads into a training model and an upstream one into a folded model.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, dilation=1, padding=0):
        super().__init__()
        reference = nn.Conv1d(in_channels, out_channels, kernel_size)  # torch's default init
        weight = reference.weight.detach()
        self.weight_v = nn.Parameter(weight.clone())
        self.weight_g = nn.Parameter(_norm_except_dim0(weight))
        self.bias = nn.Parameter(reference.bias.detach().clone())
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.padding = padding
        self.folded = False

    def effective_weight(self):
        if self.folded:
            return self.weight
        # torch's fused kernel: one pass over v forward and backward, where the plain formula takes
        # several; with ~87 M weights this per-step cost matters on CPUs.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        # F.conv1d(x, w, bias, padding, dilation): (B, C_in, T) -> (B, C_out, T); glow_fast.conv1d runs it as
        # matrix products where those were measured faster
        return glow_fast.conv1d(x, self.effective_weight(), self.bias, self.padding, self.dilation,
                                folded_layer=self if self.folded else None)

    @torch.no_grad()
    def fold(self):
        if self.folded:
            return
        weight = self.effective_weight().detach().clone()
        del self.weight_v, self.weight_g
        self.weight = nn.Parameter(weight)
        self.folded = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        g, v, w = prefix + "weight_g", prefix + "weight_v", prefix + "weight"
        if self.folded and g in state_dict and v in state_dict:
            g_value, v_value = state_dict.pop(g), state_dict.pop(v)
            state_dict[w] = v_value * (g_value / _norm_except_dim0(v_value))
        elif not self.folded and w in state_dict:
            w_value = state_dict.pop(w)
            state_dict[v] = w_value
            state_dict[g] = _norm_except_dim0(w_value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        shape = tuple((self.weight if self.folded else self.weight_v).shape)
        return f"weight={shape}, dilation={self.dilation}, padding={self.padding}, folded={self.folded}"


def _norm_except_dim0(weight):
    return torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)


def _float32_region(tensor):
    """Autocast off for the audio path: the flow must stay exactly invertible."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class Invertible1x1Conv(nn.Module):
    """Invertible 1x1 convolution z -> W z with log|det W| for the likelihood."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=1, stride=1, padding=0, bias=False)
        W = torch.linalg.qr(torch.randn(c, c))[0]  # random orthonormal matrix
        if torch.det(W) < 0:  # make det = +1 so W starts as a rotation
            W[:, 0] = -W[:, 0]
        self.conv.weight.data = W.view(c, c, 1).contiguous()

    def forward(self, z, reverse=False):
        # z: (B, c, T/g), any dtype; computed in float32 (or the weight's dtype if wider)
        batch_size, _, n_of_groups = z.shape
        W = self.conv.weight
        with _float32_region(z):
            compute_dtype = torch.promote_types(W.dtype, torch.float32)
            # Matrix products rather than 1x1 convolutions: cuDNN runs float32 convolutions in TF32 by default,
            # whose 10-bit mantissa would cost the flow its exact invertibility on GPUs.
            if reverse:
                W_inverse = self._cached_inverse(compute_dtype)
                return torch.matmul(W_inverse, z.to(compute_dtype)).to(z.dtype)
            W2d = W.squeeze(2).to(compute_dtype)
            log_det_W = batch_size * n_of_groups * torch.linalg.slogdet(W2d)[1]
            return torch.matmul(W2d, z.to(compute_dtype)), log_det_W  # (c, c) @ (B, c, T/g)

    def _cached_inverse(self, dtype):
        # W^-1 for inference, computed in float64 once and kept until W changes (glow_fast.cached_per_dtype): never
        # stale, never saved.
        W = self.conv.weight
        return glow_fast.cached_per_dtype(self, dtype, [W],
                                          lambda: torch.linalg.inv(W.detach().squeeze(2).double()).to(dtype))


class WN(nn.Module):
    """WaveNet-like coupling network: dilated convolutions gated and conditioned on the mel.

    Unlike WaveNet the convolutions are not causal. One shared cond_layer makes the conditioning
    of every layer at once (upstream's layout since 2019).
    """

    def __init__(self, n_in_channels, n_mel_channels, n_layers, n_channels, kernel_size, n_out_channels=None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"WN kernel_size must be odd so the output keeps its length, got {kernel_size}")
        if n_out_channels is None:
            n_out_channels = 2 * n_in_channels
        self.n_layers = n_layers
        self.n_channels = n_channels
        self.start = WeightNormConv1d(n_in_channels, n_channels, 1)
        # Zero-initialised so every coupling starts as the identity (log_s = 0, shift = 0).
        self.end = nn.Conv1d(n_channels, n_out_channels, 1)
        self.end.weight.data.zero_()
        self.end.bias.data.zero_()
        self.cond_layer = WeightNormConv1d(n_mel_channels, 2 * n_channels * n_layers, 1)
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = 2 ** i
            padding = (kernel_size * dilation - dilation) // 2
            self.in_layers.append(WeightNormConv1d(n_channels, 2 * n_channels, kernel_size, dilation, padding))
            # The last layer has no residual output: all of it goes to the skip sum.
            res_skip_channels = 2 * n_channels if i < n_layers - 1 else n_channels
            self.res_skip_layers.append(WeightNormConv1d(n_channels, res_skip_channels, 1))

    def forward(self, forward_input):
        audio, spect = forward_input  # (B, n_half, T/g), (B, n_mel*g, T/g)
        if glow_fast.uses_folded_wn_inference(self, spect):  # folded CPU inference: this math, rearranged
            return glow_fast.folded_wn_inference(self, audio, spect)
        if glow_fast.uses_rearranged_wn(self, spect):  # float32 on CPUs: this math with fewer multiply-adds
            return glow_fast.rearranged_wn_forward(self, audio, spect)
        if glow_fast.uses_composed_wn(self, spect):  # bfloat16 on CPUs: the same compositions, channel-major
            return glow_fast.composed_wn_forward(self, audio, spect)
        C = self.n_channels
        audio = self.start(audio.to(spect.dtype))  # (B, C, T/g) in the conditioning's compute dtype
        # split() rather than slicing: the backward of n slices allocates n full-size zero gradients,
        # the backward of one split a single concatenation.
        conds = self.cond_layer(spect).split(2 * C, dim=1)  # n_layers x (B, 2C, T/g)
        output = None
        for i in range(self.n_layers):
            in_act = self.in_layers[i](audio) + conds[i]  # (B, 2C, T/g)
            acts = gated_activation(in_act, C)  # (B, C, T/g)
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                residual, skip = res_skip.split(C, dim=1)
                audio = audio + residual
            else:
                skip = res_skip
            output = skip if output is None else output + skip
        return self.end(output)  # (B, n_out, T/g)


def gated_activation(x, n_channels):
    """tanh(x[:, :C]) * sigmoid(x[:, C:]): WaveNet's gate."""
    tanh_input, sigmoid_input = x.split(n_channels, dim=1)
    return torch.tanh(tanh_input) * torch.sigmoid(sigmoid_input)


class WaveGlow(nn.Module):
    """Upstream's constructor; hop_length (keyword only, default upstream's 256) is the audio samples per mel
    frame: the upsampler's stride, with a kernel of 4 * hop_length."""

    def __init__(self, n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config, *,
                 hop_length=DEFAULT_HOP_LENGTH):
        super().__init__()
        _check_config(n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config, hop_length)
        self.hop_length = hop_length
        self.upsample = nn.ConvTranspose1d(n_mel_channels, n_mel_channels, UPSAMPLE_KERNEL_PER_HOP * hop_length,
                                           stride=hop_length)
        self.n_mel_channels = n_mel_channels
        self.n_flows = n_flows
        self.n_group = n_group
        self.n_early_every = n_early_every
        self.n_early_size = n_early_size
        self.WN = nn.ModuleList()
        self.convinv = nn.ModuleList()
        n_remaining_channels = n_group
        for k in range(n_flows):
            if k % n_early_every == 0 and k > 0:
                n_remaining_channels -= n_early_size
            n_half = n_remaining_channels // 2
            n_rest = n_remaining_channels - n_half  # == n_half for even counts, as upstream
            self.convinv.append(Invertible1x1Conv(n_remaining_channels))
            self.WN.append(WN(n_half, n_mel_channels * n_group, n_out_channels=2 * n_rest, **WN_config))
        self.n_remaining_channels = n_remaining_channels  # channels left at the last flow

    def _upsample(self, spect):
        # self.upsample(spect): (B, n_mel, F) -> (B, n_mel, hop*F + 3*hop), as a matrix product on CPUs
        return glow_fast.upsample(spect, self.upsample)

    def _group_mel(self, spect, n_samples):
        # spect: (B, n_mel, >= n_samples) upsampled mel -> (B, n_mel*g, T/g), channel = mel_bin*g + j
        g = self.n_group
        spect = spect[:, :, :n_samples].unfold(2, g, g).permute(0, 2, 1, 3)  # (B, T/g, n_mel, g)
        # One dense copy per pass: the cond_layer then reads a plain (B, n_mel*g, T/g) tensor, not a transposed
        # view that each backend would handle (or copy) its own way.
        return spect.reshape(spect.size(0), spect.size(1), -1).permute(0, 2, 1).contiguous()

    def forward(self, forward_input):
        """forward_input = (mel (B, n_mel, F), audio (B, T)) -> (z (B, g, T/g), log_s list, log_det_W list)."""
        spect, audio = forward_input
        self._check_mel(spect)
        if audio.dim() != 2:
            raise ValueError(f"audio must be (batch, samples), got shape {tuple(audio.shape)}")
        n_samples = audio.size(1)
        if n_samples % self.n_group != 0:
            raise ValueError(f"audio length {n_samples} is not a multiple of n_group={self.n_group}")
        hop, kernel = self.hop_length, self.upsample.kernel_size[0]
        available = hop * spect.size(2) + kernel - hop
        if available < n_samples:
            raise ValueError(f"mel of {spect.size(2)} frames covers {available} samples, fewer than the "
                             f"{n_samples} audio samples; the mel must have at least "
                             f"{-(-(n_samples - kernel + hop) // hop)} frames (hop {hop})")
        spect = self._group_mel(self._upsample(spect), n_samples)  # (B, n_mel*g, T/g)
        audio = audio.unfold(1, self.n_group, self.n_group).permute(0, 2, 1)  # (B, g, T/g)

        output_audio, log_s_list, log_det_W_list = [], [], []
        for k in range(self.n_flows):
            if k % self.n_early_every == 0 and k > 0:
                output_audio.append(audio[:, :self.n_early_size])
                audio = audio[:, self.n_early_size:]
            audio, log_det_W = self.convinv[k](audio)  # (B, c, T/g) float32
            log_det_W_list.append(log_det_W)
            n_half = audio.size(1) // 2
            # contiguous: a compiled WN would otherwise recompile for each storage offset of the view
            audio_0, audio_1 = audio[:, :n_half].contiguous(), audio[:, n_half:]
            output = self.WN[k]((audio_0, spect))
            n_rest = audio_1.size(1)
            with _float32_region(audio):
                b, log_s = output[:, :n_rest].float(), output[:, n_rest:].float()  # shift first, then log-scale
                audio_1 = torch.exp(log_s) * audio_1 + b
            log_s_list.append(log_s)
            audio = torch.cat([audio_0, audio_1], 1)
        output_audio.append(audio)
        return torch.cat(output_audio, 1), log_s_list, log_det_W_list

    @torch.no_grad()
    def infer(self, spect, sigma=1.0, generator=None, seed=None):
        """mel (B, n_mel, F) -> audio (B, hop_length*F) in the mel's dtype, on the mel's device.

        Pass a torch.Generator (on the mel's device) or an integer seed for reproducible noise.
        """
        self._check_mel(spect)
        if generator is None and seed is not None:
            generator = torch.Generator(device=spect.device).manual_seed(seed)
        n_samples = self.hop_length * spect.size(2)
        if n_samples % self.n_group != 0:
            raise ValueError(f"{n_samples} output samples are not a multiple of n_group={self.n_group}")
        noise_dtype = torch.float32 if spect.dtype in (torch.float16, torch.bfloat16) else spect.dtype
        z = torch.randn(spect.size(0), self.n_group, n_samples // self.n_group, device=spect.device,
                        dtype=noise_dtype, generator=generator)  # (B, g, T/g)
        return self.reverse(spect, (z * sigma).to(spect.dtype))

    @torch.no_grad()
    def reverse(self, spect, z):
        """Inverse of forward for a given z (B, g, T/g) in forward's channel order -> audio (B, T)."""
        self._check_mel(spect)
        n_samples = z.size(1) * z.size(2)
        hop, kernel = self.hop_length, self.upsample.kernel_size[0]
        available = hop * spect.size(2) + kernel - hop
        if available < n_samples:
            raise ValueError(f"z covers {n_samples} samples but the mel only {available // self.n_group * self.n_group}")
        # (B, n_mel*g, T/g) grouped upsampled mel, or for float32 CPU inference the mel's frames (glow_fast)
        spect = glow_fast.reverse_conditioning(self, spect, n_samples)
        n_early_outputs = (self.n_flows - 1) // self.n_early_every
        early_end = self.n_early_size * n_early_outputs
        audio = z[:, early_end:]  # (B, n_remaining, T/g)
        for k in reversed(range(self.n_flows)):
            n_half = audio.size(1) // 2
            # contiguous: a compiled WN would otherwise recompile for each storage offset of the view
            audio_0, audio_1 = audio[:, :n_half].contiguous(), audio[:, n_half:]
            output = self.WN[k]((audio_0, spect))
            n_rest = audio_1.size(1)
            with _float32_region(audio):
                b, log_s = output[:, :n_rest].float(), output[:, n_rest:].float()
                audio_1 = ((audio_1.float() - b) * torch.exp(-log_s)).to(audio.dtype)
            audio = self.convinv[k](torch.cat([audio_0, audio_1], 1), reverse=True)
            if k % self.n_early_every == 0 and k > 0:
                early_end -= self.n_early_size
                audio = torch.cat([z[:, early_end:early_end + self.n_early_size], audio], 1)
        return audio.permute(0, 2, 1).reshape(audio.size(0), -1)  # (B, T)

    def _check_mel(self, spect):
        if spect.dim() != 3 or spect.size(1) != self.n_mel_channels:
            raise ValueError(f"mel must be (batch, {self.n_mel_channels}, frames), got shape {tuple(spect.shape)}")
        if spect.size(2) < 1:
            raise ValueError("mel has no frames")

    @staticmethod
    def remove_weightnorm(model):
        return remove_weightnorm(model)


def remove_weightnorm(model):
    """Fold weight norm into plain weights (for inference); outputs are unchanged. Returns the model."""
    for module in model.modules():
        if isinstance(module, WeightNormConv1d):
            module.fold()
    return model


def _check_config(n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config, hop_length):
    problems = []
    for name, value in (("n_mel_channels", n_mel_channels), ("n_flows", n_flows), ("n_group", n_group),
                        ("n_early_every", n_early_every), ("hop_length", hop_length)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_early_size, int) or n_early_size < 0:
        problems.append(f"n_early_size must be a non-negative integer, got {n_early_size!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if n_group % 2 != 0:
        raise ValueError(f"n_group must be even, got {n_group}")
    if hop_length % n_group != 0:
        raise ValueError(f"n_group={n_group} must divide the upsampler stride, the hop length {hop_length}; "
                         f"values that do: {', '.join(map(str, n_groups_for_hop(hop_length)))}")
    n_exits = (n_flows - 1) // n_early_every
    remaining = n_group - n_exits * n_early_size
    if remaining < 2:
        raise ValueError(f"n_early_size={n_early_size} is too large: {n_exits} early outputs from n_group={n_group} "
                         f"leave {remaining} channels, but the last flow needs at least 2")
    expected = {"n_layers", "n_channels", "kernel_size"}
    if not isinstance(WN_config, dict) or set(WN_config) != expected:
        raise ValueError(f"WN_config must have exactly the keys {sorted(expected)}, got {WN_config!r}")
    for key in sorted(expected):
        if not isinstance(WN_config[key], int) or WN_config[key] < 1:
            raise ValueError(f"WN_config[{key!r}] must be a positive integer, got {WN_config[key]!r}")


class WaveGlowLoss(nn.Module):
    """Negative log-likelihood per audio sample, without the constant 0.5*log(2*pi*sigma^2) (as upstream)."""

    def __init__(self, sigma=1.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, model_output):
        z, log_s_list, log_det_W_list = model_output
        with _float32_region(z):
            z = z.float()
            log_s_total = torch.stack([log_s.float().sum() for log_s in log_s_list]).sum()
            log_det_W_total = torch.stack([log_det.float() for log_det in log_det_W_list]).sum()
            loss = torch.sum(z * z) / (2 * self.sigma * self.sigma) - log_s_total - log_det_W_total
            return loss / z.numel()
