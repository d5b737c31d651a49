"""RoPE frequencies: the plain schedule and the three scalings the supported families use.

    inv_freq_i = 1 / theta^(2i / d)            i = 0 .. d/2 - 1, d = the rotated part of a head

    linear   (Gemma 3's global layers):  inv_freq / factor, every wavelength stretched alike
    llama3   (Llama 3.1):                long wavelengths / factor, short ones kept, a blend between
    longrope (Phi-3 "su"):               inv_freq / short_factor_i, or / long_factor_i once a sequence
                                         passes original_max_position_embeddings; cos and sin are
                                         multiplied by sqrt(1 + ln(s) / ln(original max)),
                                         s = max_position_embeddings / original max
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SCALINGS = ("linear", "llama3", "longrope")


def plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """(dim/2,) fp32: 1 / theta^(2i/dim), computed as transformers does (int64 arange, then float)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 stretches long wavelengths by `factor`, keeps short ones, and blends in between, so
    the model reaches 128k tokens without retraining the high-frequency dimensions."""
    factor = s["factor"]
    low_freq_factor = s.get("low_freq_factor", 1.0)
    high_freq_factor = s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def longrope_attention_factor(s: dict[str, Any], max_position_embeddings: int) -> float:
    """The factor on cos and sin: sqrt(1 + ln(scale) / ln(original max)), 1 when not stretched."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position_embeddings / old_len
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))


def scaled_inv_freq(theta: float, dim: int, scaling: dict[str, Any] | None, long: bool = False) -> torch.Tensor:
    """(dim/2,) inverse frequencies with `scaling` applied; `long` picks longrope's long factors."""
    inv_freq = plain_inv_freq(theta, dim)
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    if kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        if len(factors) != dim // 2:
            raise ValueError(f"rope scaling: {len(factors)} longrope factors, expected rotary dim / 2 = {dim // 2}")
        return inv_freq / torch.tensor(factors, dtype=torch.float32)
    raise ValueError(f"rope scaling type {kind!r} is not supported; expected one of {SCALINGS}")


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each (x_i, x_{i+hs/2}) pair of q and k by an angle proportional to the position.

    local: the sliding layers' own base (Gemma 3). With longrope (Phi-3) the long factors take over
    once a position passes the original context, and cos, sin are scaled by its attention factor.
    """

    def __init__(self, config: "LlamaConfig", local: bool = False):  # noqa: F821
        super().__init__()
        self.config, self.local = config, local
        self.reset_inv_freq()

    def reset_inv_freq(self, device=None) -> None:
        """(Re)compute the frequency buffers, e.g. after the model was built on the meta device."""
        c, s = self.config, self.config.rope_scaling
        self.longrope = bool(s) and s["rope_type"] == "longrope" and not self.local
        self.attention_factor = longrope_attention_factor(s, c.max_position_embeddings) if self.longrope else 1.0
        self.register_buffer("inv_freq", c.rope_inv_freq(self.local).to(device), persistent=False)
        long = c.rope_inv_freq(long=True).to(device) if self.longrope else None
        self.register_buffer("inv_freq_long", long, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) positions -> cos, sin of shape (B, 1, T, rotary_dim), broadcast over heads
        inv_freq = self.inv_freq
        if self.longrope and int(position_ids.max()) + 1 > self.config.rope_scaling["original_max_position_embeddings"]:
            inv_freq = self.inv_freq_long
        freqs = position_ids[:, :, None].float() * inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]
