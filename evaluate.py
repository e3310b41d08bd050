"""Evaluation shared by training and inference: validation negative log-likelihood, copy-synthesis mel L1
and spectrogram plots."""
import contextlib

import torch

from glow import WaveGlowLoss


@torch.no_grad()
def validation_nll(model, loader, sigma, device, amp_dtype=None):
    """Mean WaveGlow loss (NLL per sample, upstream's constant left out) over every batch of `loader`.

    Deterministic when the loader is (fixed crops or whole clips, no shuffling). Returns a float.
    """
    criterion = WaveGlowLoss(sigma)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for mel, audio in loader:
        mel, audio = mel.to(device), audio.to(device)
        cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with cast:
            loss = criterion(model((mel, audio)))
        total += loss.double() * audio.numel()
        count += audio.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("validation list produced no audio: check the validation file list")
    return (total / count).item()


# ---- copy synthesis: wav -> mel -> WaveGlow -> wav, scored by how well the output's mel matches ----

def mel_l1(reference_mel, output_mel):
    """Mean absolute difference of two log mels (n_mel, F) over their common frames; lower is better."""
    frames = min(reference_mel.size(-1), output_mel.size(-1))
    difference = reference_mel[..., :frames].double() - output_mel[..., :frames].double().to(reference_mel.device)
    return difference.abs().mean().item()


def copy_synthesis_score(stft, reference_audio, output_audio):
    """(mel L1, reference mel, output mel) for 1-D audio in [-1, 1]; `stft` is a mel2samp.TacotronSTFT.

    The output is cut to the reference's length first (WaveGlow returns whole hops), so both mels have
    the same frames and the score measures the vocoder alone.
    """
    reference_audio = reference_audio.reshape(-1).float().cpu()
    output_audio = output_audio.reshape(-1).float().cpu()[:reference_audio.numel()]
    reference_mel = stft.mel_spectrogram(reference_audio.unsqueeze(0))[0]
    output_mel = stft.mel_spectrogram(output_audio.unsqueeze(0))[0]
    return mel_l1(reference_mel, output_mel), reference_mel, output_mel


def plot_mel_comparison(reference_mel, output_mel, path, title=""):
    """A PNG with the input and the re-analysed output log mel one above the other, on one colour scale."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    reference_mel, output_mel = reference_mel.float().cpu().numpy(), output_mel.float().cpu().numpy()
    low, high = min(reference_mel.min(), output_mel.min()), max(reference_mel.max(), output_mel.max())
    figure, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for axis, mel, label in ((axes[0], reference_mel, "input"), (axes[1], output_mel, "WaveGlow output")):
        image = axis.imshow(mel, aspect="auto", origin="lower", interpolation="none", vmin=low, vmax=high)
        axis.set_ylabel(f"{label}\nmel channel")
    axes[1].set_xlabel("frame")
    figure.colorbar(image, ax=axes, label="log mel")
    if title:
        axes[0].set_title(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
