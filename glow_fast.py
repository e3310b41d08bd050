"""The measured fast paths behind glow.py's layers: the same math, arranged for the hardware.

glow.py's layers reach them through one hook each: WeightNormConv1d through conv1d(), WN's folded inference
through uses_folded_wn_inference() and folded_wn_inference(), WN's float32 CPU forward through
uses_rearranged_wn() and rearranged_wn_forward(), WaveGlow's upsampler through upsample(), WaveGlow.reverse's
conditioning through reverse_conditioning() (float32 CPU inference on the mel's frames), and
Invertible1x1Conv's inverse (and every cached inference weight) through cached_per_dtype(). The layers come
in as arguments and are read by their attributes only, so this module never imports glow.py.
"""
import functools
import math
import platform

import torch
import torch.nn.functional as F

import cpu_matmul
import winograd


def conv1d(x, weight, bias, padding, dilation, folded_layer=None):
    """F.conv1d(x, weight, bias, padding=padding, dilation=dilation), or the same as matrix products where those
    were measured faster (_matmul_dtype). folded_layer: the layer owning these weights, when they are folded;
    inference outside torch.compile then keeps their low-precision tap-major copy on it (_cached_matrix)."""
    dtype = _matmul_dtype(x)
    if dtype is None:
        return F.conv1d(x, weight, bias, padding=padding, dilation=dilation)
    if folded_layer is not None and _inference_outside_compile():
        matrix, bias = _cached_matrix(folded_layer, weight, bias, dtype)
        return _matmul_conv(x.to(dtype), matrix, bias, weight.size(2), padding, dilation)
    return _conv1d_as_matmul(x, weight, bias, padding, dilation, dtype)


def cached_per_dtype(owner, dtype, tensors, build):
    """build()'s result for `dtype`, kept on `owner` until any of `tensors` changes (in-place steps,
    load_state_dict, .to() all change a version, a storage or a device). One entry per dtype: a program that
    alternates float32 and bfloat16 calls must not rebuild at every call. A plain attribute, never saved."""
    if not _is_cached(owner, dtype, tensors):
        owner.__dict__.setdefault("_inference_caches", _InferenceCaches())[dtype] = (_weights_key(tensors), build())
    return owner.__dict__["_inference_caches"][dtype][1]


def _is_cached(owner, dtype, tensors):
    """Whether `owner` holds cached_per_dtype's entry for `dtype`, made from the current `tensors`."""
    entry = owner.__dict__.get("_inference_caches", {}).get(dtype)
    return entry is not None and entry[0] == _weights_key(tensors)


class _InferenceCaches(dict):
    """A layer's cached inference matrices. A copy of the layer (copy.deepcopy, pickle) starts without them and
    builds its own: they can be large (2 GB of frame matrices for config.json's model), and oneDNN's packed ones
    cannot be copied at all."""

    def __deepcopy__(self, memo):
        return _InferenceCaches()

    def __reduce__(self):
        return _InferenceCaches, ()


def _weights_key(tensors):
    return tuple((tensor._version, tensor.data_ptr(), tensor.device) for tensor in tensors)


def _cached_matrix(layer, weight, bias, dtype):
    """The folded weight as a tap-major (C_out, k*C_in) matrix and the bias, both in `dtype`: made once per
    dtype and kept on the layer until the weights change, rather than cast at every call."""
    return cached_per_dtype(layer, dtype, [weight, bias], lambda: (
        _tap_major(weight.detach()).to(dtype).contiguous(), bias.detach().to(dtype)))


def _tap_major(weight):
    # Conv1d weight (C_out, C_in, k) -> (C_out, k*C_in), the column order of _im2col's taps
    out_channels, in_channels, kernel_size = weight.shape
    return weight.permute(0, 2, 1).reshape(out_channels, kernel_size * in_channels)


def _matmul_dtype(x):
    """The dtype in which a convolution on `x` runs as matrix products, or None for F.conv1d.

    On CPUs with bfloat16 units, oneDNN's bf16 matmul runs WaveGlow's shapes 1.2-1.5x faster than its bf16
    convolution (dilated and long-sequence cases most); float32 training keeps the convolution, as fast there
    (float32 inference with folded weights takes folded_wn_inference, matrix products too). Without the units
    (an explicit bfloat16 on an AVX2 CPU) both forms are emulated, ~0.3 GFLOP/s alike, and torch's own
    convolution keeps the bf16 autocast semantics with the least code of ours in the way. Float32 training keeps
    the convolution on AVX2 CPUs too: the matrix form measured 1.00x for the 1x1 layers and 0.92-0.97x for all
    layers on one config.json WN's forward and backward (1 x 1000 and 2 x 2000 groups, CPU seconds on one core).
    Forms without copies did no better on two cores (2 x 2000 groups, medians of six to eight interleaved
    rounds): one addmm per tap into strided views for all layers 0.99x, per-item products for the 1x1 layers
    0.97-1.06x in three runs, although alone the cond layer's products ran at 95-145 GFLOP/s against oneDNN's
    81-96. oneDNN's float32 convolutions run the training step at about the CPU's matmul limit.
    On GPUs, compiled mixed-precision training: there torch.compile fuses the matrix form with its neighbours
    far better than it can around cuDNN's convolution (1.3x the training throughput on an H100, and a
    quarter of the memory). Eager GPU code and inference keep cuDNN, which is faster for them.
    """
    if x.device.type == "cuda":
        compiled_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
        return torch.get_autocast_dtype("cuda") if compiled_training and torch.is_autocast_enabled("cuda") else None
    if x.device.type != "cpu":
        return None
    dtype = _cpu_low_precision(x)
    return dtype if dtype is not None and cpu_has_bf16_units() else None


