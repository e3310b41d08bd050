"""WaveGlow: a flow-based generative network for speech synthesis (Prenger, Valle, Catanzaro 2018).

Model math only: no files, devices or logging here. The layer layout, state-dict names and numbers
match NVIDIA/waveglow, so its checkpoints load, but the code runs on today's PyTorch on any device and
dtype. Under torch.autocast the WaveNet-like layers run in low precision while everything that touches
the audio itself (1x1 convolutions, coupling, log-determinants, loss) stays in float32.
"""
import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLE_KERNEL = 1024  # the upsampler turns F mel frames into 256 * F + 768 samples
UPSAMPLE_STRIDE = 256


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
        dtype = _matmul_dtype(x)
        if dtype is not None:
            if _folded_inference(self):
                matrix, bias = self.inference_matrix(dtype)
                return _matmul_conv(x.to(dtype), matrix, bias, self.kernel_size, self.padding, self.dilation)
            return _conv1d_as_matmul(x, self.effective_weight(), self.bias, self.padding, self.dilation, dtype)
        return F.conv1d(x, self.effective_weight(), self.bias, padding=self.padding, dilation=self.dilation)

    def inference_matrix(self, dtype):
        """The folded weight as a tap-major (C_out, k*C_in) matrix and the bias, both in `dtype`: made once per
        dtype and kept until the weights change (_cached_per_dtype)."""
        return _cached_per_dtype(self, dtype, [self.weight, self.bias], lambda: (
            _tap_major(self.weight.detach()).to(dtype).contiguous(), self.bias.detach().to(dtype)))

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


def _cached_per_dtype(owner, dtype, tensors, build):
    """build()'s result for `dtype`, kept on `owner` until any of `tensors` changes (in-place steps,
    load_state_dict, .to() all change a version, a storage or a device). One entry per dtype: a program that
    alternates float32 and bfloat16 calls must not rebuild at every call. A plain attribute, never saved."""
    key = tuple((tensor._version, tensor.data_ptr(), tensor.device) for tensor in tensors)
    caches = owner.__dict__.setdefault("_inference_caches", {})
    if dtype not in caches or caches[dtype][0] != key:
        caches[dtype] = (key, build())
    return caches[dtype][1]


def _tap_major(weight):
    # Conv1d weight (C_out, C_in, k) -> (C_out, k*C_in), the column order of _im2col's taps
    out_channels, in_channels, kernel_size = weight.shape
    return weight.permute(0, 2, 1).reshape(out_channels, kernel_size * in_channels)


def _matmul_dtype(x):
    """The dtype in which a convolution on `x` runs as matrix products, or None for F.conv1d.

    On CPUs with bfloat16 units, oneDNN's bf16 matmul runs WaveGlow's shapes 1.2-1.5x faster than its bf16
    convolution (dilated and long-sequence cases most); float32 training keeps the convolution, as fast there
    (float32 inference with folded weights takes WN._folded_inference_in_place, matrix products too).
    On GPUs, compiled mixed-precision training: there torch.compile fuses the matrix form with its neighbours
    far better than it can around cuDNN's convolution (1.3x the training throughput on an H100, and a
    quarter of the memory). Eager GPU code and inference keep cuDNN, which is faster for them.
    """
    if x.device.type == "cuda":
        compiled_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
        return torch.get_autocast_dtype("cuda") if compiled_training and torch.is_autocast_enabled("cuda") else None
    if x.device.type != "cpu":
        return None
    autocast_bfloat16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return torch.bfloat16 if x.dtype == torch.bfloat16 or autocast_bfloat16 else None


def _folded_inference(layer):
    """Inference with folded weights outside torch.compile: where cached low-precision copies pay (a compiled
    graph hoists the casts itself)."""
    return layer.folded and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _conv1d_as_matmul(x, weight, bias, padding, dilation, dtype=torch.bfloat16):
    """Conv1d computed as matrix products over shifted copies of the input (im2col), in `dtype`.

    Inputs are cast outside the autograd function, so autograd returns float32 gradients to float32
    master weights.
    """
    return _MatmulConv1d.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), padding, dilation)


def _im2col(x, kernel_size, padding, dilation, out=None):
    # (B, C_in, T) -> (B, k*C_in, T), tap-major: tap i holds x shifted by i*dilation - padding, zeros past the ends.
    # Eagerly written tap by tap into one buffer (optionally a given one): a third of the memory passes of
    # pad-and-cat. Compiled code keeps pad-and-cat, which the compiler fuses into its neighbours instead.
    if kernel_size == 1 and out is None:
        return x
    batch, channels, length = x.shape
    if out is None and torch.compiler.is_compiling():
        x = F.pad(x, (padding, padding))
        return torch.cat([x[:, :, i * dilation:i * dilation + length] for i in range(kernel_size)], 1)
    if out is None:
        out = x.new_empty(batch, kernel_size * channels, length)
    for i, tap in enumerate(out.split(channels, dim=1)):
        shift = i * dilation - padding  # tap[t] = x[t + shift]
        start, end = max(0, -shift), min(length, length - shift)
        if start >= end:
            tap.zero_()
            continue
        tap[:, :, start:end].copy_(x[:, :, start + shift:end + shift])
        tap[:, :, :start].zero_()
        tap[:, :, end:].zero_()
    return out


