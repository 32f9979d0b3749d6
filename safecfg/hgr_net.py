"""The learned Harmful Guidance Redirector (HGR): a small convolutional encoder-decoder on
latent-channel tensors that predicts a correction to the CFG direction.

``R(g) = g + Delta``, ``Delta = -sigma * net(-g / sigma, log sigma [, D_u])``: the network sees the
noise-space direction, whose scale does not depend on sigma, and its zero-initialised output layer
makes an untrained HGR exactly the identity. It runs at any latent size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .redirect import Redirection, Redirector, hed, inference_grad, sanitize, sigma_per_sample


@dataclass
class HGRConfig:
    """Architecture of an HGR network. Stored as JSON in every HGR file."""

    latent_channels: int = 4
    width: int = 64
    mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    blocks: int = 1
    use_uncond: bool = True
    embed_dim: int = 128
    groups: int = 8

    # Limits that keep a hostile file from asking for an unbounded allocation.
    LIMITS = {"latent_channels": (1, 128), "width": (8, 512), "blocks": (1, 8), "embed_dim": (8, 1024),
              "groups": (1, 64)}

    def validate(self) -> HGRConfig:
        for name, (lo, hi) in self.LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"'{name}' must be an integer in [{lo}, {hi}], got {v!r}")
        if (not isinstance(self.mults, list) or not 1 <= len(self.mults) <= 5
                or not all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 8 for m in self.mults)):
            raise ValueError(f"'mults' must be a list of 1-5 integers in [1, 8], got {self.mults!r}")
        if not isinstance(self.use_uncond, bool):
            raise ValueError(f"'use_uncond' must be true or false, got {self.use_uncond!r}")
        for m in self.mults:
            if (self.width * m) % self.groups:
                raise ValueError(f"width*mult ({self.width * m}) must be divisible by groups ({self.groups})")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HGRConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the architecture must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**data).validate()


def sigma_embedding(log_sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of log sigma, ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=log_sigma.device, dtype=torch.float32) * (-math.log(1000.0) / half))
    ang = log_sigma.float()[:, None] * freqs[None] * 4.0
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class FiLMResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, embed_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class HGRNet(nn.Module):
    """U-shaped conv net with FiLM sigma conditioning. Input ``(B, C or 2C, H, W)``, output ``(B, C, H, W)``."""

    def __init__(self, config: HGRConfig):
        super().__init__()
        config.validate()
        self.config = config
        c, w, E, G = config.latent_channels, config.width, config.embed_dim, config.groups
        cin = 2 * c if config.use_uncond else c
        self.embed = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E))
        self.conv_in = nn.Conv2d(cin, w, 3, padding=1)
        chans = [w * m for m in config.mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = w
        for i, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(config.blocks):
                blocks.append(FiLMResBlock(prev, ch, E, G))
                prev = ch
            self.down.append(blocks)
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < len(chans) - 1 else nn.Identity())
        self.mid = FiLMResBlock(prev, prev, E, G)
        self.up = nn.ModuleList()
        for ch in reversed(chans):
            blocks = nn.ModuleList()
            for j in range(config.blocks):
                blocks.append(FiLMResBlock(prev + (ch if j == 0 else 0), ch, E, G))
                prev = ch
            self.up.append(blocks)
        self.norm_out = nn.GroupNorm(min(G, prev), prev)
        self.conv_out = nn.Conv2d(prev, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        emb = self.embed(sigma_embedding(log_sigma, self.config.embed_dim))
        h = self.conv_in(x)
        skips = []
        for blocks, ds in zip(self.down, self.downsample):
            for b in blocks:
                h = b(h, emb)
            skips.append(h)
            h = ds(h)
        h = self.mid(h, emb)
        for blocks in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)
            for b in blocks:
                h = b(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_params(config: HGRConfig) -> int:
    """Parameter count of an architecture, computed without allocating it (on the meta device)."""
    with torch.device("meta"):
        net = HGRNet(config)
    return sum(p.numel() for p in net.parameters())


class LearnedHGR(Redirector):
    """The learned redirector around an :class:`HGRNet`."""

    kind = "learned"

    def __init__(self, net: HGRNet, *, latent_format: str = "", categories: list[str] | None = None,
                 name: str = "HGR", latent_frames: int = 0):
        self.net = net.eval()
        self.config = net.config
        self.latent_format = latent_format
        #: the latent frames of the video clips it was trained on (0: images); it acts frame by frame on
        #: any clip length
        self.latent_frames = int(latent_frames)
        self.categories = list(categories or [])
        self.name = name
        self.names = [name]
        self.detect_threshold: float | None = None  # calibrated detection threshold (file metadata)
        self.detect_levels: int | None = None  # the noise levels it was calibrated at (file metadata)

    def _frames(self, g: torch.Tensor, sigma, uncond: torch.Tensor | None) -> torch.Tensor:
        """``delta`` on a 5-D latent ``(B, C, T, H, W)``, frame by frame: frames folded into the batch
        (each at its sample's sigma), unfolded after."""
        b, c, t, h, w = g.shape

        def fold(x):
            return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

        s = sigma_per_sample(sigma, b, g).flatten().repeat_interleave(t)
        d = self.delta(fold(g), s, None if uncond is None else fold(uncond))
        return d.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)

    def delta(self, g: torch.Tensor, sigma: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """The correction ``Delta`` in x0 space (float32), differentiable for training."""
        b = g.shape[0]
        s = sigma_per_sample(sigma, b, g).clamp_min(1e-4)
        x = -g.float() / s
        if self.config.use_uncond:
            if uncond is None:
                raise ValueError("this HGR was trained with the uncond prediction as input; none was given")
            x = torch.cat([x, uncond.float()], dim=1)
        out = self.net(x, s.flatten().log())
        return -s * out

    def redirect(self, g, sigma, *, uncond=None, concept_preds=None, state=None) -> Redirection:
        if g.ndim not in (4, 5) or g.shape[1] != self.config.latent_channels:
            raise ValueError(f"{self.name}: expects {self.config.latent_channels}-channel latents (B, C, H, W) or "
                             f"video latents (B, C, T, H, W), got shape {tuple(g.shape)}")
        p = next(self.net.parameters())
        if p.device != g.device:
            self.net.to(g.device)
        with inference_grad(g, uncond):
            if g.ndim == 5:  # video (or Qwen-Image's one-frame) latents: each latent frame as an image
                g_red = (g.float() + self._frames(g, sigma, uncond)).to(g.dtype)
            else:
                g_red = (g.float() + self.delta(g, sigma, uncond)).to(g.dtype)
        g_red = sanitize(g, g_red, self.name)
        return Redirection(g_red, hed(g, g_red))
