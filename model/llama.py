"""A Llama-family decoder in plain PyTorch.

Module names equal the Hugging Face checkpoints' (`model.layers.0.self_attn.q_proj`), so a
checkpoint's tensors, a PEFT adapter's keys and our `state_dict()` map one to one.

    tokens ─ embed_tokens ─┬─ [ x + attn(RMSNorm(x)) ; x + mlp(RMSNorm(x)) ] × L ─ norm ─ lm_head ─ logits
                           └─ RoPE cos/sin from the positions, shared by every layer

Shapes: B batch, T tokens, D hidden, nh query heads, nkv key/value heads, hs head size.

Other families switch parts of it on through LlamaConfig (see model/families.py): q/k norms,
norms after attention and MLP, GeGLU, soft-caps, sliding windows, fused projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SoftCappedHead, attend, attention_mask_4d, default_positions, packed_documents
from .backward import apply_rope_qk, rms_norm, rotate_half, swiglu
from .config import LlamaConfig
from .generate import KVCache, generate
from .offload import offload_layer_input
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · (offset + weight), in the dtypes transformers uses for each family.

    offset is 0 (Llama) or 1 (Gemma, whose stored weights are centred on 0). In fp32 always: x cast
    up, squared and averaged, r = (mean(x²) + eps)^(-1/2), and x · r. Then Llama rounds x · r back
    to x's dtype and multiplies it by the weight in the dtypes of the two (bf16 · bf16 in bf16 for a
    bf16 model, not fp32); Gemma adds 1 to the weight and multiplies in fp32, then rounds.
    Llama's form runs through `model.backward.RMSNormFunction` (its backward pass by hand, the same
    forward ops); Gemma's takes the plain autograd line below.
    """

    handwritten_backward = True  # the backward pass of `model.backward.RMSNormFunction`; False: autograd's

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    @property
    def effective_weight(self) -> torch.Tensor:
        """offset + weight (dim,): fp32 when there is an offset, since 1 + w in bf16 would round w away."""
        return self.weight.float() + self.offset if self.offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handwritten_backward and not self.offset:  # Gemma's fp32 (1 + w) keeps the plain line
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.effective_weight
        # Llama rounds x back before scaling, Gemma scales in fp32 first: each as its reference does
        return (w * x).to(dtype) if self.offset else w * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.shape[-1] < x.shape[-1]:  # partial rotary: the rest of each head passes unrotated
        rot, rest = x.split((cos.shape[-1], x.shape[-1] - cos.shape[-1]), dim=-1)
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention: nkv key/value heads, each shared by nh/nkv query heads."""

    handwritten_backward = True  # RoPE through `model.backward.RoPEFunction`; False: autograd's

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        if config.fused_projections:  # Phi-3: one (nh + 2 nkv)·hs x D matrix, HF's name and shape
            self.qkv_proj = nn.Linear(D, (self.nh + 2 * self.nkv) * self.hs, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(D, self.nh * self.hs, bias=config.qkv_bias)
            self.k_proj = nn.Linear(D, self.nkv * self.hs, bias=config.qkv_bias)
            self.v_proj = nn.Linear(D, self.nkv * self.hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hs, D, bias=config.o_bias)
        if config.qk_norm:  # Qwen3, Gemma 3: each head's q and k normalised before RoPE
            self.q_norm = RMSNorm(self.hs, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(self.hs, config.rms_norm_eps, config.norm_offset)
        self.qk_norm = config.qk_norm
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.softcap = config.attn_logit_softcapping

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
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.handwritten_backward and cos.shape[-1] == self.hs:  # partial rotary takes the plain line
            q, k = apply_rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)                         # (B, nkv, S, hs), S = cache_start + T
        y = attend(q, k, v, mask, self.scale, self.softcap)                # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of one input x (B, T, D): one place that an adapter package may
        replace with a fused projection of all three. Phi-3's fused weight is split here."""
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(x).split((self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs), dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (Gemma) with the tanh GELU in place of silu."""

    handwritten_backward = True  # SwiGLU through `model.backward.SwiGLUFunction`; False: autograd's

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, H = config.hidden_size, config.intermediate_size
        if config.fused_projections:  # Phi-3: gate and up stacked in one 2H x D matrix
            self.gate_up_proj = nn.Linear(D, 2 * H, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(D, H, bias=config.mlp_bias)
            self.up_proj = nn.Linear(D, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, D, bias=config.mlp_bias)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.project_gate_up(x)                                     # (B, T, H) each
        if self.act == "gelu_pytorch_tanh":  # GeGLU: autograd's backward
            h = F.gelu(g, approximate="tanh") * u
        else:  # silu: the hand-written SwiGLU, or autograd's
            h = swiglu(g, u) if self.handwritten_backward else F.silu(g) * u   # (B, T, H)
        return self.down_proj(h)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up projections of one input x (B, T, D); an adapter package may fuse them."""
        if hasattr(self, "gate_up_proj"):
            return self.gate_up_proj(x).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Gemma's sandwich adds a norm on each branch's output;
    its names are HF's: post_attention_layernorm then normalises the attention output, and
    pre_/post_feedforward_layernorm wrap the MLP."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(config)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config)
        self.sandwich = config.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                                                 cache_start))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the head: token ids -> final normalised hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.rotary_emb = RotaryEmbedding(config)
        self.rotary_emb_local = RotaryEmbedding(config, local=True) if config.rope_local_theta is not None else None
        self.config = config
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
        c = self.config
        x = self.embed_tokens(input_ids)                                     # (B, T, D)
        if c.embed_scale != 1.0:  # Gemma: × √D, rounded to the embedding's dtype first as HF does
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        documents = None  # packed rows: a position id of 0 starts a document no later token attends across
        if position_ids is None:
            position_ids = default_positions(attention_mask, B, T, cache_start, x.device)
        elif (documents := packed_documents(position_ids)) is not None and cache is not None:
            raise ValueError("position_ids restart at 0 inside a row (packed documents), which a KV cache does not "
                             "follow: generate from one document per row")
        rope = self.rotary_emb(position_ids, x.dtype)                        # cos, sin: (B, 1, T, hs)
        local_rope = self.rotary_emb_local(position_ids, x.dtype) if self.rotary_emb_local is not None else rope
        if documents is not None and attention_mask is None:  # packed rows: each document alone, no T x T mask
            full_mask, window_mask = documents, documents.windowed(c.sliding_window)
        else:
            ids = documents.ids(x.device) if documents is not None else None
            full_mask = attention_mask_4d(attention_mask, T, cache_start, x.device, documents=ids)
            window_mask = attention_mask_4d(attention_mask, T, cache_start, x.device, c.sliding_window, ids)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            cos, sin = local_rope if c.uses_local_rope(i) else rope
            mask = window_mask if c.is_sliding(i) else full_mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                with offload_layer_input(x, enabled=self.gradient_checkpointing == "offload"):
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache, cache_start)
        return self.norm(x)


class Llama(nn.Module):
    """Decoder plus the language-model head: (B, T) token ids -> (B, T, vocab) logits.

    position_ids (B, T), optional: RoPE's positions, and packed documents: a position id of 0 after
    a row's first column starts a new document that no later token attends across (transformers'
    padding-free convention; model/attention.py), so each example of a packed row gets the logits
    it would get alone. None, or a plain arange: the fused causal path.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if config.final_logit_softcapping:  # Gemma 2: the cap travels with the head
            self.lm_head = SoftCappedHead(config.hidden_size, config.vocab_size, config.final_logit_softcapping)
        else:
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
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