def _matmul_conv(x, matrix, bias, kernel_size, padding, dilation):
    # x (B, C_in, T), matrix (C_out, k*C_in) tap-major -> (B, C_out, T). bmm on the broadcast matrix yields this
    # layout directly; matmul would compute the transposed product and pay for a slow transposing copy.
    cols = _im2col(x, kernel_size, padding, dilation)  # (B, k*C_in, T)
    return torch.bmm(matrix.expand(x.size(0), -1, -1), cols).add_(bias.unsqueeze(1))


class _MatmulConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        kernel_size = weight.size(2)
        ctx.save_for_backward(x, weight)
        ctx.conv = (padding, dilation)
        return _matmul_conv(x, _tap_major(weight), bias, kernel_size, padding, dilation)  # (B, C_out, T)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        padding, dilation = ctx.conv
        out_channels, in_channels, kernel_size = weight.shape
        batch, length = x.size(0), x.size(2)
        grad_y = grad_y.contiguous()
        matrix = _tap_major(weight)
        cols = _im2col(x, kernel_size, padding, dilation)  # recomputed: cheaper than keeping k copies
        # Sum over the batch by folding it into the matrix product's inner dimension.
        grad_matrix = torch.matmul(grad_y.transpose(0, 1).reshape(out_channels, batch * length),
                                   cols.transpose(0, 1).reshape(-1, batch * length).t())
        grad_weight = grad_matrix.reshape(out_channels, kernel_size, in_channels).permute(0, 2, 1)
        grad_cols = torch.bmm(matrix.t().expand(batch, -1, -1), grad_y)  # (B, k*C_in, T)
        if kernel_size == 1:
            grad_x = grad_cols
        else:
            grad_padded = grad_cols.new_zeros(batch, in_channels, length + 2 * padding)
            for i, tap in enumerate(grad_cols.split(in_channels, dim=1)):
                grad_padded[:, :, i * dilation:i * dilation + length] += tap
            grad_x = grad_padded[:, :, padding:padding + length]
        return grad_x, grad_weight, grad_y.sum((0, 2)), None, None


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
        # W^-1 for inference, computed in float64 once and kept until W changes (_cached_per_dtype): never stale,
        # never saved.
        W = self.conv.weight
        return _cached_per_dtype(self, dtype, [W], lambda: torch.linalg.inv(W.detach().squeeze(2).double()).to(dtype))


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
        if spect.device.type == "cpu" and _folded_inference(self.start):
            # bfloat16 under autocast, else the mel's own dtype (float32: at least the convolutions' speed)
            return self._folded_inference_in_place(audio, spect, _matmul_dtype(spect) or spect.dtype)
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

    def _folded_inference_in_place(self, audio, spect, dtype):
        """forward() of a folded WN for inference on a CPU as `dtype` matrix products (bfloat16 or float32), with
        fewer memory passes and multiply-adds than layer by layer; the same math, rearranged:
        - each layer's conditioning and dilated convolution are one matrix product over the mel and the layer's
          taps stacked in one buffer ([cond_i | in_i] @ [spect; taps]), their biases summed;
        - the gate takes one sigmoid pass over both halves, as tanh(a) sigmoid(b) = (2 sigmoid(2a) - 1) sigmoid(b):
          the 2a comes from doubled rows of that matrix, and the res_skip matrix, negated, takes
          sigmoid(b) - 2 sigmoid(2a) sigmoid(b), one addcmul (a tanh pass costs three sigmoid passes on CPUs; the
          bf16 sigmoid near 1/2 is a little coarser than a bf16 tanh near 0, and the audio stays ~70 dB SNR
          against float32);
        - the skip sum only ever feeds the end layer, so the end layer is folded into each layer's skip matrix
          (end @ skip_i: n_out rows instead of C), and each layer's product accumulates in place (baddbmm_) into
          the residual stream and the output at once: 7 % fewer multiply-adds for config.json's model;
        - every bias rides in its matrix as a last column, against a row of ones kept at the end of the buffer the
          matrix multiplies, so no bias takes a pass of its own.
        In bfloat16 on CPUs this leaves about a tenth of the time outside the matrix products, which run near the
        machine's peak."""
        C, batch, length = self.n_channels, audio.size(0), audio.size(2)
        layers = self._inference_matrices(dtype)
        audio = self.start(audio.to(dtype))
        n_out = layers[-1][1].size(0)
        state = torch.cat([audio, audio.new_zeros(batch, n_out, length)], 1)  # (B, C + n_out, T/g)
        audio, output = state.split([C, n_out], dim=1)  # views: the residual stream, the WN's output
        n_cond = spect.size(1)
        kernel_size = self.in_layers[0].kernel_size
        # One buffer each, reused by every layer; each ends in the row of ones that meets the matrices' bias column.
        inputs = audio.new_empty(batch, n_cond + kernel_size * C + 1, length)  # (B, n_mel*g + k*C + 1, T/g)
        inputs[:, :n_cond] = spect
        inputs[:, -1] = 1
        taps = inputs[:, n_cond:-1]
        in_act = audio.new_empty(batch, 2 * C, length)  # (B, 2C, T/g): (2a, b)
        acts_and_one = audio.new_empty(batch, C + 1, length)
        acts_and_one[:, C] = 1
        negated_acts = acts_and_one[:, :C]  # (B, C, T/g)
        for in_layer, (input_matrix, output_matrix) in zip(self.in_layers, layers):
            _im2col(audio, kernel_size, in_layer.padding, in_layer.dilation, out=taps)
            torch.bmm(input_matrix.expand(batch, -1, -1), inputs, out=in_act)
            tanh_gate, sigmoid_gate = torch.sigmoid_(in_act).split(C, dim=1)
            torch.addcmul(sigmoid_gate, tanh_gate, sigmoid_gate, value=-2.0, out=negated_acts)
            # the last layer has only a skip output
            target = state if output_matrix.size(0) > n_out else output
            target.baddbmm_(output_matrix.expand(batch, -1, -1), acts_and_one)
        return output  # (B, n_out, T/g)

    def _inference_matrices(self, dtype):
        """For _folded_inference_in_place, in `dtype`, per layer: the input matrix [cond_layer's rows for it |
        in_layer's tap-major matrix | their summed bias] (2C, n_mel*g + k*C + 1), tanh half doubled; the output
        matrix [negated residual rows; negated end @ skip rows | biases] (C + n_out, C + 1), only the skip rows for
        the last layer, whose bias column also carries the end layer's bias. Folded in float32, made once and kept
        until any of these weights changes (in float32 a second copy of the WN weights: 0.3 GB for config.json's
        model). Never saved."""
        layers = [self.cond_layer, *self.in_layers, *self.res_skip_layers, self.end]
        tensors = [tensor for layer in layers for tensor in (layer.weight, layer.bias)]
        return _cached_per_dtype(self, dtype, tensors, lambda: self._fold_inference_matrices(dtype))

    @torch.no_grad()
    def _fold_inference_matrices(self, dtype):
        C = self.n_channels
        tanh_rows_doubled = torch.cat([torch.full((C, 1), 2.0), torch.ones(C, 1)]).to(self.cond_layer.weight.device)
        end_matrix = self.end.weight.squeeze(2).float()  # (n_out, C)
        layers = []
        for cond_weight, cond_bias, in_layer, res_skip_layer in zip(
                self.cond_layer.weight.squeeze(2).split(2 * C), self.cond_layer.bias.split(2 * C),
                self.in_layers, self.res_skip_layers):
            input_bias = cond_bias.float() + in_layer.bias.float()
            input_matrix = torch.cat([cond_weight.float(), _tap_major(in_layer.weight).float(), input_bias[:, None]], 1)
            weight, bias = res_skip_layer.weight.squeeze(2).float(), res_skip_layer.bias.float()
            weight = torch.cat([weight[:-C], end_matrix @ weight[-C:]])  # the skip rows through the end layer
            bias = torch.cat([bias[:-C], end_matrix @ bias[-C:]])
            if res_skip_layer is self.res_skip_layers[-1]:  # skip rows only; the end layer's bias rides here
                bias = bias + self.end.bias.float()
            output_matrix = torch.cat([-weight, bias[:, None]], 1)  # (C + n_out or n_out, C + 1)
            layers.append(((input_matrix * tanh_rows_doubled).to(dtype).contiguous(),
                           output_matrix.to(dtype).contiguous()))
        return layers


