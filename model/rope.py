"""RoPE frequencies: the plain schedule and the three scalings the supported families use.

    inv_freq_i = 1 / theta^(2i / d)            i = 0 .. d/2 - 1, d = the rotated part of a head

    linear   (Gemma 3's global layers):  inv_freq / factor, every wavelength stretched alike
    llama3   (Llama 3.1):                long wavelengths / factor, short ones kept, a blend between
    longrope (Phi-3 "su"):               inv_freq / short_factor_i, or / long_factor_i once a sequence
                                         passes original_max_position_embeddings; cos and sin are
                                         multiplied by sqrt(1 + ln(s) / ln(original max)),
                                         s = max_position_embeddings / original max
    yarn     (Qwen2.5 and Qwen3 past     inv_freq / factor for wavelengths longer than the original
              32k, as their cards say):  context / beta_slow rotations, kept for those shorter than
                                         original / beta_fast, a linear ramp between; cos and sin are
                                         multiplied by 0.1 ln(factor) + 1 (Peng et al. 2023)
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SCALINGS = ("linear", "llama3", "longrope", "yarn")


def denominators(theta: float, dim: int) -> torch.Tensor:
    """(dim/2,) fp32: theta^(2i/dim), the inverse frequencies' denominators, computed as transformers does
    (int64 arange, then float): each scaling divides by them where transformers does, to the same bits."""
    return theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """(dim/2,) fp32: 1 / theta^(2i/dim)."""
    return 1.0 / denominators(theta, dim)


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


def yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    """YaRN's blend of interpolated (inv_freq / factor) and extrapolated (inv_freq) frequencies: dimension i
    is interpolated fully below `low`, kept above `high`, where low and high are the dimensions that turn
    beta_fast and beta_slow times over the original context (rounded outwards unless truncate is False)."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times in old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    kept = 1 - ramp                      # the share extrapolated; each term rounded as transformers rounds it
    return 1.0 / (factor * denominators(theta, dim)) * (1 - kept) + inv_freq * kept


def rope_attention_factor(s: dict[str, Any] | None, max_position_embeddings: int) -> float:
    """The factor on cos and sin: longrope's or YaRN's, 1.0 for the other scalings."""
    if not s or s["rope_type"] not in ("longrope", "yarn"):
        return 1.0
    if s["rope_type"] == "longrope":
        return longrope_attention_factor(s, max_position_embeddings)
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    mscale = lambda m: 1.0 if s["factor"] <= 1 else 0.1 * m * math.log(s["factor"]) + 1.0  # noqa: E731
    return mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) if s.get("mscale") and s.get("mscale_all_dim") else mscale(1)


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
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * denominators(theta, dim))  # rounded as transformers
    if kind == "yarn":
        return yarn_inv_freq(inv_freq, dim, theta, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported; expected one of {SCALINGS}")


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each (x_i, x_{i+hs/2}) pair of q and k by an angle proportional to the position.

    local: the sliding layers' own base (Gemma 3). With longrope (Phi-3) the long factors take over
    once a position passes the original context; longrope and YaRN scale cos, sin by their attention factor.
    """

    def __init__(self, config: "LlamaConfig", local: bool = False):  # noqa: F821
        super().__init__()
        self.config, self.local = config, local
        self.reset_inv_freq()

    def reset_inv_freq(self, device=None) -> None:
        """(Re)compute the frequency buffers, e.g. after the model was built on the meta device."""
        c, s = self.config, self.config.rope_scaling
        self.longrope = bool(s) and s["rope_type"] == "longrope" and not self.local
        self.attention_factor = rope_attention_factor(s, c.max_position_embeddings) if not self.local else 1.0
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
