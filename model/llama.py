"""A Llama-family decoder in plain PyTorch.

Module names equal the Hugging Face checkpoints' (`model.layers.0.self_attn.q_proj`), so a
checkpoint's tensors, a PEFT adapter's keys and our `state_dict()` map one to one.

    tokens ─ embed_tokens ─┬─ [ x + attn(RMSNorm(x)) ; x + mlp(RMSNorm(x)) ] × L ─ norm ─ lm_head ─ logits
                           └─ RoPE cos/sin from the positions, shared by every layer

Shapes: B batch, T tokens, D hidden, nh query heads, nkv key/value heads, hs head size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backward import apply_rope_qk, rms_norm, rotate_half, swiglu
from .config import LlamaConfig
from .offload import offload_layer_input


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in fp32 as the reference does."""

    handwritten_backward = True  # the backward pass of `model.backward.RMSNormFunction`; False: autograd's

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handwritten_backward:
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each (x_i, x_{i+hs/2}) pair of q and k by an angle proportional to the position."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", config.rope_inv_freq(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) positions -> cos, sin of shape (B, 1, T, hs), broadcast over heads
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, preallocated to `max_len` positions.

    k, v: (B, nkv, max_len, hs). `update` writes the new positions and returns the filled prefix.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, config: LlamaConfig, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: nkv key/value heads, each shared by nh/nkv query heads."""

    handwritten_backward = True  # RoPE through `model.backward.RoPEFunction`; False: autograd's

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.nh * self.hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.nkv * self.hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.nkv * self.hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hs, D, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)                                      # (B, T, nh·hs), (B, T, nkv·hs) × 2
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)                 # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)                # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)                # (B, nkv, T, hs)
        if self.handwritten_backward:
            q, k = apply_rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)                         # (B, nkv, S, hs), S = cache_start + T
        # SDPA shares each key/value head with its group of query heads itself (enable_gqa), without
        # copying k and v nh/nkv times. CUDA's fused kernels do so only without a mask; with one the
        # copies are made there, or SDPA would fall back to its slow math kernel.
        gqa = self.nkv != self.nh
        if gqa and mask is not None and x.device.type != "cpu":
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)            # (B, nh, S, hs)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
            gqa = False
        if mask is None:  # no padding, no cache: the fused causal path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of one input x (B, T, D): one place that an adapter package may
        replace with a fused projection of all three."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    handwritten_backward = True  # SwiGLU through `model.backward.SwiGLUFunction`; False: autograd's

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, H = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, H, bias=config.mlp_bias)
        self.up_proj = nn.Linear(D, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, D, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.project_gate_up(x)                                     # (B, T, H) each
        # silu: the hand-written SwiGLU, or autograd's; another activation takes its own plain line
        h = swiglu(g, u) if self.handwritten_backward else F.silu(g) * u  # (B, T, H)
        return self.down_proj(h)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up projections of one input x (B, T, D); an adapter package may fuse them."""
        return self.gate_proj(x), self.up_proj(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the head: token ids -> final normalised hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # True: recompute each layer in the backward pass to save memory; "offload": also keep each
        # layer's input in host memory until then (see `Llama.set_gradient_checkpointing`)
        self.gradient_checkpointing: bool | str = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)                                     # (B, T, D)
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, T, cache_start, x.device)
        cos, sin = self.rotary_emb(position_ids, x.dtype)                    # (B, 1, T, hs)
        mask = attention_mask_4d(attention_mask, T, cache_start, x.device)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                with offload_layer_input(x, enabled=self.gradient_checkpointing == "offload"):
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache, cache_start)
        return self.norm(x)


def default_positions(attention_mask, B: int, T: int, start: int, device) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so left padding does not shift RoPE."""
    if attention_mask is None:
        return torch.arange(start, start + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1                               # (B, S)
    return pos.clamp(min=0)[:, -T:]


def attention_mask_4d(attention_mask, T: int, start: int, device) -> torch.Tensor | None:
    """(B, S) 1 = token, 0 = padding  ->  boolean (B, 1, T, S), True where a query may look.

    Each query sees the keys at or before its own position that are not padding. A padding query
    would see nothing at all (and SDPA would return NaN), so it is allowed to see itself: its output
    is never used, but it stays finite.
    """
    if attention_mask is None and start == 0:
        return None
    S = start + T
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]                                   # (1, 1, T, S)
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :S]                      # (B, 1, 1, S)
        allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
    return allowed


class Llama(nn.Module):
    """Decoder plus the language-model head: (B, T) token ids -> (B, T, vocab) logits."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache, cache_start))

    def tie_weights(self) -> None:
        """Point the head at the embedding again (after the embedding was replaced, e.g. by loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_gradient_checkpointing(self, enabled: bool | str = True) -> None:
        """Activation checkpointing: keep only each decoder layer's input and recompute the layer in
        the backward pass (dropout replays the same masks: the RNG state is restored first).

        True keeps the inputs on the device; "offload" copies each to host memory (pinned, without
        waiting, on CUDA) and back when its layer's backward pass needs it, so the device holds no
        activation of a layer between its forward and backward passes. False: keep everything.
        """
        if not (isinstance(enabled, bool) or enabled == "offload"):
            raise ValueError(f"set_gradient_checkpointing: expected False, True or 'offload', got {enabled!r}")
        self.model.gradient_checkpointing = enabled

    def set_handwritten_backward(self, enabled: bool = True) -> None:
        """Switch every module with a hand-written backward pass (norms, RoPE, SwiGLU, and any
        adapter that has one) to it, or with False to the plain autograd path. The forward
        passes give the same numbers either way; the plain path is the reference for the tests."""
        for m in self.modules():
            if hasattr(m, "handwritten_backward"):
                m.handwritten_backward = enabled

    def compile_layers(self, **compile_kwargs) -> None:
        """Compile each decoder layer with `torch.compile`, fusing its norms, RoPE, SwiGLU and
        residual adds into fewer passes over memory (about 15% less time per training step on a CPU).

        Call it after `apply_lora` (and quantization), since it compiles the modules present. All
        layers share one compiled graph; the first forward and backward pass pay for compiling it.
        """
        for layer in self.model.layers:
            layer.compile(**compile_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Continue (B, T) prompts by up to `max_new_tokens`; see `model.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
