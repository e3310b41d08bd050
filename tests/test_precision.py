"""Precision by what the CPU has: bfloat16 only with bfloat16 units, float32 otherwise, each choice said once.

Every test fakes the CPU (the probes distributed.py and glow_fast.py read), so the suite means the same on an
AVX2 machine and on one with AVX512-BF16 or AMX.
"""
import builtins
import io

import pytest
import torch

import distributed
import glow_fast

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, mkldnn_bf16, capability="AVX2", flags="fpu sse2 avx2 fma", machine="x86_64"):
    """Make both probes see a CPU of this kind: oneDNN's answer, torch's capability name, /proc/cpuinfo's flags
    (None: unreadable) and the architecture."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(glow_fast.platform, "machine", lambda: machine)  # the platform module both probes read
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path) != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if flags is None:
            raise OSError("no /proc/cpuinfo here")
        return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")

    monkeypatch.setattr("builtins.open", fake_open)
    glow_fast.cpu_has_bf16_units.cache_clear()  # the probe is cached: ask again


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    glow_fast.cpu_has_bf16_units.cache_clear()
    yield
    glow_fast.cpu_has_bf16_units.cache_clear()  # the next test sees this machine's own answer again


KINDS = [  # (what the probes see, bfloat16 units?)
    (dict(mkldnn_bf16=False), False),  # AVX2: oneDNN has no bf16 at all
    (dict(mkldnn_bf16=True, capability="AVX512", flags="avx2 avx512f avx512bw avx512vl"), False),  # emulated only
    (dict(mkldnn_bf16=True, capability="AVX512", flags="avx2 avx512f avx512_bf16"), True),  # Cooper Lake, Zen 4
    (dict(mkldnn_bf16=True, capability="AVX512", flags="avx512f avx512_bf16 amx_bf16 amx_tile"), True),  # AMX
    (dict(mkldnn_bf16=True, capability="AMX", flags=None), True),  # a build that names the units itself
    (dict(mkldnn_bf16=True, capability="AVX512", flags=None), False),  # cannot tell: float32, never emulated
    (dict(mkldnn_bf16=True, capability="DEFAULT", flags="fp asimd bf16", machine="aarch64"), True),  # ARM BF16
]


@pytest.mark.parametrize("probes, native", KINDS)
def test_both_probes_agree_on_which_cpus_have_bfloat16_units(monkeypatch, probes, native):
    fake_cpu(monkeypatch, **probes)
    assert distributed.cpu_supports_bf16() is native
    assert glow_fast.cpu_has_bf16_units() is native
    capability = distributed.cpu_capability()
    assert capability["bf16"] is native and capability["isa"] == probes.get("capability", "AVX2")
    assert capability["threads"] == torch.get_num_threads()


def test_without_bfloat16_units_mixed_precision_runs_float32_and_says_so(monkeypatch):
    fake_cpu(monkeypatch, mkldnn_bf16=False)
    for preferred in ("auto", "float16"):  # fp16_run / --is_fp16; float16 is no CPU autocast type
        dtype, note = distributed.autocast_dtype(CPU, True, preferred)
        assert dtype is None
        assert "AVX2" in note and "no bfloat16 units" in note and "float32" in note and "\n" not in note
    dtype, note = distributed.autocast_dtype(CPU, True, "bfloat16")  # an explicit choice is honoured, loudly
    assert dtype == torch.bfloat16 and note.startswith("warning:") and "20-60x slower than float32" in note
    assert distributed.autocast_dtype(CPU, False, "bfloat16") == (None, "")
    precision = distributed.make_precision(CPU, {"fp16_run": True, "amp_dtype": "auto", "amp_backend": "native"})
    assert precision.describe() == "float32" and "running float32" in precision.note
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_with_bfloat16_units_mixed_precision_runs_bfloat16(monkeypatch):
    fake_cpu(monkeypatch, mkldnn_bf16=True, capability="AVX512", flags="avx512f avx512_bf16")
    dtype, note = distributed.autocast_dtype(CPU, True)
    assert dtype == torch.bfloat16 and "bfloat16 units" in note
    assert distributed.autocast_dtype(CPU, True, "bfloat16") == (torch.bfloat16, "")
    assert distributed.autocast_dtype(CPU, True, "float16")[0] == torch.bfloat16
    precision = distributed.make_precision(CPU, {"fp16_run": True, "amp_dtype": "auto", "amp_backend": "native"})
    assert precision.describe() == "torch.bfloat16" and not precision.scaler.is_enabled()


def test_the_models_bfloat16_matrix_routes_follow_the_units(monkeypatch):
    """glow_fast runs bf16 convolutions as matrix products only on CPUs with bf16 units (measured faster there);
    without them torch's own convolution keeps autocast's semantics. Both give the bf16 convolution."""
    x = torch.randn(2, 16, 40)
    conv = torch.nn.Conv1d(16, 24, 3, padding=2, dilation=2)
    outputs = {}
    for native in (False, True):
        fake_cpu(monkeypatch, mkldnn_bf16=native, capability="AVX512", flags="avx512f avx512_bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert glow_fast._matmul_dtype(x) == (torch.bfloat16 if native else None)
            outputs[native] = glow_fast.conv1d(x, conv.weight, conv.bias, 2, 2)
        assert glow_fast._matmul_dtype(x) is None  # float32 is never touched by the bf16 rule
    assert outputs[False].dtype == outputs[True].dtype == torch.bfloat16
    reference = conv(x)
    for output in outputs.values():
        assert ((output.float() - reference).norm() / reference.norm()).item() < 1e-2


@pytest.mark.parametrize("native", [False, True])
def test_a_compiled_wn_under_cpu_bfloat16_autocast_is_one_graph(monkeypatch, native):
    """The units' answer is a constant to torch.compile: traced, the probe broke the graph at every layer, so a
    compiled WN ran as many small graphs with eager code between them."""
    import torch._dynamo

    from glow import WN
    fake_cpu(monkeypatch, mkldnn_bf16=native, capability="AVX512", flags="avx512f avx512_bf16")
    torch.manual_seed(0)
    wn = WN(2, 16, n_layers=3, n_channels=8, kernel_size=3)

    def forward(audio, spect):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return wn((audio, spect))

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(torch.randn(1, 2, 20), torch.randn(1, 16, 20))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_inference_is_fp16_line_on_a_cpu_without_bfloat16_units(monkeypatch, capsys):
    """inference.py --is_fp16 prints the one precision line before it does anything else."""
    import inference
    fake_cpu(monkeypatch, mkldnn_bf16=False)
    assert inference.main(["-f", "missing_list.txt", "-w", "missing_checkpoint", "-o", "out", "--is_fp16",
                           "--device", "cpu"]) != 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "bfloat16" in line]
    assert len(lines) == 1 and "running float32" in lines[0]
