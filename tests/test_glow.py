"""The WaveGlow model: upstream math, invertibility, likelihood terms, precision and errors."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import cpu_matmul
import glow_fast
from baseline import BaselineWaveGlow
from conftest import REPO, TINY_WAVEGLOW, perturb_end_layers
from glow import WN, WaveGlow, WaveGlowLoss, gated_activation, remove_weightnorm
from winograd import dilated_conv3


def make_model(seed=0, randomise_end=True, **overrides):
    torch.manual_seed(seed)
    config = {**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}
    config.update(overrides)
    model = WaveGlow(**config)
    return perturb_end_layers(model, 0.1) if randomise_end else model


def batch(n_samples=2048, batch_size=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    n_frames = n_samples // 256
    mel = torch.randn(batch_size, 80, n_frames, generator=generator)
    audio = torch.rand(batch_size, n_samples, generator=generator) * 2 - 1
    return mel, audio


def test_matches_plain_restatement_of_upstream_math():
    """baseline.py restates upstream's forward pass the plain way (torch's own weight norm,
    reshapes instead of unfold); the same upstream-named state dict must give the same numbers."""
    model = make_model()
    reference = BaselineWaveGlow(**TINY_WAVEGLOW)
    reference.load_upstream_state_dict(model.state_dict())
    mel, audio = batch()
    z, log_s_list, log_det_list = model((mel, audio))
    z_ref, log_s_ref, log_det_ref = reference((mel, audio))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(s.sum() for s in log_s_list), sum(s.sum() for s in log_s_ref), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum(log_det_list), sum(log_det_ref), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(model.reverse(mel, z), reference.reverse(mel, z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    {},
    {"n_group": 8, "n_early_every": 2, "n_early_size": 3, "n_flows": 4},  # odd channel counts (8 -> 5)
    {"n_group": 4, "n_early_every": 3, "n_early_size": 1, "n_flows": 5},  # 4 -> 3 -> 2
    {"n_group": 16, "n_early_every": 2, "n_early_size": 4, "n_flows": 6},
    {"n_flows": 3, "n_early_every": 1, "n_early_size": 2, "n_group": 8,
     "WN_config": {"n_layers": 3, "n_channels": 8, "kernel_size": 5}},
])
def test_forward_then_reverse_rebuilds_audio(overrides):
    model = make_model(**overrides)
    mel, audio = batch()
    z, _, _ = model((mel, audio))
    assert z.shape == (2, model.n_group, 2048 // model.n_group)
    rebuilt = model.reverse(mel, z)
    error = (rebuilt - audio).norm() / audio.norm()
    assert error < 1e-4, f"relative reconstruction error {error:.2e}"
    assert (rebuilt - audio).abs().max() > 0 or error == 0  # rebuilt from z, not a copy of audio


def test_log_det_W_equals_slogdet():
    model = make_model()
    mel, audio = batch()
    _, _, log_det_list = model((mel, audio))
    n_of_groups = audio.size(1) // model.n_group
    for inv, log_det in zip(model.convinv, log_det_list, strict=True):
        sign, logabsdet = torch.linalg.slogdet(inv.conv.weight.squeeze(2).double())
        assert sign > 0
        torch.testing.assert_close(log_det.double(), audio.size(0) * n_of_groups * logabsdet, rtol=1e-5, atol=1e-4)
    # Orthonormal initialisation: det = +1, so log|det| is zero before training.
    for inv in WaveGlow(**TINY_WAVEGLOW).convinv:
        assert torch.linalg.det(inv.conv.weight.squeeze(2)).item() == pytest.approx(1.0, abs=1e-5)


def test_folding_weight_norm_leaves_outputs_unchanged():
    model = make_model()
    mel, audio = batch()
    z_before = model((mel, audio))[0]
    audio_before = model.infer(mel, sigma=0.8, seed=3)
    n_before = sum(p.numel() for p in model.parameters())
    remove_weightnorm(model)
    assert not any("weight_g" in name for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < n_before
    torch.testing.assert_close(model((mel, audio))[0], z_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.infer(mel, sigma=0.8, seed=3), audio_before, rtol=1e-4, atol=1e-5)


def test_fresh_model_loss_on_uniform_noise_is_one_sixth():
    torch.manual_seed(0)
    model = WaveGlow(**TINY_WAVEGLOW)  # identity couplings, rotations: loss = E[x^2]/2 = 1/6
    mel, audio = batch(n_samples=16384, batch_size=4)
    loss = WaveGlowLoss(sigma=1.0)(model((mel, audio)))
    assert loss.item() == pytest.approx(1 / 6, abs=3e-3)
    assert WaveGlowLoss(sigma=0.5)(model((mel, audio))).item() == pytest.approx(4 / 6, abs=1.2e-2)


def test_gradients_reach_every_parameter():
    model = make_model()
    mel, audio = batch()
    WaveGlowLoss()(model((mel, audio))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def _wn_with_every_term_counting(seed, n_in, n_layers, kernel_size, n_channels):
    """A WN with random end layer and biases (they start at zero), inputs (B=2, T/g=37, a length no block size
    divides) that want gradients, and random weights to reduce its output by."""
    torch.manual_seed(seed)
    wn = WN(n_in, 40, n_layers=n_layers, n_channels=n_channels, kernel_size=kernel_size, n_out_channels=2 * n_in)
    with torch.no_grad():
        for parameter in wn.parameters():
            parameter.normal_(0, 0.3)  # make every composed term count
    audio, spect = torch.randn(2, n_in, 37, requires_grad=True), torch.randn(2, 40, 37, requires_grad=True)
    return wn, audio, spect, torch.randn(2, 2 * n_in, 37)


@pytest.mark.parametrize("n_in, n_layers, kernel_size, n_channels, onednn", [
    (4, 3, 3, 8, False), (3, 1, 3, 8, False), (1, 2, 5, 8, False), (2, 2, 3, 64, False), (2, 2, 3, 64, True)])
def test_float32_cpu_wn_with_fewer_multiply_adds_matches_the_layer_by_layer_math(monkeypatch, n_in, n_layers,
                                                                                 kernel_size, n_channels, onednn):
    """Float32 CPU WN (glow_fast.rearranged_wn_forward: time-major, Winograd's F(4, 3) for 3-tap dilated layers,
    the end layer composed into each skip matrix, the start layer into the first dilated convolution): the
    layer-by-layer forward's output, input gradients and every parameter's gradient, with every bias counting,
    for one layer, odd channel counts, a 5-tap kernel and a length no block size divides; with 64 channels also
    with its wide products by oneDNN (cpu_matmul), as on CPUs with AVX-512."""
    monkeypatch.setattr(cpu_matmul, "uses_onednn", lambda: onednn)
    wn, audio, spect, weights = _wn_with_every_term_counting(4, n_in, n_layers, kernel_size, n_channels)

    def output_and_gradients():
        wn.zero_grad(set_to_none=True)
        audio.grad = spect.grad = None
        output = wn((audio, spect))
        (output * weights).sum().backward()
        return [output.detach(), audio.grad, spect.grad] + [parameter.grad for parameter in wn.parameters()]

    calls = []
    rearranged = glow_fast.rearranged_wn_forward
    monkeypatch.setattr(glow_fast, "rearranged_wn_forward", lambda *args: calls.append(1) or rearranged(*args))
    fast = output_and_gradients()
    assert calls, "float32 CPU training did not take the rearranged WN"
    monkeypatch.setattr(glow_fast, "uses_rearranged_wn", lambda wn, spect: False)
    plain = output_and_gradients()
    assert len(calls) == 1
    for fast_tensor, plain_tensor in zip(fast, plain, strict=True):
        torch.testing.assert_close(fast_tensor, plain_tensor, rtol=1e-5, atol=1e-5)
    gate_input, gate_weights = torch.randn(2, 16, 9, requires_grad=True), torch.randn(2, 8, 9)
    fast_acts = glow_fast.gated_activation(gate_input, 8)  # its gate: the plain gate's numbers, bit for bit
    (fast_acts * gate_weights).sum().backward()
    fast_grad, gate_input.grad = gate_input.grad, None
    plain_acts = gated_activation(gate_input, 8)
    (plain_acts * gate_weights).sum().backward()
    assert torch.equal(fast_acts, plain_acts) and torch.equal(fast_grad, gate_input.grad)
    time_major = gate_input.detach().transpose(1, 2).contiguous().requires_grad_()  # (B, T, 2C): the channels last
    time_major_acts = glow_fast.gated_activation(time_major, 8, dim=2)
    (time_major_acts * gate_weights.transpose(1, 2)).sum().backward()
    fast_grad, time_major.grad = time_major.grad, None
    plain_acts = torch.tanh(time_major[..., :8]) * torch.sigmoid(time_major[..., 8:])
    (plain_acts * gate_weights.transpose(1, 2)).sum().backward()
    assert torch.equal(time_major_acts, plain_acts) and torch.equal(fast_grad, time_major.grad)


@pytest.mark.parametrize("n_in, n_layers, kernel_size, n_channels", [(4, 3, 3, 8), (3, 1, 3, 8), (1, 2, 5, 8)])
def test_bfloat16_cpu_wn_with_fewer_multiply_adds_is_the_layer_by_layer_math(monkeypatch, n_in, n_layers,
                                                                            kernel_size, n_channels):
    """bfloat16 CPU WN (glow_fast.composed_wn_forward: each skip matrix through the end layer, the first dilated
    convolution through the start layer, channel-major): in float64 the layer-by-layer forward's output, input
    gradients and every parameter's gradient to rounding, with every bias counting; under CPU bfloat16 autocast
    (bfloat16 units faked both ways) the path WN takes, in the layer-by-layer output's dtype, near float32."""
    wn, audio, spect, weights = _wn_with_every_term_counting(5, n_in, n_layers, kernel_size, n_channels)

    def output_and_gradients(forward, *inputs):
        wn.zero_grad(set_to_none=True)
        for tensor in inputs:
            tensor.grad = None
        output = forward(*inputs)
        (output.double() * weights.double()).sum().backward()
        return [output.detach().double()] + [tensor.grad for tensor in inputs] + [p.grad for p in wn.parameters()]

    with monkeypatch.context() as plain:
        plain.setattr(glow_fast, "uses_rearranged_wn", lambda wn, spect: False)
        wn.double()
        audio64, spect64 = (tensor.detach().double().requires_grad_() for tensor in (audio, spect))
        composed = output_and_gradients(lambda *x: glow_fast.composed_wn_forward(wn, *x), audio64, spect64)
        reference = output_and_gradients(lambda *x: wn(x), audio64, spect64)
        for got, want in zip(composed, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        wn.float()
        reference32 = output_and_gradients(lambda *x: wn(x), audio, spect)
    calls = []
    composed_forward = glow_fast.composed_wn_forward
    monkeypatch.setattr(glow_fast, "composed_wn_forward", lambda *args: calls.append(1) or composed_forward(*args))
    for native in (True, False):
        monkeypatch.setattr(glow_fast, "cpu_has_bf16_units", lambda native=native: native)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert wn((audio, spect)).dtype == torch.bfloat16
            with monkeypatch.context() as plain:
                plain.setattr(glow_fast, "uses_composed_wn", lambda wn, spect: False)
                assert wn((audio, spect)).dtype == torch.bfloat16  # the layer-by-layer output's dtype too
            fast = output_and_gradients(lambda *x: wn(x), audio, spect)
        assert len(calls) == 2, "CPU bfloat16 autocast did not take the composed WN"
        calls.clear()
        # output, input gradients, then all parameter gradients as one (some are ~1e-8, rounding noise alone)
        for got, want in zip(fast[:3] + [_flat(fast[3:])], reference32[:3] + [_flat(reference32[3:])], strict=True):
            assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 3e-2


def _flat(tensors):
    return torch.cat([tensor.double().flatten() for tensor in tensors])


@pytest.mark.parametrize("onednn", [False, True])
def test_float32_products_by_either_library_are_the_products_forward_and_backward(monkeypatch, onednn):
    """cpu_matmul's products, by torch's own matmul or by oneDNN's linear (forced here, on any CPU): a @ b + bias
    and its three gradients for a 2-D a and for a non-contiguous 3-D slice, and the stacked point products plain
    and transposed, all against float64; narrow products stay torch's even where oneDNN is chosen."""
    monkeypatch.setattr(cpu_matmul, "uses_onednn", lambda: onednn)
    calls = []
    to_onednn = cpu_matmul._onednn
    monkeypatch.setattr(cpu_matmul, "_onednn", lambda *args: calls.append(1) or to_onednn(*args))
    torch.manual_seed(6)
    padded = torch.randn(2, 60, 64)
    cases = ((torch.randn(70, 96), torch.randn(80), False), (padded[:, 3:53], None, False),  # (70, 96), (2, 50, 64)
             (torch.randn(70, 96), torch.randn(80), True))  # b as the callers pass it: a weight (N, K), transposed
    for a, bias, transposed in cases:
        a = a.requires_grad_() if a.is_leaf else a.detach().requires_grad_()
        b = torch.randn(80, a.size(-1)) if transposed else torch.randn(a.size(-1), 80)  # a leaf, b below its view
        b.requires_grad_()
        inputs = (a, b) if bias is None else (a, b, bias.requires_grad_())
        grad_out = torch.randn(*a.shape[:-1], 80)
        output = cpu_matmul.matmul(a, b.t() if transposed else b, bias)
        grads = torch.autograd.grad(output, inputs, grad_out)
        exact = [t.detach().double().requires_grad_() for t in inputs]
        reference = exact[0] @ (exact[1].t() if transposed else exact[1]) + (exact[2] if bias is not None else 0)
        reference_grads = torch.autograd.grad(reference, exact, grad_out.double())
        for ours, theirs in zip((output, *grads), (reference, *reference_grads), strict=True):
            torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-4)
    a, b, c = torch.randn(6, 90, 64), torch.randn(6, 64, 72), torch.randn(6, 90, 72)
    for ours, theirs in ((cpu_matmul.point_products(a, b), a.double() @ b.double()),
                         (cpu_matmul.point_products(a, c, transpose_a=True), a.double().transpose(1, 2) @ c.double())):
        torch.testing.assert_close(torch.stack(list(ours)).double(), theirs, rtol=1e-5, atol=1e-4)
    assert bool(calls) is onednn
    calls.clear()
    narrow = torch.randn(64, 5, requires_grad=True)  # a 5-wide operand: torch's product on every CPU
    cpu_matmul.matmul(torch.randn(30, 64), narrow).sum().backward()
    assert not calls


