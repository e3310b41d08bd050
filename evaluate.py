"""Evaluation: validation negative log-likelihood, shared by training and inference."""
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
