"""The CUDA path: the model, mixed precision, the launchers and inference on a GPU, checked against the CPU.
Skipped where torch sees no CUDA GPU (the rest of the suite covers the same code on the CPU)."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, perturb_end_layers
from glow import WaveGlow, WaveGlowLoss, remove_weightnorm
from test_launchers import NETWORK, check_training_summary, run_launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, and torch sees none")


def working_model(config, seed=0):
    """A WaveGlow whose zero-initialised output layers got small random weights, so every coupling acts."""
    torch.manual_seed(seed)
    return perturb_end_layers(WaveGlow(**config), 0.02)


def batch(seed=0, n=2, samples=4096):
    generator = torch.Generator().manual_seed(seed)
    mel = torch.randn(n, 80, samples // 256 + 1, generator=generator) - 4
    audio = 0.3 * torch.randn(n, samples, generator=generator).clamp(-3, 3)
    return mel, audio


def relative_error(output, reference):
    return ((output.double().cpu() - reference.double()).norm() / reference.double().norm()).item()


def test_forward_and_reverse_on_the_gpu_match_the_cpu(tiny_waveglow_config):
    model = working_model(tiny_waveglow_config)
    mel, audio = batch()
    z, log_s, log_det = model((mel, audio))
    gpu = copy.deepcopy(model).cuda()
    z_gpu, log_s_gpu, log_det_gpu = gpu((mel.cuda(), audio.cuda()))
    # cuDNN may run float32 convolutions in TF32 (torch's default), hence 1e-3 rather than float32's 1e-6.
    assert relative_error(z_gpu, z) < 1e-3
    assert all(relative_error(a, b) < 1e-3 for a, b in zip(log_s_gpu, log_s, strict=True))
    assert all(abs(a.item() - b.item()) < 1e-3 for a, b in zip(log_det_gpu, log_det, strict=True))
    # The inverse on the GPU recovers the audio from its own z.
    assert (gpu.reverse(mel.cuda(), z_gpu).cpu() - audio).abs().max() < 1e-4
    folded = remove_weightnorm(copy.deepcopy(gpu))
    assert relative_error(folded.reverse(mel.cuda(), z_gpu), audio) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_the_gpu_keeps_the_flow_invertible(tiny_waveglow_config, dtype):
    model = working_model(tiny_waveglow_config).cuda()
    mel, audio = (t.cuda() for t in batch(1))
    criterion = WaveGlowLoss(1.0)
    reference_loss = criterion(model((mel, audio))).item()
    with torch.autocast("cuda", dtype=dtype):
        output = model((mel, audio))
        loss = criterion(output).item()
        reconstructed = model.reverse(mel, output[0])
    assert output[0].dtype == torch.float32 and reconstructed.dtype == torch.float32  # the audio path stays fp32
    assert abs(loss - reference_loss) < 2e-2 * abs(reference_loss)
    # bf16 rounds the coupling networks coarsely, so the small error of each inverted flow moves the next
    # flow's bf16 result by an ulp or so: 2e-3 rather than fp16's 1e-4.
    assert (reconstructed - audio).abs().max() < (1e-4 if dtype == torch.float16 else 2e-3)


def test_fp16_training_with_a_grad_scaler_learns(tiny_waveglow_config):
    model = WaveGlow(**tiny_waveglow_config).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    criterion = WaveGlowLoss(1.0)
    mel, audio = (t.cuda() for t in batch(2))
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = criterion(model((mel, audio)))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and scaler.get_scale() > 1
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_launchers_and_inference_on_the_gpu(launcher_workspace):
    root, corpus, config = launcher_workspace
    output_root, checkpoints = root / "out", root / "ckpt"
    done = run_launcher("train_full_8p.sh", f"--data_path={corpus}", f"--output_directory={checkpoints}",
                        f"--c={config}", "--batch-size=2", "--device=cuda", "--nproc=1", "--fp16_run=true",
                        "--epochs=1", "--n_test=2", "--workers=0", output_root=output_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (output_root / "0" / "train_0.log").read_text()
    assert "on cuda:0" in log and "torch.float16 with a GradScaler" in log
    check_training_summary(output_root, f"{NETWORK}_bs2_1p_acc", 1, 2, done.stdout, iterations=6)

    checkpoint = checkpoints / "waveglow_6"
    evaluated = run_launcher("train_eval_8p.sh", f"--data_path={corpus}", f"--pth_path={checkpoint}",
                             f"--output_directory={root / 'eval'}", "--device=cuda", "--n_test=2",
                             output_root=output_root)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]

    wav = corpus / "wavs" / "LJ001-0003.wav"
    (root / "list.txt").write_text(f"{wav}\n")
    outputs = {}
    for name, flags in (("fp32", []), ("fp16", ["--is_fp16"])):
        out_dir = root / f"synth_{name}"
        done = subprocess.run([sys.executable, str(REPO / "inference.py"), "-f", str(root / "list.txt"), "-w",
                               str(checkpoint), "-o", str(out_dir), "--device", "cuda", "--seed", "3", *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs[name], rate = sf.read(str(out_dir / "LJ001-0003_synthesis.wav"))
        assert rate == 22050 and np.isfinite(outputs[name]).all()
    original, _ = sf.read(str(wav))
    assert abs(len(outputs["fp32"]) - len(original)) < 256
    # Same weights and noise: fp16 synthesis is the float32 one up to rounding.
    noise = outputs["fp16"] - outputs["fp32"]
    assert 10 * np.log10(np.sum(outputs["fp32"] ** 2) / max(np.sum(noise ** 2), 1e-20)) > 20


def test_compiled_bfloat16_training_on_the_gpu(launcher_workspace):
    """train.py with compile and amp_dtype bfloat16 (no GradScaler), then an exact resume of the compiled run."""
    root, corpus, config = launcher_workspace
    files = root / "compiled_files.txt"
    files.write_text("".join(f"{wav}\n" for wav in sorted((corpus / "wavs").glob("*.wav"))))
    out = root / "compiled"
    common = [sys.executable, str(REPO / "train.py"), "-c", str(config), "--training_files", str(files),
              "--output_directory", str(out), "--device", "cuda", "--fp16_run", "true", "--amp_dtype", "bfloat16",
              "--compile", "true", "--batch_size", "2", "--workers", "0", "--iters_per_checkpoint", "2"]
    done = subprocess.run(common + ["--step_stop", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "precision torch.bfloat16" in done.stdout and "GradScaler" not in done.stdout
    losses = [float(line.split("loss:")[1].split("\t")[0]) for line in done.stdout.splitlines() if "\tloss:" in line]
    assert len(losses) == 4 and all(np.isfinite(losses))
    resumed = subprocess.run(common + ["--step_stop", "4", "--checkpoint_path", str(out / "waveglow_2"),
                                       "--output_directory", str(root / "compiled_resumed")],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    again = [float(line.split("loss:")[1].split("\t")[0]) for line in resumed.stdout.splitlines() if "\tloss:" in line]
    # cuDNN and the compiled kernels are not bit-reproducible run to run, so close rather than equal.
    assert np.allclose(again, losses[2:], rtol=1e-3, atol=1e-4)