def gated_activation(x, n_channels):
    """tanh(x[:, :C]) * sigmoid(x[:, C:]): WaveNet's gate."""
    tanh_input, sigmoid_input = x.split(n_channels, dim=1)
    return torch.tanh(tanh_input) * torch.sigmoid(sigmoid_input)


def _upsample_as_matmul(spect, weight, bias, stride):
    """ConvTranspose1d(kernel k, stride s) as one matrix product and k/s shifted adds (CPU).

    oneDNN builds a new deconvolution kernel for every new input shape, which takes seconds for the
    1024-tap upsampler (ruinous for inference on mels of varying length), and torch's fallback kernel
    is slow; a matmul has neither problem, in float32 or bfloat16.
    """
    batch, channels, n_frames = spect.shape  # (B, C_in, F)
    _, out_channels, kernel_size = weight.shape
    overlap = kernel_size // stride
    cols = torch.matmul(spect.transpose(1, 2), weight.reshape(channels, -1))  # (B, F, C_out*k)
    cols = cols.view(batch, n_frames, out_channels, overlap, stride)
    out = cols.new_zeros(batch, out_channels, n_frames + overlap - 1, stride)
    for q in range(overlap):  # frame f's q-th block of s samples lands in output block f + q
        out[:, :, q:q + n_frames] += cols[:, :, :, q].permute(0, 2, 1, 3)
    return out.view(batch, out_channels, -1) + bias.unsqueeze(1).to(out.dtype)  # (B, C_out, s*F + k - s)


