"""Bias-spectrum denoiser: removes the faint constant hiss a WaveGlow adds to everything it says.

The model's output for a silent (all-zero) mel at sigma 0 is its bias; its magnitude spectrum is
subtracted, scaled by `strength`, from every frame of the audio to clean, keeping the audio's phase.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Denoiser(nn.Module):
    def __init__(self, waveglow, filter_length=1024, n_overlap=4, win_length=1024, mode="zeros"):
        super().__init__()
        self.filter_length = filter_length
        self.hop_length = filter_length // n_overlap
        self.win_length = win_length
        # A model without PyTorch weights (export.OnnxWaveGlow runs a graph in onnxruntime) takes float32 CPU mels.
        reference = next(waveglow.parameters(), torch.zeros(()))
        shape = (1, waveglow.n_mel_channels, 88)  # 88 frames: about a second, as upstream
        if mode == "zeros":
            mel = torch.zeros(shape, dtype=reference.dtype, device=reference.device)
        elif mode == "normal":
            mel = torch.randn(shape, dtype=reference.dtype, device=reference.device)
        else:
            raise ValueError(f"denoiser mode must be 'zeros' or 'normal', got {mode!r}")
        self.register_buffer("window", torch.hann_window(win_length, periodic=True, device=reference.device),
                             persistent=False)
        with torch.no_grad():
            bias_audio = waveglow.infer(mel, sigma=0.0).float()  # (1, 256 * 88)
            bias_spectrum = self._stft(bias_audio).abs()  # (1, n_freq, frames)
        # the first frame: the model's steady bias, before anything of the (silent) content could vary
        self.register_buffer("bias_spectrum", bias_spectrum[:, :, :1], persistent=False)  # (1, n_freq, 1)

    def _stft(self, audio):
        return torch.stft(audio, self.filter_length, self.hop_length, self.win_length, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)

    @torch.no_grad()
    def forward(self, audio, strength=0.1):
        """audio (T,) or (B, T) in [-1, 1] -> the same shape and dtype, with the bias spectrum removed."""
        if audio.dim() not in (1, 2):
            raise ValueError(f"the denoiser takes audio of shape (samples,) or (batch, samples), "
                             f"got {tuple(audio.shape)}")
        batch = audio.reshape(-1, audio.size(-1)).float()
        n_samples = batch.size(1)
        shortest = self.filter_length // 2 + 1  # reflect padding needs more samples than half a window
        if n_samples < shortest:
            batch = F.pad(batch, (0, shortest - n_samples))
        spectrum = self._stft(batch.to(self.window.device))
        magnitude = torch.clamp(spectrum.abs() - strength * self.bias_spectrum, min=0.0)
        cleaned = torch.polar(magnitude, torch.angle(spectrum))  # keep the phase
        out = torch.istft(cleaned, self.filter_length, self.hop_length, self.win_length, window=self.window,
                          center=True, length=batch.size(1))
        return out[:, :n_samples].reshape(audio.shape).to(audio.device, audio.dtype)
