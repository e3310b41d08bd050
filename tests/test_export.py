"""export.py: a checkpoint to an ONNX graph with dynamic batch and length, its parity with PyTorch, and
inference.py --onnx giving the audio of the PyTorch path. One export (the slow part) serves the whole module."""
import contextlib
import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from conftest import REPO, TINY_WAVEGLOW, perturb_end_layers
import export
import inference
from checkpoint import load_model, save_checkpoint
from glow import WaveGlow

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install onnxscript)")
MIN_SNR_DB = 60.0


def run_main(main, argv):
    """(exit code, stdout, stderr) of a command-line main run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, graph path, export.py's output) of a tiny model whose every layer acts."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = perturb_end_layers(WaveGlow(**{**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}), 0.05)
    with torch.no_grad():  # weight norm's g away from ||v||, so folding it matters
        for name, parameter in model.named_parameters():
            if name.endswith("weight_g"):
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
    with open(REPO / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config["waveglow_config"] = {**TINY_WAVEGLOW, "WN_config": dict(TINY_WAVEGLOW["WN_config"])}
    checkpoint = folder / "waveglow_100"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config, "iteration": 100,
                                 "format": "waveglow-pytorch", "format_version": 1})
    graph = folder / "tiny.onnx"
    code, out, err = run_main(export.main, ["-w", str(checkpoint), "-o", str(graph), "--parity_frames", "3", "10", "33"])
    assert code == 0, err
    return checkpoint, graph, out


def test_export_reports_inputs_opset_and_parity(exported):
    _, graph, out = exported
    assert graph.is_file() and not graph.with_name(graph.name + ".partial").exists()
    assert re.search(r"opset \d+", out)
    assert re.search(r"mel: tensor\(float\) \['batch', 80, 'frames'\]", out)
    assert re.search(r"z: tensor\(float\) \['batch', 8, '32\*frames'\]", out)
    assert re.search(r"audio: tensor\(float\) \['batch', '256\*frames'\]", out)
    parity = re.search(r"Parity.*: 3 frames (\S+) dB, 10 frames (\S+) dB, 33 frames (\S+) dB; z = 0 .*: (\S+) dB", out)
    assert parity, out
    assert all(float(value) >= MIN_SNR_DB for value in parity.groups())


@pytest.mark.parametrize("batch, frames", [(1, 7), (3, 24)])
def test_graph_matches_pytorch_at_any_batch_and_length(exported, batch, frames):
    checkpoint, graph_path, _ = exported
    model, _ = load_model(checkpoint)
    graph = export.OnnxWaveGlow(str(graph_path))
    generator = torch.Generator().manual_seed(frames)
    mel = torch.randn(batch, 80, frames, generator=generator) - 5.0
    z = 0.6 * torch.randn(batch, 8, 32 * frames, generator=generator)
    reference = model.reverse(mel, z)
    audio = graph.reverse(mel, z)
    assert audio.shape == (batch, 256 * frames) and audio.dtype == torch.float32
    assert export.snr_db(reference, audio) >= MIN_SNR_DB
    assert (audio - reference).abs().max() < 1e-3 * reference.abs().max()
    # z = 0 is the sigma-0 audio, the denoiser's bias
    silent = graph.reverse(mel, torch.zeros_like(z))
    assert silent.abs().max() > 0
    assert export.snr_db(model.infer(mel, sigma=0.0), silent) >= MIN_SNR_DB


def test_inference_onnx_round_trip_gives_the_pytorch_audio(exported, tmp_path):
    checkpoint, graph, _ = exported
    names = []
    for i, frames in enumerate((9, 70)):  # 70 frames with --max_frames 30: in crossfaded chunks
        torch.save(torch.randn(80, frames, generator=torch.Generator().manual_seed(i)) - 5.0, tmp_path / f"m{i}.pt")
        names.append(f"m{i}.pt")
    filelist = tmp_path / "mels.txt"
    filelist.write_text("".join(f"{tmp_path / name}\n" for name in names))
    common = ["-f", str(filelist), "-s", "0.6", "--seed", "5", "-d", "0.05", "--max_frames", "30",
              "--chunk_overlap", "4"]
    code, _, err = run_main(inference.main, common + ["-w", str(checkpoint), "-o", str(tmp_path / "torch")])
    assert code == 0, err
    code, out, err = run_main(inference.main, common + ["--onnx", str(graph), "-o", str(tmp_path / "onnx")])
    assert code == 0, err
    assert "ONNX of waveglow-pytorch, iteration 100" in out
    for name in ("m0_synthesis.wav", "m1_synthesis.wav"):
        _, reference = wavfile.read(tmp_path / "torch" / name)
        _, audio = wavfile.read(tmp_path / "onnx" / name)
        assert audio.dtype == np.int16 and audio.shape == reference.shape and np.abs(reference).max() > 1000
        assert export.snr_db(torch.from_numpy(reference), torch.from_numpy(audio)) >= MIN_SNR_DB


def test_missing_or_invalid_checkpoint_is_named(tmp_path):
    missing = tmp_path / "waveglow_missing"
    code, _, err = run_main(export.main, ["-w", str(missing), "-o", str(tmp_path / "m.onnx")])
    assert code == 1 and str(missing) in err and "Traceback" not in err
    junk = tmp_path / "junk.pt"
    torch.save({"weights": [1, 2, 3]}, junk)
    code, _, err = run_main(export.main, ["-w", str(junk), "-o", str(tmp_path / "m.onnx")])
    assert code == 1 and "not a WaveGlow checkpoint" in err
    assert not (tmp_path / "m.onnx").exists()


def test_inference_onnx_names_a_missing_or_unreadable_graph(tmp_path, monkeypatch):
    filelist = tmp_path / "mels.txt"
    filelist.write_text("m.pt\n")
    code, _, err = run_main(inference.main, ["-f", str(filelist), "--onnx", str(tmp_path / "no.onnx"), "-o", str(tmp_path)])
    assert code == 1 and "no.onnx: ONNX file not found" in err
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    code, _, err = run_main(inference.main, ["-f", str(filelist), "--onnx", str(tmp_path / "bad.onnx"), "-o", str(tmp_path)])
    assert code == 1 and "bad.onnx: onnxruntime cannot load it" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    code, _, err = run_main(inference.main, ["-f", str(filelist), "--onnx", str(tmp_path / "bad.onnx"), "-o", str(tmp_path)])
    assert code == 1 and "needs the 'onnxruntime' package" in err and "pip install onnxruntime" in err


def test_inference_takes_one_model_and_onnx_only_float32_cpu_synthesis(tmp_path):
    for argv in (["-f", "x.txt", "-o", str(tmp_path)],
                 ["-f", "x.txt", "-o", str(tmp_path), "-w", "ckpt", "--onnx", "m.onnx"],
                 ["-f", "x.txt", "-o", str(tmp_path), "--onnx", "m.onnx", "--is_fp16"],
                 ["--eval_list", "x.txt", "-o", str(tmp_path), "--onnx", "m.onnx"]):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
            inference.parse_args(argv)
        assert exit_info.value.code == 2