@pytest.mark.parametrize("capability, onednn", [("AVX2", False), ("DEFAULT", False), ("AVX512", True)])
def test_float32_products_go_to_onednn_only_where_torch_runs_avx512(monkeypatch, capability, onednn):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu_matmul.uses_onednn.cache_clear()  # the choice is cached: ask again
    try:
        assert cpu_matmul.uses_onednn() is (onednn and torch.backends.mkldnn.is_available())
    finally:
        monkeypatch.undo()
        cpu_matmul.uses_onednn.cache_clear()  # the next test sees this machine's own answer again


@pytest.mark.parametrize("batch, steps, dilation", [(1, 64, 1), (2, 37, 4), (3, 100, 16), (2, 50, 128)])
def test_winograd_dilated_convolution_is_the_convolution_forward_and_backward(batch, steps, dilation):
    """winograd.dilated_conv3 against F.conv1d: exact math (float64 to rounding) and float32 within 1e-5 of the
    largest output, for lengths a block of 4 x dilation steps divides and does not, and shorter than one block."""
    torch.manual_seed(5)
    x = torch.randn(batch, 6, steps, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, 3, dtype=torch.float64, requires_grad=True)
    reference = F.conv1d(x, weight, padding=dilation, dilation=dilation)  # (B, C_out, T)
    grad_out = torch.randn_like(reference)
    reference_grads = torch.autograd.grad(reference, (x, weight), grad_out)
    x_time_major = x.detach().transpose(1, 2).contiguous().requires_grad_()  # (B, T, C_in)
    output = dilated_conv3(x_time_major, weight, dilation)
    grads = torch.autograd.grad(output, (x_time_major, weight), grad_out.transpose(1, 2))
    torch.testing.assert_close(output.transpose(1, 2), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0].transpose(1, 2), reference_grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], reference_grads[1], rtol=1e-12, atol=1e-12)
    float32 = dilated_conv3(x_time_major.detach().float(), weight.detach().float(), dilation).transpose(1, 2)
    assert (float32.double() - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("hop, n_frames, batch_size", [(256, 5, 2), (200, 3, 1), (4, 7, 3)])
def test_cpu_upsampler_and_its_gradients_equal_the_transposed_convolution(hop, n_frames, batch_size):
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose1d(6, 6, 4 * hop, stride=hop).double()
    spect = torch.randn(batch_size, 6, n_frames, dtype=torch.float64, requires_grad=True)
    weight_of_output = torch.randn(batch_size, 6, hop * n_frames + 3 * hop, dtype=torch.float64)
    grads = []
    for upsample in (layer, lambda x: glow_fast.upsample(x, layer)):
        layer.zero_grad()
        spect.grad = None
        out = upsample(spect)
        (out * weight_of_output).sum().backward()
        grads.append((out.detach(), spect.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for reference, ours in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_loss_does_not_mutate_its_inputs():
    model = make_model()
    output = model(batch())
    z, log_s_list, log_det_list = output
    copies = (z.clone(), [t.clone() for t in log_s_list], [t.clone() for t in log_det_list])
    lengths = (len(log_s_list), len(log_det_list))
    WaveGlowLoss()(output)
    assert (len(log_s_list), len(log_det_list)) == lengths
    assert torch.equal(z, copies[0])
    assert all(torch.equal(a, b) for a, b in zip(log_s_list, copies[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(log_det_list, copies[2], strict=True))


def test_tiny_model_overfits_one_clip():
    model = make_model(randomise_end=False)
    mel, audio = batch(batch_size=1)
    audio = 0.5 * torch.sin(torch.arange(2048) * 0.07).unsqueeze(0)  # very predictable signal
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = WaveGlowLoss()
    losses = []
    for _ in range(40):
        loss = criterion(model((mel, audio)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_state_dict_uses_upstream_names_and_round_trips():
    model = make_model()
    sd = model.state_dict()
    for name in ["upsample.weight", "upsample.bias", "WN.0.start.weight_g", "WN.0.start.weight_v", "WN.0.start.bias",
                 "WN.0.end.weight", "WN.0.end.bias", "WN.0.cond_layer.weight_g", "WN.0.in_layers.1.weight_v",
                 "WN.0.res_skip_layers.1.bias", "convinv.0.conv.weight"]:
        assert name in sd, name
    assert sd["WN.0.in_layers.0.weight_g"].shape == (32, 1, 1)
    assert not any("inverse" in name for name in sd)
    other = make_model(seed=5)
    other.load_state_dict(sd)
    mel, audio = batch()
    torch.testing.assert_close(other((mel, audio))[0], model((mel, audio))[0])
    # Folded and unfolded forms load into each other.
    folded = remove_weightnorm(make_model(seed=6))
    folded.load_state_dict(sd)
    torch.testing.assert_close(folded((mel, audio))[0], model((mel, audio))[0], rtol=1e-5, atol=1e-5)
    unfolded = make_model(seed=7)
    unfolded.load_state_dict(folded.state_dict())
    torch.testing.assert_close(unfolded((mel, audio))[0], model((mel, audio))[0], rtol=1e-5, atol=1e-5)


def test_config_json_model_parameter_count():
    config = json.loads((REPO / "config.json").read_text())["waveglow_config"]
    model = WaveGlow(**config)
    assert sum(p.numel() for p in model.parameters()) == 87_879_272
    remove_weightnorm(model)
    assert sum(p.numel() for p in model.parameters()) == 87_731_816


def test_infer_length_seed_and_generator():
    model = make_model()
    mel = torch.randn(2, 80, 10)
    a = model.infer(mel, sigma=0.6, seed=11)
    b = model.infer(mel, sigma=0.6, seed=11)
    c = model.infer(mel, sigma=0.6, seed=12)
    assert a.shape == (2, 2560)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = model.infer(mel, sigma=0.6, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, d)
    silent = model.infer(mel, sigma=0.0)
    assert torch.isfinite(silent).all()


def test_infer_runs_in_the_mels_dtype():
    model = make_model()
    mel = torch.randn(1, 80, 8)
    reference = model.infer(mel, sigma=0.5, seed=1)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = bf16.infer(mel.to(torch.bfloat16), sigma=0.5, seed=1)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert (out.float() - reference).norm() / reference.norm() < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.infer(mel, sigma=0.5, seed=1)
    assert out.dtype == torch.float32
    assert (out - reference).norm() / reference.norm() < 0.05


def test_autocast_keeps_audio_path_and_loss_in_float32():
    model = make_model()
    mel, audio = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_s_list, log_det_list = model((mel, audio))
        loss = WaveGlowLoss()((z, log_s_list, log_det_list))
    assert z.dtype == torch.float32 and loss.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in log_s_list + log_det_list)
    z32 = model((mel, audio))[0]
    assert (z - z32).norm() / z32.norm() < 0.05  # WN in bf16, the rest in float32


def test_cached_inverse_follows_weight_changes():
    model = make_model()
    mel = torch.randn(1, 80, 8)
    first = model.infer(mel, sigma=0.5, seed=1)
    # An optimizer step changes W in place: the cached inverse must follow.
    optimizer = torch.optim.SGD([inv.conv.weight for inv in model.convinv], lr=0.1)
    for inv in model.convinv:
        inv.conv.weight.grad = torch.randn_like(inv.conv.weight)
    optimizer.step()
    mel2, audio = batch(n_samples=2048, batch_size=1)
    z = model((mel2, audio))[0]
    torch.testing.assert_close(model.reverse(mel2, z), audio, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.infer(mel, sigma=0.5, seed=1), first)
    # load_state_dict and a plain in-place edit are followed too.
    model.load_state_dict(make_model(seed=9).state_dict())
    z = model((mel2, audio))[0]
    torch.testing.assert_close(model.reverse(mel2, z), audio, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.convinv[0].conv.weight.mul_(-1)
    z = model((mel2, audio))[0]
    torch.testing.assert_close(model.reverse(mel2, z), audio, rtol=1e-4, atol=1e-4)
    assert not any("inverse" in k for k in model.state_dict())


@pytest.mark.parametrize("overrides, message", [
    ({"n_group": 7}, "n_group must be even"),
    ({"n_group": 8, "n_early_size": 4, "n_early_every": 1}, "n_early_size=4 is too large"),
    ({"n_flows": 0}, "n_flows must be a positive integer"),
    ({"WN_config": {"n_layers": 2, "n_channels": 16, "kernel_size": 4}}, "kernel_size must be odd"),
    ({"WN_config": {"n_layers": 2, "n_channels": 16}}, "WN_config must have exactly the keys"),
    ({"n_group": 12}, "must divide the upsampler stride"),
])
def test_bad_configuration_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_model(**overrides)


def test_bad_inputs_are_clear_errors():
    model = make_model()
    mel, audio = batch()
    with pytest.raises(ValueError, match="not a multiple of n_group"):
        model((mel, audio[:, :2044]))
    with pytest.raises(ValueError, match="the mel must have at least"):
        model((mel[:, :, :2], audio))
    with pytest.raises(ValueError, match=r"mel must be \(batch, 80, frames\)"):
        model((mel[:, :40], audio))
    with pytest.raises(ValueError, match=r"mel must be \(batch, 80, frames\)"):
        model.infer(mel[0])


@pytest.mark.parametrize("kernel_size, dilation, batch_size", [(3, 4, 2), (3, 1, 1), (1, 1, 3), (5, 2, 2), (3, 64, 1)])
def test_cpu_bfloat16_matmul_convolution_matches_conv1d(kernel_size, dilation, batch_size):
    """The bf16 CPU layers run as matrix products with a hand-written backward: check both directions, also with
    a dilation past the sequence's length (the outer taps see only zero padding)."""
    import torch.nn.functional as F
    padding = (kernel_size * dilation - dilation) // 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 16, 40, generator=generator, requires_grad=True)
    weight = torch.randn(24, 16, kernel_size, generator=generator, requires_grad=True)
    bias = torch.randn(24, generator=generator, requires_grad=True)
    grad_out = torch.randn(batch_size, 24, 40, generator=generator)
    y = glow_fast._conv1d_as_matmul(x, weight, bias, padding, dilation)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_out)
    y_ref = F.conv1d(x, weight, bias, padding=padding, dilation=dilation)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), grad_out)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_bfloat16_training_gradients_match_float32():
    model = make_model()
    mel, audio = batch()
    WaveGlowLoss()(model((mel, audio))).backward()
    grads32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = WaveGlowLoss()(model((mel, audio)))
    loss.backward()
    for (name, p), g32 in zip(model.named_parameters(), grads32, strict=True):
        error = ((p.grad - g32).norm() / g32.norm()).item()
        assert error < 0.1, f"{name}: bf16 gradient off by {error:.3f}"


def test_bfloat16_weight_cache_follows_weight_changes_and_is_not_saved():
    model = remove_weightnorm(make_model()).eval()
    other = make_model(seed=4).state_dict()
    mel = torch.randn(1, 80, 8)
    # Weights change between autocast regions: torch's own autocast cache lives as long as one region.
    def bf16_infer():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.infer(mel, sigma=0.5, seed=1)
    first, again = bf16_infer(), bf16_infer()
    changed = []
    for layer in (model.WN[0].in_layers[0], model.WN[1].cond_layer, model.WN[2].res_skip_layers[1], model.WN[3].start,
                  model.WN[0].end):
        with torch.no_grad():
            layer.weight.mul_(3.0)
        changed.append(bf16_infer())
    model.load_state_dict(other)
    reloaded = bf16_infer()
    assert torch.equal(first, again)
    for before, after in zip([first] + changed, changed + [reloaded], strict=True):
        assert not torch.equal(before, after)
    fresh = remove_weightnorm(make_model(seed=9)).eval()
    fresh.load_state_dict(other)  # the same weights by the same route, never cached before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(reloaded, fresh.infer(mel, sigma=0.5, seed=1))
    assert not any("bfloat16" in name or "cache" in name for name in model.state_dict())
    # float32 and bfloat16 inference keep a cache each: alternating them must not rebuild either
    bf16_matrices = glow_fast._wn_inference_matrices(model.WN[0], torch.bfloat16)
    model.infer(mel, sigma=0.5, seed=1)
    assert glow_fast._wn_inference_matrices(model.WN[0], torch.bfloat16) is bf16_matrices


@pytest.mark.parametrize("onednn", [False, True])
def test_cpu_inference_folds_biases_and_sums_in_place(monkeypatch, onednn):
    """Folded CPU inference (bf16, then float32) takes WN's in-place path (conditioning and dilated convolution
    as one product, the gate through sigmoids alone, the end layer folded into the skip matrices, biases moved,
    products accumulating into the residual stream and the output as views of one tensor): it must compute what
    the layer-by-layer forward does, for a batch, without touching its inputs. Where cpu_matmul takes oneDNN
    (forced here, on any CPU) float32 takes the time-major rearranged WN instead, to the same accuracy."""
    monkeypatch.setattr(cpu_matmul, "uses_onednn", lambda: onednn)
    model = remove_weightnorm(make_model(WN_config={"n_layers": 3, "n_channels": 16, "kernel_size": 5})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # zero-initialised or small in a fresh model; make every fold count
                parameter.normal_(0, 0.3)
    calls = []
    in_place = glow_fast.folded_wn_inference
    monkeypatch.setattr(glow_fast, "folded_wn_inference", lambda *args: calls.append(1) or in_place(*args))
    generator = torch.Generator().manual_seed(2)
    audio, spect = torch.randn(3, 4, 50, generator=generator), torch.randn(3, 640, 50, generator=generator)
    inputs = (audio.clone(), spect.clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = model.WN[0](inputs)
        assert calls, "folded bf16 inference did not take the in-place path"
        with torch.enable_grad():  # the training path: layer by layer
            reference = model.WN[0](inputs)
    assert torch.equal(inputs[0], audio) and torch.equal(inputs[1], spect)
    assert fast.dtype == reference.dtype == torch.bfloat16
    assert ((fast.float() - reference.float()).norm() / reference.float().norm()).item() < 2e-2
    calls.clear()
    with torch.no_grad():  # float32 takes the same path, to float32 accuracy
        fast = model.WN[0](inputs)
    assert bool(calls) is not onednn, "folded float32 inference took the other path"
    with monkeypatch.context() as plain:
        plain.setattr(glow_fast, "uses_rearranged_wn", lambda wn, spect: False)
        reference = model.WN[0](inputs)  # with gradients: the layer-by-layer forward
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    mel, z = torch.randn(3, 80, 6, generator=generator), torch.randn(3, 8, 6 * 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        audio_bf16 = model.reverse(mel, z)
    audio_fp32 = model.reverse(mel, z)
    assert ((audio_bf16 - audio_fp32).norm() / audio_fp32.norm()).item() < 2e-2


def test_compiled_coupling_networks_compute_the_same_flow():
    """compile_coupling_networks (train.py --compile, inference.py --compile): same numbers both ways, with
    gradients, and the state dict keeps its names so checkpoints are interchangeable."""
    from glow import compile_coupling_networks
    model = make_model()
    compiled = compile_coupling_networks(copy.deepcopy(model))
    assert list(compiled.state_dict()) == list(model.state_dict())
    mel, audio = batch()
    z, log_s, _ = model((mel, audio))
    z_compiled, log_s_compiled, _ = compiled((mel, audio))
    assert torch.allclose(z_compiled, z, atol=1e-5) and torch.allclose(log_s_compiled[-1], log_s[-1], atol=1e-5)
    (z_compiled.square().sum() - sum(s.sum() for s in log_s_compiled)).backward()
    (z.square().sum() - sum(s.sum() for s in log_s)).backward()
    for (name, p), p_compiled in zip(model.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(p_compiled.grad, p.grad, rtol=1e-4, atol=1e-5), name
    assert (compiled.reverse(mel, z_compiled) - audio).abs().max() < 1e-5


def frame_test_model(n_channels=16):
    """A folded model whose every bias and the upsampler's count, with the baseline on the same weights."""
    wn_config = {"n_layers": 3, "n_channels": n_channels, "kernel_size": 3}
    model = make_model(WN_config=wn_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.3)
    baseline = BaselineWaveGlow(**{**TINY_WAVEGLOW, "WN_config": wn_config})
    baseline.load_upstream_state_dict(model.state_dict())
    return remove_weightnorm(model).eval(), baseline


@pytest.mark.parametrize("n_frames, n_samples", [(7, 7 * 256), (5, 5 * 256 - 64), (6, 6 * 256 + 512)])
def test_float32_cpu_inference_on_mel_frames_equals_the_plain_math(monkeypatch, n_frames, n_samples):
    """Float32 CPU inference with the cond layer composed with the upsampler per mel frame (glow_fast's frame
    conditioning, time-major WN): the plain float32 model's audio to float32 accuracy, for a batch, for z shorter
    than the mel and reaching into the upsampler's tail."""
    model, baseline = frame_test_model()
    size = glow_fast.prepare_frame_conditioning(model)
    assert size == 4 * 3 * (4 * 80 + 1) * 32 * 2 * 16 * 4  # flows x layers x (4 frames + 1) x phases x 2C floats
    calls = []
    frame_path = glow_fast.frame_conditioned_wn_inference
    monkeypatch.setattr(glow_fast, "frame_conditioned_wn_inference", lambda *args: calls.append(1) or frame_path(*args))
    generator = torch.Generator().manual_seed(3)
    mel, z = torch.randn(2, 80, n_frames, generator=generator), torch.randn(2, 8, n_samples // 8, generator=generator)
    audio = model.reverse(mel, z)
    assert len(calls) == 4, "float32 CPU inference did not take the frame-conditioned path"
    torch.testing.assert_close(audio, baseline.reverse(mel, z), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 keeps the grouped mel and its own path
        audio_bf16 = model.reverse(mel, z)
    assert len(calls) == 4 and ((audio_bf16 - audio).norm() / audio.norm()).item() < 2e-2


@pytest.mark.parametrize("onednn", [False, True])
def test_float32_cpu_inference_on_mel_frames_with_wide_layers_by_either_library(monkeypatch, onednn):
    """The frame-conditioned inference of a 64-channel WN, its products by torch's or by oneDNN's (forced here, on
    any CPU; there the taps of each dilated layer are stacked, in blocks of rows that do not divide the clip): the
    plain float32 model's audio to float32 accuracy."""
    monkeypatch.setattr(cpu_matmul, "uses_onednn", lambda: onednn)
    monkeypatch.setattr(glow_fast, "TAP_BLOCK_ROWS", 100)
    calls = []
    onednn_plus = cpu_matmul._onednn_plus
    monkeypatch.setattr(cpu_matmul, "_onednn_plus", lambda *args: calls.append(1) or onednn_plus(*args))
    model, baseline = frame_test_model(n_channels=64)
    glow_fast.prepare_frame_conditioning(model)
    generator = torch.Generator().manual_seed(4)
    mel, z = torch.randn(1, 80, 5, generator=generator), torch.randn(1, 8, 5 * 256 // 8, generator=generator)
    torch.testing.assert_close(model.reverse(mel, z), baseline.reverse(mel, z), rtol=1e-5, atol=1e-5)
    assert bool(calls) is onednn


def test_frame_conditioning_is_taken_once_it_has_paid_for_itself():
    """Without prepare_frame_conditioning a model builds the frame matrices only once it has synthesised as many
    groups as building them costs (~20,500 groups, 7.4 s at 22 kHz), counted afresh after any weight change;
    short clips alone never pay for them."""
    model, _ = frame_test_model()
    with torch.no_grad():
        assert not isinstance(glow_fast.reverse_conditioning(model, torch.randn(1, 80, 4), 1024), glow_fast.MelFrames)
        assert not glow_fast._frame_matrices_pay(model, 10_000)
        assert not glow_fast._frame_matrices_pay(model, 10_000)
        assert glow_fast._frame_matrices_pay(model, 1_000)
        assert glow_fast._frame_matrices_pay(model, 10)  # built: now every call takes them
        model.WN[1].in_layers[0].weight.mul_(2)
        assert not glow_fast._frame_matrices_pay(model, 10)  # new weights: count again
        assert isinstance(glow_fast.reverse_conditioning(model, torch.randn(1, 80, 700), 700 * 256), glow_fast.MelFrames)
    assert not isinstance(glow_fast.reverse_conditioning(model, torch.randn(1, 80, 4), 1024), glow_fast.MelFrames)


def test_a_copy_of_a_model_with_frame_matrices_builds_its_own_and_synthesises_the_same():
    """The cached inference matrices (oneDNN's packed ones cannot be copied) stay with their model: a deepcopy or
    a pickle starts without them, builds its own, and gives the same audio."""
    import pickle
    model, _ = frame_test_model()
    assert glow_fast.prepare_frame_conditioning(model) > 0 and glow_fast.frame_conditioning_built(model)
    mel = torch.randn(1, 80, 9)
    audio = model.infer(mel, sigma=0.6, seed=3)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not glow_fast.frame_conditioning_built(twin)
        glow_fast.prepare_frame_conditioning(twin)
        torch.testing.assert_close(twin.infer(mel, sigma=0.6, seed=3), audio, rtol=0, atol=1e-6)
