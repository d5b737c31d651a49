"""LlamaConfig: the shape of a Llama-family decoder, read from an HF `config.json` or GGUF metadata.

One dataclass covers the three `model_type`s whose checkpoints share Llama's layout:
`llama` (Llama 2/3, SmolLM2), `mistral` (sliding window ignored: our contexts are short),
and `qwen2` (bias on q, k and v but not on o).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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

        rope_theta = d.get("rope_theta", 10000.0)
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        for key, value in (("rope_scaling", rope_scaling), ("rope_parameters", params)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{source}: {key} must be an object or null, got {value!r}")
        if params:  # transformers 5 folds the base and the scaling into one dict
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            rope_scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type == "default":
                rope_scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported; expected 'llama3'")
            else:  # one spelling of the key, whichever the file used ("type" is the older one)
                rope_scaling.pop("type", None)
                rope_scaling["rope_type"] = "llama3"

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))

        known = set(required) | {
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
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
            rope_theta=float(rope_theta) if isinstance(rope_theta, (int, float)) else rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The dict of an HF `config.json` that transformers and vLLM load as a plain model."""
        if self.rope_freq_factors is not None:
            raise ValueError("this model's RoPE scaling comes as GGUF per-frequency factors (rope_freqs), which "
                             "config.json cannot state; export from the HF checkpoint instead")
        d = dict(self.extra)
        d.update(
            architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
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
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            mlp_bias=self.mlp_bias,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
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
        if arch not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{source}: GGUF metadata lacks '{arch}.{key}'")
            return value

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(fields.get(f"{arch}.attention.key_length", hidden // n_heads)),
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_word_embeddings=not fields.get("_has_output_tensor", False),
            qkv_bias=arch == "qwen2",
            model_type=arch,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
            rope_freq_factors=fields.get("_rope_freqs"),
        )

    # ------------------------------------------------------------------ RoPE
    def rope_inv_freq(self) -> "torch.Tensor":  # noqa: F821
        """Inverse frequencies of RoPE, (head_dim/2,), with Llama-3's `llama3` scaling when configured.

        Llama 3.1 stretches long wavelengths by `factor`, keeps short ones, and blends in between, so
        the model reaches 128k tokens without retraining the high-frequency dimensions.
        """
        import torch

        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_freq_factors is not None:
            if len(self.rope_freq_factors) != dim // 2:
                raise ValueError(f"tensor 'rope_freqs.weight' has {len(self.rope_freq_factors)} values, "
                                 f"expected head_dim/2 = {dim // 2}")
            return inv_freq / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        s = self.rope_scaling
        if not s:
            return inv_freq
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