def _cpu_low_precision(x):
    """torch.bfloat16 where `x` is bfloat16 or CPU autocast runs in bfloat16, else None."""
    autocast_bfloat16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return torch.bfloat16 if x.dtype == torch.bfloat16 or autocast_bfloat16 else None


@torch.compiler.assume_constant_result
def cpu_has_bf16_units():
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on ARM); also what
    distributed.cpu_supports_bf16, which chooses a run's precision, answers. oneDNN's probe alone also says yes for
    plain AVX512, where it only emulates bfloat16, so on x86 the units must show in torch's capability name or in
    /proc/cpuinfo's flags; where neither tells, the answer is no. Probed once per process (cache_clear() asks
    again). Compiled code takes the answer as a constant: traced, the probe's torch.ops call (it returns a bool)
    broke a compiled WN's graph at every layer under CPU bfloat16 autocast, 17 breaks in a 4-layer WN."""
    return _probe_bf16_units()


@functools.cache
def _probe_bf16_units():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or platform.machine().lower() in (
            "aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().lower().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


cpu_has_bf16_units.cache_clear = _probe_bf16_units.cache_clear


def _inference_outside_compile():
    """Inference outside torch.compile: where cached low-precision copies of folded weights pay (a compiled
    graph hoists the casts itself)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _conv1d_as_matmul(x, weight, bias, padding, dilation, dtype=torch.bfloat16):
    """Conv1d computed as matrix products over shifted copies of the input (im2col), in `dtype`.

    Inputs are cast outside the autograd function, so autograd returns float32 gradients to float32
    master weights.
    """
    return _MatmulConv1d.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), padding, dilation)


def _im2col(x, kernel_size, padding, dilation, out=None):
    """(B, C_in, T) -> (B, k*C_in, T), tap-major: tap i holds x shifted by i*dilation - padding, zeros past the
    ends. Eagerly written tap by tap into one buffer (optionally a given one): a third of the memory passes of
    pad-and-cat. Compiled code keeps pad-and-cat, which the compiler fuses into its neighbours instead."""
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
    """x (B, C_in, T), matrix (C_out, k*C_in) tap-major -> (B, C_out, T). bmm on the broadcast matrix yields this
    layout directly; matmul would compute the transposed product and pay for a slow transposing copy."""
    cols = _im2col(x, kernel_size, padding, dilation)  # (B, k*C_in, T)
    return torch.bmm(matrix.expand(x.size(0), -1, -1), cols).add_(bias.unsqueeze(1))


class _MatmulConv1d(torch.autograd.Function):
    """Conv1d as im2col matrix products, with a backward of matrix products too that recomputes the shifted
    copies of the input rather than keeping them."""

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


def upsample(spect, layer):
    """layer(spect) for the mel upsampler, an nn.ConvTranspose1d: (B, n_mel, F) -> (B, n_mel, s*F + k - s).

    On CPUs as one matrix product and k/s shifted adds (_CpuUpsample): oneDNN builds a new deconvolution kernel
    for every new input shape, which takes seconds for the 1024-tap upsampler (ruinous for inference on mels of
    varying length), and torch's fallback kernel is slow; a matmul has neither problem, in float32 or bfloat16.
    """
    if spect.device.type != "cpu":
        return layer(spect)
    return _CpuUpsample.apply(spect, layer.weight, layer.bias, layer.stride[0])


class _CpuUpsample(torch.autograd.Function):
    """The transposed convolution as out[f + q] += spect[f] @ W_q over the k/s blocks q of s taps, with its own
    backward: autograd's backward of those shifted adds allocated and zero-filled a full-size gradient of the
    (B, F, C_out, k) products for each q and summed them, half of the upsampler's training time. Here each
    product's gradient is written once, and the weight's gradient is one matrix product, with the same sums in
    the same order as autograd's (bit-identical gradients). Measured for demo/config_demo.json's training step,
    batch 4 x 4096 samples, one AVX2 core: the upsampler's forward and backward 220 ms -> 100-145 ms (runs
    vary); for config.json's, 2 x 16000 samples on two cores: 282 ms -> 132 ms."""

    @staticmethod
    def forward(ctx, spect, weight, bias, stride):
        batch, channels, n_frames = spect.shape  # (B, C_in, F)
        _, out_channels, kernel_size = weight.shape
        overlap = kernel_size // stride
        ctx.save_for_backward(spect, weight)
        ctx.stride = stride
        cols = torch.matmul(spect.transpose(1, 2), weight.reshape(channels, -1))  # (B, F, C_out*k)
        cols = cols.view(batch, n_frames, out_channels, overlap, stride)
        out = cols.new_zeros(batch, out_channels, n_frames + overlap - 1, stride)
        for q in range(overlap):  # frame f's q-th block of s samples lands in output block f + q
            out[:, :, q:q + n_frames] += cols[:, :, :, q].permute(0, 2, 1, 3)
        return out.view(batch, out_channels, -1) + bias.unsqueeze(1).to(out.dtype)  # (B, C_out, s*F + k - s)

    @staticmethod
    def backward(ctx, grad_out):
        spect, weight = ctx.saved_tensors
        stride = ctx.stride
        batch, channels, n_frames = spect.shape
        _, out_channels, kernel_size = weight.shape
        overlap = kernel_size // stride
        blocks = grad_out.view(batch, out_channels, n_frames + overlap - 1, stride)
        grad_cols = grad_out.new_empty(batch, n_frames, out_channels, overlap, stride)
        for q in range(overlap):
            grad_cols[:, :, :, q] = blocks[:, :, q:q + n_frames].permute(0, 2, 1, 3)
        grad_cols = grad_cols.view(batch * n_frames, out_channels * kernel_size)  # (B*F, C_out*k)
        grad_spect = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_spect = torch.mm(grad_cols, weight.reshape(channels, -1).t().to(grad_cols.dtype))
            grad_spect = grad_spect.view(batch, n_frames, channels).transpose(1, 2).to(spect.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(spect.transpose(1, 2).reshape(-1, channels).t().to(grad_cols.dtype), grad_cols)
            grad_weight = grad_weight.view_as(weight).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2)).to(weight.dtype)
        return grad_spect, grad_weight, grad_bias, None


