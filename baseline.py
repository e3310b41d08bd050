"""BaselineWaveGlow: a faithful plain re-statement of upstream NVIDIA/waveglow's float32 model.

The same math as glow.py written the straightforward way (torch's own weight norm on plain Conv1d layers,
the gate as separate ops, slices and reshapes, torch.inverse), with none of glow.py's fast paths. It is the
yardstick twice over: bench.py times it beside our model on the same weights, and the tests check that
glow.py computes the same numbers. It loads an upstream-named state dict (load_upstream_state_dict).
"""
import torch
import torch.nn.functional as F
from torch import nn


class BaselineWaveGlow(nn.Module):
    """The same WaveGlow math written the plain way, in float32: the yardstick for our speed-ups."""

    def __init__(self, n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config, *, hop_length=256):
        super().__init__()
        weight_norm = torch.nn.utils.parametrizations.weight_norm
        C, L, k = WN_config["n_channels"], WN_config["n_layers"], WN_config["kernel_size"]
        self.n_group, self.n_early_every, self.n_early_size, self.C, self.L = n_group, n_early_every, n_early_size, C, L
        self.hop_length = hop_length
        self.upsample = nn.ConvTranspose1d(n_mel_channels, n_mel_channels, 4 * hop_length, stride=hop_length)
        self.WN, self.convinv = nn.ModuleList(), nn.ModuleList()
        remaining = n_group
        for flow in range(n_flows):
            if flow % n_early_every == 0 and flow > 0:
                remaining -= n_early_size
            half = remaining // 2
            block = nn.Module()
            block.start = weight_norm(nn.Conv1d(half, C, 1))
            block.end = nn.Conv1d(C, 2 * (remaining - half), 1)
            block.cond_layer = weight_norm(nn.Conv1d(n_mel_channels * n_group, 2 * C * L, 1))
            block.in_layers = nn.ModuleList(weight_norm(
                nn.Conv1d(C, 2 * C, k, dilation=2 ** i, padding=(k * 2 ** i - 2 ** i) // 2)) for i in range(L))
            block.res_skip_layers = nn.ModuleList(weight_norm(nn.Conv1d(C, 2 * C if i < L - 1 else C, 1))
                                                  for i in range(L))
            self.WN.append(block)
            inv = nn.Module()
            inv.conv = nn.Conv1d(remaining, remaining, 1, bias=False)
            self.convinv.append(inv)

    def load_upstream_state_dict(self, state_dict):
        renamed = {}
        for name, value in state_dict.items():
            name = name.replace(".weight_g", ".parametrizations.weight.original0")
            renamed[name.replace(".weight_v", ".parametrizations.weight.original1")] = value
        self.load_state_dict(renamed)

    def coupling(self, block, x_a, mel):
        h = block.start(x_a)
        cond = block.cond_layer(mel)
        skip = 0
        for i in range(self.L):
            act = block.in_layers[i](h) + cond[:, 2 * self.C * i:2 * self.C * (i + 1)]
            act = torch.tanh(act[:, :self.C]) * torch.sigmoid(act[:, self.C:])
            res_skip = block.res_skip_layers[i](act)
            if i < self.L - 1:
                h = h + res_skip[:, :self.C]
                skip = skip + res_skip[:, self.C:]
            else:
                skip = skip + res_skip
        return block.end(skip)

    def group_mel(self, mel, n_samples):
        B, g = mel.size(0), self.n_group
        mel = self.upsample(mel)[:, :, :n_samples]
        return mel.reshape(B, mel.size(1), n_samples // g, g).permute(0, 1, 3, 2).reshape(B, -1, n_samples // g)

    def forward(self, inputs):
        mel, audio = inputs
        B, T = audio.shape
        mel = self.group_mel(mel, T)
        x = audio.reshape(B, T // self.n_group, self.n_group).transpose(1, 2)
        outputs, log_s_list, log_det_list = [], [], []
        for flow, (block, inv) in enumerate(zip(self.WN, self.convinv, strict=True)):
            if flow % self.n_early_every == 0 and flow > 0:
                outputs.append(x[:, :self.n_early_size])
                x = x[:, self.n_early_size:]
            x = inv.conv(x)
            log_det_list.append(B * (T // self.n_group) * torch.logdet(inv.conv.weight.squeeze(2)))
            half = x.size(1) // 2
            out = self.coupling(block, x[:, :half], mel)
            n_rest = x.size(1) - half
            x = torch.cat([x[:, :half], torch.exp(out[:, n_rest:]) * x[:, half:] + out[:, :n_rest]], 1)
            log_s_list.append(out[:, n_rest:])
        outputs.append(x)
        return torch.cat(outputs, 1), log_s_list, log_det_list

    @torch.no_grad()
    def reverse(self, mel, z):
        n_samples = z.size(1) * z.size(2)
        mel = self.group_mel(mel, n_samples)
        n_exits = (len(self.WN) - 1) // self.n_early_every
        early_end = self.n_early_size * n_exits
        x = z[:, early_end:]
        for flow in reversed(range(len(self.WN))):
            half = x.size(1) // 2
            out = self.coupling(self.WN[flow], x[:, :half], mel)
            n_rest = x.size(1) - half
            x = torch.cat([x[:, :half], (x[:, half:] - out[:, :n_rest]) / torch.exp(out[:, n_rest:])], 1)
            x = F.conv1d(x, torch.inverse(self.convinv[flow].conv.weight.squeeze(2)).unsqueeze(2))
            if flow % self.n_early_every == 0 and flow > 0:
                early_end -= self.n_early_size
                x = torch.cat([z[:, early_end:early_end + self.n_early_size], x], 1)
        return x.permute(0, 2, 1).reshape(x.size(0), -1)
