"""The demo's network: a tiny conv + token-mixing denoiser for small images (the demo trains it on
1 x 8 x 8 digits; the image-diffusion example reuses it for other sizes)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _Block(nn.Module):
    """Residual block: GroupNorm -> SiLU -> 3x3 conv, a per-channel scale/shift from the noise
    embedding, SiLU -> 3x3 conv; then a global token-mixing MLP over the H*W positions.

    The token mixing gives every block a whole-image receptive field and absolute position (digits
    are centred, so position matters); with convolutions alone the samples had plausible strokes but
    less digit-like global shapes after 400 steps.
    """

    def __init__(self, ch: int, emb: int, positions: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm3 = nn.GroupNorm(8, ch)
        self.mix1 = nn.Linear(positions, positions)
        self.mix2 = nn.Linear(positions, positions)
        for layer in (self.conv2, self.mix2):  # each block starts as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.conv1(nn.functional.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.norm2(y) * (1 + scale) + shift
        h = h + self.conv2(nn.functional.silu(y))
        t = self.norm3(h).flatten(2)  # (B, C, H*W): mix across positions, shared over channels
        return h + self.mix2(nn.functional.silu(self.mix1(t))).reshape(h.shape)


class TinyDenoiser(nn.Module):
    """F_theta(c_in x, c_noise) for ``in_channels`` x ``size`` x ``size`` images: a small conv net at
    full resolution.

    A 3x3 conv stem, ``blocks`` residual blocks (convolutions plus global token mixing, see
    :class:`_Block`) and a 3x3 conv head, all at full resolution with ``channels`` channels; the noise level
    enters through random Fourier features of c_noise -> MLP -> a scale/shift in every block. The
    head is zero-initialised, so the untrained model outputs D = c_skip x. About 71k parameters at
    the defaults.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, blocks: int = 2, emb: int = 64, size: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.randn(emb // 2) * 4.0)
        self.emb = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(channels, emb, size * size) for _ in range(blocks))
        self.out_norm = nn.GroupNorm(8, channels)
        self.out = nn.Conv2d(channels, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        f = c_noise[:, None] * self.freqs[None, :] * (2 * math.pi)
        emb = self.emb(torch.cat([f.cos(), f.sin()], dim=1))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))