class WaveGlow(nn.Module):
    def __init__(self, n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config):
        super().__init__()
        _check_config(n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config)
        self.upsample = nn.ConvTranspose1d(n_mel_channels, n_mel_channels, UPSAMPLE_KERNEL, stride=UPSAMPLE_STRIDE)
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
        if spect.device.type == "cpu":
            return _upsample_as_matmul(spect, self.upsample.weight, self.upsample.bias, UPSAMPLE_STRIDE)
        return self.upsample(spect)  # (B, n_mel, 256*F + 768)

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
        available = UPSAMPLE_STRIDE * spect.size(2) + UPSAMPLE_KERNEL - UPSAMPLE_STRIDE
        if available < n_samples:
            raise ValueError(f"mel of {spect.size(2)} frames covers {available} samples, fewer than the "
                             f"{n_samples} audio samples; the mel must have at least "
                             f"{-(-(n_samples - UPSAMPLE_KERNEL + UPSAMPLE_STRIDE) // UPSAMPLE_STRIDE)} frames")
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
        """mel (B, n_mel, F) -> audio (B, 256*F) in the mel's dtype, on the mel's device.

        Pass a torch.Generator (on the mel's device) or an integer seed for reproducible noise.
        """
        self._check_mel(spect)
        if generator is None and seed is not None:
            generator = torch.Generator(device=spect.device).manual_seed(seed)
        n_samples = UPSAMPLE_STRIDE * spect.size(2)
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
        spect = self._group_mel(self._upsample(spect), n_samples)  # (B, n_mel*g, T/g)
        if spect.size(2) != z.size(2):
            raise ValueError(f"z covers {n_samples} samples but the mel only {spect.size(2) * self.n_group}")
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


def compile_coupling_networks(model, weights_dtype=None, **options):
    """torch.compile every flow's WN in place (state-dict names unchanged); returns the model.

    Nearly all of WaveGlow's time is in the WNs; compiled, the gate, the bias and conditioning adds and the
    residual and skip sums become a few fused kernels instead of a dozen memory passes per layer, which is
    what pays on GPUs. The first call of each new input shape compiles (seconds to a minute), so it suits
    training's fixed segments best. `options` go to torch.compile (e.g. mode, dynamic).

    weights_dtype (inference under CPU bfloat16 autocast): store the WNs' weights in that dtype first. The
    eager layers cache such copies, but a compiled graph cannot, and would cast all ~88 M weights at every
    call. The model then runs only under that autocast.
    """
    # All WNs share one forward, and dynamo's limit of graphs per function (8 by default) counts them together:
    # three widths of audio_0 (early outputs), training and inference, fixed then dynamic lengths, dtypes. Past
    # the limit it would quietly run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for wn in model.WN:
        if weights_dtype is not None:
            wn.to(weights_dtype)
        wn.compile(**options)
    return model


def remove_weightnorm(model):
    """Fold weight norm into plain weights (for inference); outputs are unchanged. Returns the model."""
    for module in model.modules():
        if isinstance(module, WeightNormConv1d):
            module.fold()
    return model


def _check_config(n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config):
    problems = []
    for name, value in (("n_mel_channels", n_mel_channels), ("n_flows", n_flows), ("n_group", n_group),
                        ("n_early_every", n_early_every)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_early_size, int) or n_early_size < 0:
        problems.append(f"n_early_size must be a non-negative integer, got {n_early_size!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if n_group % 2 != 0:
        raise ValueError(f"n_group must be even, got {n_group}")
    if UPSAMPLE_STRIDE % n_group != 0:
        raise ValueError(f"n_group={n_group} must divide the upsampler stride {UPSAMPLE_STRIDE}")
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
