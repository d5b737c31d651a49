"""LlamaConfig: the shape of a Llama-family decoder, read from an HF `config.json` or GGUF metadata.

One dataclass covers every supported `model_type` (llama, mistral, qwen2, qwen3, gemma2,
gemma3_text, phi3): each family's difference is a field here, read from config.json in one place
(`model/families.py`), so there is one decoder and no copies of it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from .families import (GGUF_ARCHITECTURES, KEYS as FAMILY_KEYS, SLIDING, SUPPORTED_MODEL_TYPES, family_fields,
                       family_hf, gguf_family_fields)
from .rope import scaled_inv_freq


def _malformed_as_value_error(read):
    """A reader of metadata whose values have the wrong type (a list for a size, a zero head count)
    raises ValueError naming the source, like every other malformed input, not TypeError."""

    @functools.wraps(read)
    def wrapper(cls, fields, source: str = "model.gguf"):
        try:
            return read(cls, fields, source)
        except (TypeError, ZeroDivisionError, OverflowError) as e:
            raise ValueError(f"{source}: malformed metadata ({type(e).__name__}: {e})") from e

    return wrapper


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None          # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False               # qwen2: True; llama `attention_bias`: True on q, k, v and o
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for to_hf()
    # GGUF's `rope_freqs` tensor: llama.cpp's spelling of Llama-3.1's scaling, one divisor per frequency
    rope_freq_factors: list[float] | None = field(default=None, repr=False)
    # ---- family switches (model/families.py says which family sets which)
    hidden_act: str = "silu"             # "gelu_pytorch_tanh": Gemma's GeGLU
    norm_offset: float = 0.0             # RMSNorm scales by (offset + w): Gemma stores w around 0
    qk_norm: bool = False                # RMSNorm on each head's q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False          # norms after attention and MLP too (Gemma)
    embed_scale: float = 1.0             # embeddings × this (Gemma: √hidden)
    query_pre_attn_scalar: float | None = None   # scores × this^-½ instead of head_dim^-½ (Gemma)
    attn_logit_softcapping: float | None = None  # scores -> cap · tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None # logits -> cap · tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None    # a query sees the last `sliding_window` keys, itself included
    layer_types: list[str] | None = None # per layer "sliding_attention" / "full_attention"; None: all alike
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    partial_rotary_factor: float = 1.0   # RoPE on the first fraction of each head (Phi-4-mini: 0.75)
    fused_projections: bool = False      # Phi-3: qkv_proj and gate_up_proj instead of q/k/v, gate/up

    def __post_init__(self) -> None:
        # a malformed config.json or GGUF header must fail here, by name, not deep inside the model
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings") + (("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    def uses_local_rope(self, layer: int) -> bool:
        """Whether layer `layer` takes the local RoPE base (Gemma 3's sliding layers)."""
        return self.rope_local_theta is not None and self.layer_types is not None and self.layer_types[layer] == SLIDING

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (all but with a partial rotary factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from the dict of an HF `config.json`.

        RoPE is read in any of its three spellings: `rope_theta` alone (classic), `rope_theta` plus
        `rope_scaling` (Llama-3.1's own file), or transformers 5's `rope_parameters` dict.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")

        known = set(required) | FAMILY_KEYS | {
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "mlp_bias", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "architectures",
        }
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in ("gemma2", "gemma3_text"))),
            mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
            **family_fields(d, model_type, source),
        )

    def to_hf(self) -> dict[str, Any]:
        """The dict of an HF `config.json` that transformers and vLLM load as a plain model."""
        if self.rope_freq_factors is not None:
            raise ValueError("this model's RoPE scaling comes as GGUF per-frequency factors (rope_freqs), which "
                             "config.json cannot state; export from the HF checkpoint instead")
        d = dict(self.extra)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            mlp_bias=self.mlp_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            **family_hf(self),
        )
        return d

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    @_malformed_as_value_error
    def from_gguf(cls, fields: dict[str, Any], source: str = "model.gguf") -> "LlamaConfig":
        """Build from GGUF metadata already read into plain Python values ({key: value}).

        llama.cpp writes `general.architecture` (e.g. "llama") and then `<arch>.embedding_length`,
        `<arch>.block_count`, ... for the shape.
        """
        arch = fields.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; "
                             f"expected one of {tuple(GGUF_ARCHITECTURES)}")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{source}: GGUF metadata lacks '{arch}.{key}'")
            return value

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // n_heads))
        vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)),
            tie_word_embeddings=not fields.get("_has_output_tensor", False),
            model_type=GGUF_ARCHITECTURES[arch],
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
            rope_freq_factors=fields.get("_rope_freqs"),
            **gguf_family_fields(fields, arch, head_dim, source),
        )

    # ------------------------------------------------------------------ RoPE
    def rope_inv_freq(self, local: bool = False, long: bool = False) -> "torch.Tensor":  # noqa: F821
        """Inverse frequencies of RoPE, (rotary_dim/2,), with the configured scaling (model/rope.py).

        local: of the sliding layers where they have their own base (Gemma 3); long: longrope's long
        factors (Phi-3, past the original context).
        """
        import torch

        if local and self.rope_local_theta is not None:
            return scaled_inv_freq(self.rope_local_theta, self.rotary_dim, None)
        inv_freq = scaled_inv_freq(self.rope_theta, self.rotary_dim, self.rope_scaling, long)
        if self.rope_freq_factors is not None:
            if len(self.rope_freq_factors) != self.rotary_dim // 2:
                raise ValueError(f"tensor 'rope_freqs.weight' has {len(self.rope_freq_factors)} values, "
                                 f"expected head_dim/2 = {self.rotary_dim // 2}")
            return inv_freq / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        return inv_freq