def uses_rearranged_wn(wn, spect):
    """Whether WN `wn` runs rearranged_wn_forward: float32 on a CPU, eager (folded inference has its own path)."""
    return (spect.device.type == "cpu" and spect.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def rearranged_wn_forward(wn, audio, spect):
    """WN.forward((audio, spect)) with fewer multiply-adds, the same math rearranged (float32 on CPUs: training, and
    inference before weight norm is folded). It runs time-major, each time step's channels a contiguous row
    (B, T/g, C), so every layer is a matrix product of whole rows:
    - the dilated convolutions of layers 1.. take Winograd's F(4, 3) (winograd.dilated_conv3): half the
      multiply-adds of three taps;
    - the skip sum only feeds the end layer, which is linear: end(sum_i skip_i) = sum_i (E S_i) acts_i + E sum_i
      b_i + b_end. So each layer's skip rows come through the end layer, n_out rows instead of C (the residual
      rows stay as they are);
    - the first dilated convolution reads the start layer's output, a 1x1 convolution of the n_half audio
      channels. Composed, W_0 [S | b_S] runs over the audio and a column of ones (whose zero padding is the start
      output's own): k*(n_half + 1) inputs per output instead of k*C. The residual stream still starts from the
      start layer's output, which costs n_half*C;
    - the in-layers' biases join the cond layer's, one addition per layer fewer.
    The composed weights are products in the autograd graph (per step, the size of the weights only), so the
    gradients are those of the plain math. For config.json's model that is 34 % fewer multiply-adds forward and
    backward, 13 % of them from the compositions. Measured on two AVX2 cores: the compositions 1.19x the
    layer-by-layer forward on one WN's forward and backward (2 x 2000 groups, five interleaved rounds); F(4, 3)
    1.32x F.conv1d on config.json's dilated layers at 1 x 1000 groups, 1.48x at 2 x 2000; a training step at
    1 x 8000 samples 1.15x the baseline before F(4, 3), 1.31-1.33x with it. Its gate is gated_activation below:
    glow.py's, with a backward of fewer passes. Its matrix products go through cpu_matmul, which runs them by oneDNN
    on CPUs where torch runs AVX-512."""
    C, n_layers = wn.n_channels, wn.n_layers
    batch, steps = audio.size(0), audio.size(2)
    start_weight, first_weight, res_skip_weights = _composed_weights(wn)
    audio = audio.transpose(1, 2)  # (B, T/g, n_half), time-major from here on
    residual_stream = cpu_matmul.matmul(audio, start_weight.t(), wn.start.bias)  # (B, T/g, C): wn.start(audio)
    cond_bias = wn.cond_layer.bias + torch.cat([layer.bias for layer in wn.in_layers])
    conds = cpu_matmul.matmul(spect.transpose(1, 2).reshape(batch * steps, -1),
                              wn.cond_layer.effective_weight().squeeze(2).t(), cond_bias)
    conds = conds.view(batch, steps, -1).split(2 * C, dim=2)  # n_layers x (B, T/g, 2C), in-layer biases included
    output = None
    for i, (in_layer, (weight, bias)) in enumerate(zip(wn.in_layers, res_skip_weights, strict=True)):
        if i == 0:
            audio_and_one = torch.cat([audio, audio.new_ones(batch, steps, 1)], 2)  # (B, T/g, n_half + 1)
            in_act = _time_major_conv(audio_and_one, first_weight, in_layer.dilation)
        elif in_layer.kernel_size == 3:
            in_act = winograd.dilated_conv3(residual_stream, in_layer.effective_weight(), in_layer.dilation)
        else:
            in_act = _time_major_conv(residual_stream, in_layer.effective_weight(), in_layer.dilation)
        acts = gated_activation(in_act + conds[i], C, dim=2)  # (B, T/g, C)
        res_skip = cpu_matmul.matmul(acts.view(batch * steps, C), weight.t(), bias).view(batch, steps, -1)
        residual_stream, output = _add_res_skip(res_skip, residual_stream, output, i == n_layers - 1, C, dim=2)
    return (output + wn.end.bias).transpose(1, 2).contiguous()  # (B, n_out, T/g)


def _add_res_skip(res_skip, residual_stream, output, last_layer, n_channels, dim):
    """A layer's composed res_skip output, its residual rows (none in the last layer) added to the residual stream
    and its skip rows, already through the end layer, to the output; returns both."""
    if last_layer:
        skip = res_skip
    else:
        residual, skip = res_skip.split([n_channels, res_skip.size(dim) - n_channels], dim=dim)
        residual_stream = residual_stream + residual
    return residual_stream, skip if output is None else output + skip


def _composed_weights(wn):
    """The compositions rearranged_wn_forward and composed_wn_forward share, products in the autograd graph (float32
    under CPU autocast, since they are weights): the start layer's matrix S (C, n_half); the first dilated
    convolution through the start layer, its bias a last column, W_0 [S | b_S] (2C, n_half + 1, k); and per layer
    the res_skip matrix and bias with the skip rows through the end layer, (C + n_out, C) and the last layer's
    (n_out, C)."""
    C = wn.n_channels
    with torch.autocast("cpu", enabled=False):
        end_matrix = wn.end.weight.squeeze(2)  # (n_out, C)
        start_weight = wn.start.effective_weight().squeeze(2)  # (C, n_half)
        start = torch.cat([start_weight, wn.start.bias.unsqueeze(1)], 1)  # (C, n_half + 1)
        first_weight = torch.einsum("oik,ij->ojk", wn.in_layers[0].effective_weight(), start)  # (2C, n_half + 1, k)
        res_skip_weights = []
        for layer in wn.res_skip_layers:  # rows: residual (C, none in the last layer), then skip (C)
            weight, bias = layer.effective_weight().squeeze(2), layer.bias
            res_skip_weights.append((torch.cat([weight[:-C], end_matrix @ weight[-C:]]),
                                     torch.cat([bias[:-C], end_matrix @ bias[-C:]])))
    return start_weight, first_weight, res_skip_weights


def uses_composed_wn(wn, spect):
    """Whether WN `wn` runs composed_wn_forward: bfloat16 on a CPU (autocast or the dtype), eager (folded inference
    has its own path)."""
    return spect.device.type == "cpu" and _cpu_low_precision(spect) is not None and not torch.compiler.is_compiling()


def composed_wn_forward(wn, audio, spect):
    """WN.forward((audio, spect)) in bfloat16 on CPUs (training, and inference before weight norm is folded) with
    rearranged_wn_forward's compositions (_composed_weights): each layer's skip rows through the end layer, the
    first dilated convolution through the start layer. It stays channel-major, layer by layer through conv1d,
    whose bfloat16 matrix products (_MatmulConv1d) run near the units' peak; Winograd's transforms and the
    time-major layout did not pay in bfloat16. For config.json's model that is 13 % fewer multiply-adds forward
    and backward. Measured on two Zen 4 cores with AVX512-BF16, a training step at 1 x 8000 samples, eight rounds
    interleaved in one process: 1.97 s against 2.14 s layer by layer (medians); its gradients were a little closer
    to float32's (relative error 3.4e-4 against 4.6e-4 on a small model)."""
    C, n_layers = wn.n_channels, wn.n_layers
    start_weight, first_weight, res_skip_weights = _composed_weights(wn)
    last_weight, last_bias = res_skip_weights[-1]
    res_skip_weights[-1] = (last_weight, last_bias + wn.end.bias)  # the end layer's bias rides on the last skip rows
    audio = audio.to(spect.dtype)
    audio_and_one = torch.cat([audio, audio.new_ones(audio.size(0), 1, audio.size(2))], 1)  # (B, n_half + 1, T/g)
    residual_stream = conv1d(audio, start_weight.unsqueeze(2), wn.start.bias, 0, 1)  # (B, C, T/g): wn.start(audio)
    conds = wn.cond_layer(spect).split(2 * C, dim=1)  # n_layers x (B, 2C, T/g)
    output = None
    for i, (in_layer, (weight, bias)) in enumerate(zip(wn.in_layers, res_skip_weights, strict=True)):
        layer_input, in_weight = (audio_and_one, first_weight) if i == 0 else (residual_stream,
                                                                                in_layer.effective_weight())
        in_act = conv1d(layer_input, in_weight, in_layer.bias, in_layer.padding, in_layer.dilation)  # (B, 2C, T/g)
        acts = gated_activation(in_act + conds[i], C)  # (B, C, T/g)
        res_skip = conv1d(acts, weight.unsqueeze(2), bias, 0, 1)  # (B, C + n_out, T/g); the last layer's n_out
        residual_stream, output = _add_res_skip(res_skip, residual_stream, output, i == n_layers - 1, C, dim=1)
    return output  # (B, n_out, T/g), the end layer's output


def _time_major_conv(x, weight, dilation):
    """F.conv1d(x^T, weight, padding=dilation * (k - 1) / 2, dilation=dilation)^T for a time-major x (B, T, C_in)
    and an odd kernel (C_out, C_in, k): the sum of k row-shifted matrix products, (B, T, C_out)."""
    steps, taps = x.size(1), weight.size(2)
    padded = F.pad(x, (0, 0, dilation * (taps // 2), dilation * (taps // 2)))  # (B, T + (k - 1) d, C_in)
    return sum(cpu_matmul.matmul(padded[:, tap * dilation:tap * dilation + steps], weight[:, :, tap].t())
               for tap in range(taps))


def gated_activation(x, n_channels, dim=1):
    """glow.gated_activation, tanh(x[:, :C]) * sigmoid(x[:, C:]), bit for bit, forward and backward; dim: the
    channel dimension (2 for time-major tensors)."""
    return _GatedActivation.apply(x, n_channels, dim)


class _GatedActivation(torch.autograd.Function):
    """The gate with a backward that writes both halves' gradients into one (B, 2C, T/g) tensor: autograd's
    backward of the split wrote each half apart and then concatenated them, one more pass and allocation per
    layer. Measured on one config.json WN's forward and backward (rearranged_wn_forward, 2 x 2000 groups, two
    AVX2 cores, seven interleaved rounds): 1.035x."""

    @staticmethod
    def forward(ctx, x, n_channels, dim):
        tanh_input, sigmoid_input = x.split(n_channels, dim)
        tanh_half, sigmoid_half = torch.tanh(tanh_input), torch.sigmoid(sigmoid_input)
        ctx.save_for_backward(tanh_half, sigmoid_half)
        ctx.dim = dim
        return tanh_half * sigmoid_half  # (B, C, T/g), or (B, T/g, C) time-major

    @staticmethod
    def backward(ctx, grad_acts):
        tanh_half, sigmoid_half = ctx.saved_tensors
        shape = list(grad_acts.shape)
        shape[ctx.dim] *= 2
        grad = grad_acts.new_empty(shape)  # (B, 2C, T/g), or (B, T/g, 2C) time-major
        grad_tanh_input, grad_sigmoid_input = grad.split(tanh_half.size(ctx.dim), dim=ctx.dim)
        torch.mul(grad_acts, sigmoid_half, out=grad_tanh_input)
        torch.ops.aten.tanh_backward.grad_input(grad_tanh_input, tanh_half, grad_input=grad_tanh_input)
        torch.mul(grad_acts, tanh_half, out=grad_sigmoid_input)
        torch.ops.aten.sigmoid_backward.grad_input(grad_sigmoid_input, sigmoid_half, grad_input=grad_sigmoid_input)
        return grad, None, None


def uses_folded_wn_inference(wn, spect):
    """Whether WN `wn` runs folded_wn_inference for this mel: folded weights, inference on a CPU, not compiled;
    in float32 on the grouped mel only where cpu_matmul keeps torch's products. Where it takes oneDNN (torch's
    capability AVX-512), this path's channel-major products stay MKL's and rearranged_wn_forward's time-major
    ones do not: measured on two Zen 5 cores, config.json's model, 1 s of audio before the frame matrices, three
    interleaved rounds: 0.71 x real time against 0.43 here, the baseline's convolutions 0.55."""
    if spect.device.type != "cpu" or not wn.start.folded or not _inference_outside_compile():
        return False
    return isinstance(spect, MelFrames) or not (cpu_matmul.uses_onednn() and uses_rearranged_wn(wn, spect))


def folded_wn_inference(wn, audio, spect):
    """WN.forward((audio, spect)) of a folded WN for inference on a CPU as matrix products (bfloat16 under
    autocast, else the mel's own dtype: in float32 at least the convolutions' speed), with fewer memory passes
    and multiply-adds than layer by layer; the same math, rearranged:
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
    if isinstance(spect, MelFrames):
        return frame_conditioned_wn_inference(wn, audio, spect)
    dtype = _cpu_low_precision(spect) or spect.dtype  # what autocast asks for, with bfloat16 units or without
    C, batch, length = wn.n_channels, audio.size(0), audio.size(2)
    layers = _wn_inference_matrices(wn, dtype)
    audio = wn.start(audio.to(dtype))
    n_out = layers[-1][1].size(0)
    state = torch.cat([audio, audio.new_zeros(batch, n_out, length)], 1)  # (B, C + n_out, T/g)
    audio, output = state.split([C, n_out], dim=1)  # views: the residual stream, the WN's output
    n_cond = spect.size(1)
    kernel_size = wn.in_layers[0].kernel_size
    # One buffer each, reused by every layer; each ends in the row of ones that meets the matrices' bias column.
    inputs = audio.new_empty(batch, n_cond + kernel_size * C + 1, length)  # (B, n_mel*g + k*C + 1, T/g)
    inputs[:, :n_cond] = spect
    inputs[:, -1] = 1
    taps = inputs[:, n_cond:-1]
    in_act = audio.new_empty(batch, 2 * C, length)  # (B, 2C, T/g): (2a, b)
    acts_and_one = audio.new_empty(batch, C + 1, length)
    acts_and_one[:, C] = 1
    negated_acts = acts_and_one[:, :C]  # (B, C, T/g)
    for in_layer, (input_matrix, output_matrix) in zip(wn.in_layers, layers, strict=True):
        _im2col(audio, kernel_size, in_layer.padding, in_layer.dilation, out=taps)
        torch.bmm(input_matrix.expand(batch, -1, -1), inputs, out=in_act)
        tanh_gate, sigmoid_gate = torch.sigmoid_(in_act).split(C, dim=1)
        torch.addcmul(sigmoid_gate, tanh_gate, sigmoid_gate, value=-2.0, out=negated_acts)
        # the last layer has only a skip output
        target = state if output_matrix.size(0) > n_out else output
        target.baddbmm_(output_matrix.expand(batch, -1, -1), acts_and_one)
    return output  # (B, n_out, T/g)


def _wn_inference_matrices(wn, dtype):
    """For folded_wn_inference, in `dtype`, per layer: the input matrix [cond_layer's rows for it |
    in_layer's tap-major matrix | their summed bias] (2C, n_mel*g + k*C + 1), tanh half doubled; the output
    matrix [negated residual rows; negated end @ skip rows | biases] (C + n_out, C + 1), only the skip rows for
    the last layer, whose bias column also carries the end layer's bias. Folded in float32, made once and kept
    on the WN until any of these weights changes (in float32 a second copy of the WN weights: 0.3 GB for
    config.json's model). Never saved."""
    layers = [wn.cond_layer, *wn.in_layers, *wn.res_skip_layers, wn.end]
    tensors = [tensor for layer in layers for tensor in (layer.weight, layer.bias)]
    return cached_per_dtype(wn, dtype, tensors, lambda: _fold_wn_inference_matrices(wn, dtype))


@torch.no_grad()
def _fold_wn_inference_matrices(wn, dtype):
    """_wn_inference_matrices' matrices, built from the WN's folded weights."""
    C = wn.n_channels
    tanh_rows_doubled = torch.cat([torch.full((C, 1), 2.0), torch.ones(C, 1)]).to(wn.cond_layer.weight.device)
    end_matrix = wn.end.weight.squeeze(2).float()  # (n_out, C)
    layers = []
    for cond_weight, cond_bias, in_layer, res_skip_layer in zip(
            wn.cond_layer.weight.squeeze(2).split(2 * C), wn.cond_layer.bias.split(2 * C),
            wn.in_layers, wn.res_skip_layers, strict=True):
        input_bias = cond_bias.float() + in_layer.bias.float()
        input_matrix = torch.cat([cond_weight.float(), _tap_major(in_layer.weight).float(), input_bias[:, None]], 1)
        weight, bias = res_skip_layer.weight.squeeze(2).float(), res_skip_layer.bias.float()
        weight = torch.cat([weight[:-C], end_matrix @ weight[-C:]])  # the skip rows through the end layer
        bias = torch.cat([bias[:-C], end_matrix @ bias[-C:]])
        if res_skip_layer is wn.res_skip_layers[-1]:  # skip rows only; the end layer's bias rides here
            bias = bias + wn.end.bias.float()
        output_matrix = torch.cat([-weight, bias[:, None]], 1)  # (C + n_out or n_out, C + 1)
        layers.append(((input_matrix * tanh_rows_doubled).to(dtype).contiguous(),
                       output_matrix.to(dtype).contiguous()))
    return layers


class MelFrames:
    """A mel (B, n_mel, F) as the WNs' conditioning in frame_conditioned_wn_inference, in place of the grouped
    upsampled mel: one row per block of stride/g groups (the samples of one mel frame), holding the `overlap` =
    kernel/stride frames the upsampler mixes into that block (frame m, m-1, ...) and a one for the bias."""

    def __init__(self, mel, n_groups, upsample, n_group):
        stride, overlap = upsample.stride[0], upsample.kernel_size[0] // upsample.stride[0]
        self.upsample, self.n_group, self.device = upsample, n_group, mel.device  # device: read as a mel's is
        n_blocks = -(-n_groups // (stride // n_group))  # stride/g groups per mel frame
        padded = F.pad(mel, (overlap - 1, max(0, n_blocks - mel.size(2))))  # frames before 0 and past the end are 0
        windows = padded.unfold(2, overlap, 1)[:, :, :n_blocks].flip(3)  # (B, n_mel, n_blocks, overlap): m, m-1, ...
        rows = windows.permute(0, 2, 3, 1).reshape(mel.size(0), n_blocks, -1)  # (B, n_blocks, overlap*n_mel)
        self.frames = torch.cat([rows, rows.new_ones(mel.size(0), n_blocks, 1)], 2)  # (B, n_blocks, overlap*n_mel+1)


def reverse_conditioning(model, spect, n_samples):
    """The WNs' conditioning in WaveGlow.reverse: the grouped upsampled mel (B, n_mel*g, T/g), or, for folded
    float32 inference on a CPU, the mel's frames (MelFrames), on which each WN computes its cond layer directly.

    The upsampler and the cond layer are both linear in the mel, so each cond layer's output for a group is a
    matrix product over the overlap = 4 mel frames the group's samples come from, with one matrix per phase of
    the group within its frame (32 for g = 8): 4*80 + 1 inputs per output instead of 8*80, which makes float32
    inference of config.json's model 21 % fewer multiply-adds. The price: those matrices take 2.0 GB for
    config.json's model (8 layers x 321 x 32 x 512 floats per WN) and ~320 GMAC to build (a few seconds), so
    they repay after ~7 s of audio with the same weights. Like buying skis after renting them for their price,
    a model takes them once it has synthesised that much audio since its weights last changed (or at once after
    prepare_frame_conditioning); until then, and for bfloat16, the grouped mel. Either way the same math.
    """
    n_groups = n_samples // model.n_group
    if _uses_frame_conditioning(model, spect) and _frame_matrices_pay(model, n_groups):
        return MelFrames(spect, n_groups, model.upsample, model.n_group)
    return model._group_mel(model._upsample(spect), n_samples)


def prepare_frame_conditioning(model):
    """Build every WN's frame-conditioning matrices now (folded model), so that float32 CPU inference uses them
    from the first call; returns their size in bytes. For servers and benchmarks that know much audio will follow."""
    model.__dict__["_frame_groups_synthesised"] = (_frame_weights_key(model), math.inf)
    matrices = [_frame_cond_matrices(wn, model.upsample, model.n_group) for wn in model.WN]
    return sum(matrix.numel() * matrix.element_size() for per_wn in matrices for matrix in per_wn)


def _frame_matrices_pay(model, n_groups):
    """Whether this call of n_groups takes the frame matrices: once the groups synthesised with these weights
    (this call's too) reach what building them costs, counted in cond-layer multiply-adds saved."""
    upsample, g = model.upsample, model.n_group
    n_mel, stride = upsample.weight.size(1), upsample.stride[0]
    overlap, phases = upsample.kernel_size[0] // stride, stride // g
    saved_per_group = n_mel * g - (overlap * n_mel + 1)  # per cond-layer output channel
    if saved_per_group <= 0:
        return False
    break_even = n_mel * g * phases * overlap * n_mel / saved_per_group  # 20,500 groups (7.4 s) for config.json
    key = _frame_weights_key(model)
    seen_key, seen = model.__dict__.get("_frame_groups_synthesised", (None, 0))
    seen = (seen if seen_key == key else 0) + n_groups
    model.__dict__["_frame_groups_synthesised"] = (key, seen)  # a plain attribute, never saved
    return seen >= break_even


def _frame_weights_key(model):
    return _weights_key([tensor for wn in model.WN for tensor in _frame_cond_tensors(wn, model.upsample)])


def _uses_frame_conditioning(model, spect):
    upsample = model.upsample
    stride, kernel_size = upsample.stride[0], upsample.kernel_size[0]
    return (spect.device.type == "cpu" and spect.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and _inference_outside_compile() and kernel_size % stride == 0 and stride % model.n_group == 0
            and upsample.weight.dtype == torch.float32
            and all(wn.start.folded and wn.cond_layer.folded and wn.start.weight.dtype == torch.float32
                    and getattr(wn, "_compiled_call_impl", None) is None for wn in model.WN))


# Where cpu_matmul takes oneDNN, frame_conditioned_wn_inference stacks a dilated layer's taps into one product of
# contiguous rows, this many rows at a time, so the stacked block (1.5 MB at 256 channels) stays in the cache.
# Measured on two Zen 5 cores (AVX512), config.json's model, in interleaved rounds: 10 s of audio at 0.82 x real
# time with blocks of 512 rows, 0.76 with 1024, 0.62 with the whole clip at once (which is 0.87 against 0.83 for
# 1 s); torch's per-tap products (MKL), in another run of the same day: 1 s at 0.63, 10 s at 0.58.
TAP_BLOCK_ROWS = 512


def frame_conditioned_wn_inference(wn, audio, frames):
    """folded_wn_inference's math in float32 with the cond layer on the mel's frames (reverse_conditioning), laid
    out time-major: each (T/g, channels) tensor keeps a time step's channels together, so one cond product per
    layer, (blocks, 4*n_mel+1) @ (4*n_mel+1, 32*2C) (_frame_product), lands as (T/g, 2C) rows, and each tap of
    the dilated convolution is a plain row-shifted view of the residual stream (zero rows at both ends are the
    padding), one accumulating product per tap, with no shifted copies. The gate and the output products as in
    folded_wn_inference. (B, n_half, T/g) -> (B, n_out, T/g). Measured on one config.json WN against the
    channel-major folded_wn_inference (CPU seconds, one AVX2 core): 1.03x for 1 s of audio, 1.36x for 5 s;
    the same layout with the grouped mel's cond product instead gained nothing (0.88x and 1.02x).
    The first dilated convolution reads the start layer's output, so its taps are composed with the start layer
    as in rearranged_wn_forward: each of its products takes the n_half audio channels and a column of ones
    (zero in the padding rows, as the start output is), n_half + 1 inputs instead of C. Measured on one
    config.json WN, two AVX2 cores, interleaved rounds (medians): 1.07x for 1 s of audio, 1.05x for 10 s.
    The products go through cpu_matmul; where it takes oneDNN, each dilated layer's taps are stacked into one
    product instead (TAP_BLOCK_ROWS above)."""
    C, length = wn.n_channels, audio.size(2)
    layers = _wn_inference_matrices(wn, torch.float32)
    conds = _frame_cond_matrices(wn, frames.upsample, frames.n_group)
    n_cond, n_out = wn.cond_layer.weight.size(1), layers[-1][1].size(0)
    kernel_size = wn.in_layers[0].kernel_size
    pad = max(layer.padding for layer in wn.in_layers)
    n_half = audio.size(1)
    start_matrix = torch.cat([wn.start.weight.squeeze(2), wn.start.bias.unsqueeze(1)], 1).t()  # (n_half + 1, C)
    first_taps = layers[0][0][:, n_cond:n_cond + kernel_size * C].reshape(2 * C, kernel_size, C)  # (2C, k, C)
    first_taps = torch.einsum("okc,jc->kjo", first_taps, start_matrix)  # (k, n_half + 1, 2C): through the start
    outputs = []
    for item in range(audio.size(0)):  # 2-D products: a batch is rare in inference and costs only the loop
        audio_and_one = audio.new_zeros(length + 2 * pad, n_half + 1)  # (T/g + 2 pad, n_half + 1)
        audio_and_one[pad:pad + length, :n_half] = audio[item].t()
        audio_and_one[pad:pad + length, n_half] = 1
        state = audio.new_zeros(length + 2 * pad, C + n_out)  # (T/g + 2 pad, C + n_out): residual stream, output
        body = state[pad:pad + length]
        torch.mm(audio_and_one[pad:pad + length], start_matrix, out=body[:, :C])
        frame_rows = frames.frames[item]  # (n_blocks, 4*n_mel + 1)
        acts_and_one = audio.new_empty(length, C + 1)
        acts_and_one[:, C] = 1
        negated_acts = acts_and_one[:, :C]
        for i, (in_layer, (input_matrix, output_matrix), cond) in enumerate(zip(wn.in_layers, layers, conds,
                                                                                 strict=True)):
            cond_out = _frame_product(frame_rows, cond)  # (n_blocks, 32*2C): conditioning and both biases
            in_act = cond_out.view(-1, 2 * C)[:length]  # (T/g, 2C): (2a, b)
            shifts = [tap * in_layer.dilation - in_layer.padding for tap in range(kernel_size)]  # tap reads t + shift
            taps_weight = input_matrix[:, n_cond:n_cond + kernel_size * C]  # (2C, kC), tap-major
            if i == 0:  # the start layer's input, through the start layer
                for tap, shift in enumerate(shifts):
                    in_act.addmm_(audio_and_one[pad + shift:pad + shift + length], first_taps[tap])
            elif cpu_matmul.routed(in_act, taps_weight.t()):  # oneDNN, fast on contiguous rows: the taps stacked
                taps_matrix = taps_weight.contiguous()
                for begin in range(0, length, TAP_BLOCK_ROWS):
                    end = min(begin + TAP_BLOCK_ROWS, length)
                    taps = torch.cat([state[pad + shift + begin:pad + shift + end, :C] for shift in shifts], 1)
                    cpu_matmul.accumulate(in_act[begin:end], taps, taps_matrix.t())  # taps: (rows, kC)
            else:
                for tap, shift in enumerate(shifts):
                    tap_matrix = taps_weight[:, tap * C:(tap + 1) * C]  # (2C, C)
                    in_act.addmm_(state[pad + shift:pad + shift + length, :C], tap_matrix.t())
            tanh_gate, sigmoid_gate = torch.sigmoid_(in_act).split(C, dim=1)
            torch.addcmul(sigmoid_gate, tanh_gate, sigmoid_gate, value=-2.0, out=negated_acts)
            target = body if output_matrix.size(0) > n_out else body[:, C:]  # the last layer: skip rows only
            cpu_matmul.accumulate(target, acts_and_one, output_matrix.t())
        outputs.append(body[:, C:].t())
    return torch.stack(outputs)  # (B, n_out, T/g)


def _frame_cond_matrices(wn, upsample, n_group):
    """Per layer of `wn`, (overlap*n_mel + 1, 32*2C): its rows of the cond layer composed with the upsampler for
    each phase of a group within its mel frame, the last row all the input biases (the upsampler's through the
    cond layer, the cond layer's, the in layer's), tanh columns doubled as in _wn_inference_matrices. Kept on the
    WN until these weights change."""
    return cached_per_dtype(wn, FRAME_MATRICES, _frame_cond_tensors(wn, upsample), lambda: [
        _pack_frame_matrix(matrix) for matrix in _fold_frame_cond_matrices(wn, upsample, n_group)])


def _pack_frame_matrix(matrix):
    """A frame matrix (overlap*n_mel + 1, 32*2C) as _frame_product multiplies by it: oneDNN's pre-packed linear
    weight where torch has oneDNN, else the matrix itself. The product has one row per mel frame, few for short
    clips, where the plain matrix product is slow: measured on 2 AVX2 cores, (87 x 321) @ (321 x 16384), the
    product of 1 s of audio, 101 GFLOP/s packed against 46 for torch.mm; 120 against 65 for 200 rows, 86 against
    60 for 862 (10 s)."""
    if torch.backends.mkldnn.is_available() and matrix.device.type == "cpu":
        try:
            return torch.ops.mkldnn._reorder_linear_weight(matrix.t().contiguous(), 128)  # 128: rows expected
        except (AttributeError, RuntimeError, NotImplementedError):  # a build without this oneDNN operator
            pass
    return matrix


def _frame_product(rows, matrix):
    """rows (n, K) @ a _pack_frame_matrix result -> (n, N)."""
    if matrix.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(rows, matrix, None, "none", [], "")
    return torch.mm(rows, matrix)


FRAME_MATRICES = "frame conditioning"  # their key among a WN's cached inference matrices


def _frame_cond_tensors(wn, upsample):
    layers = [wn.cond_layer, *wn.in_layers, upsample]
    return [tensor for layer in layers for tensor in (layer.weight, layer.bias)]


def frame_conditioning_built(model):
    """Whether every WN of `model` holds frame-conditioning matrices made from its current weights."""
    return all(_is_cached(wn, FRAME_MATRICES, _frame_cond_tensors(wn, model.upsample)) for wn in model.WN)


@torch.no_grad()
def _fold_frame_cond_matrices(wn, upsample, n_group):
    weight, bias = upsample.weight.float(), upsample.bias.float()  # (n_mel, n_mel, kernel), (n_mel,)
    n_mel, stride, C = weight.size(0), upsample.stride[0], wn.n_channels
    overlap, phases = weight.size(2) // stride, stride // n_group
    # upsampled[c_out, stride*m + g*j + i] = bias[c_out] + sum_q,c_in weight[c_in, c_out, stride*q + g*j + i] mel[c_in, m-q];
    # the grouped mel's channel is c_out*g + i, so for phase j its (n_mel*g, overlap*n_mel) matrix is:
    phase_matrices = weight.view(n_mel, n_mel, overlap, phases, n_group).permute(1, 4, 3, 2, 0)
    phase_matrices = phase_matrices.reshape(n_mel * n_group, phases * overlap * n_mel)  # columns (j, q, c_in)
    grouped_bias = bias.repeat_interleave(n_group)  # (n_mel*g,)
    tanh_rows_doubled = torch.cat([torch.full((C,), 2.0), torch.ones(C)]).to(weight.device)
    conds = []
    for cond_weight, (input_matrix, _) in zip(wn.cond_layer.weight.squeeze(2).float().split(2 * C),
                                              _wn_inference_matrices(wn, torch.float32), strict=True):
        composed = (cond_weight * tanh_rows_doubled[:, None]) @ phase_matrices  # (2C, phases*overlap*n_mel)
        composed = composed.view(2 * C, phases, overlap * n_mel).permute(2, 1, 0).reshape(overlap * n_mel, -1)
        biases = input_matrix[:, -1] + tanh_rows_doubled * (cond_weight @ grouped_bias)  # (2C,), tanh rows doubled
        conds.append(torch.cat([composed, biases.repeat(phases)[None]]).contiguous())  # (overlap*n_mel+1, J*2C)
    return conds


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
