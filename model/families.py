"""Model families: each HF `model_type`'s config.json read as fields of the one LlamaConfig.

Every supported family is the same decoder with a few switches:

    family        what differs from Llama
    mistral       sliding-window attention on every layer
    qwen2         bias on q, k, v (not o); sliding window above `max_window_layers` when enabled
    qwen3         RMSNorm on each head's q and k before RoPE (q_norm, k_norm); explicit head_dim
    gemma2        norms scale by (1 + w); embeddings × √hidden; GeGLU (tanh GELU); norms before and
                  after attention and MLP; scores × query_pre_attn_scalar^-½; tanh soft-caps on the
                  attention scores and final logits; sliding window on every other layer
    gemma3_text   as gemma2 but q/k norms instead of the score soft-cap, five local (sliding) layers
                  per global one, local layers with their own RoPE base, RoPE scaling on global ones
    phi3          q, k, v in one `qkv_proj` and gate, up in one `gate_up_proj`; longrope ("su")
                  scaling; partial rotary (Phi-4-mini); sliding window on every layer when set

A key we cannot honour raises a ValueError naming it, rather than loading a model whose logits
would silently differ.
"""
from __future__ import annotations

from typing import Any

from .rope import SCALINGS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
GEMMA = ("gemma2", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"

# the keys read below; any other key is kept aside in LlamaConfig.extra and written back by to_hf
KEYS = {
    "hidden_act", "hidden_activation", "rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq",
    "partial_rotary_factor", "original_max_position_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "sliding_window_pattern", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention", "attention_bias",
}


def _scaling(s: dict[str, Any] | None, d: dict[str, Any], model_type: str, source: str) -> dict[str, Any] | None:
    """One spelling of a RoPE scaling dict: {"rope_type": ..., its parameters}, or None for plain RoPE."""
    if not s:
        return None
    s = dict(s)
    kind = s.pop("type", None)
    kind = s.get("rope_type", kind) or "default"
    if model_type == "phi3" and kind in ("su", "yarn"):  # Phi-3's older names of longrope
        kind = "longrope"
    s.pop("rope_theta", None)
    s.pop("partial_rotary_factor", None)
    if kind == "default":
        return None
    if kind not in SCALINGS:
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported; expected one of {SCALINGS}")
    s["rope_type"] = kind
    if kind == "longrope":
        s.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings") if s.get(k) is None]
        if missing:
            raise ValueError(f"{source}: longrope scaling lacks {missing}")
    if kind == "yarn":  # transformers' defaults: the context the model was trained on, and its ratio to the new one
        s["original_max_position_embeddings"] = (s.get("original_max_position_embeddings")
                                                 or d.get("original_max_position_embeddings") or d.get("max_position_embeddings"))
        if s.get("factor") is None:
            s["factor"] = d.get("max_position_embeddings", 2048) / s["original_max_position_embeddings"]
    return s


def _rope(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """rope_theta, rope_scaling, rope_local_theta and partial_rotary_factor from any of the spellings:
    `rope_theta` (+ `rope_scaling`), transformers 5's `rope_parameters`, and Gemma 3's per-layer-type
    `rope_parameters` {"full_attention": ..., "sliding_attention": ...} or `rope_local_base_freq`."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{source}: {key} must be an object or null, got {d[key]!r}")
    params = dict(d.get("rope_parameters") or {})
    gemma3 = model_type == "gemma3_text"
    default_theta = 1e6 if gemma3 else 10000.0
    partial = d.get("partial_rotary_factor", 1.0)
    local_theta = None
    if gemma3 and FULL in params:
        local = params.get(SLIDING) or {}
        if _scaling(local, d, model_type, source):
            raise ValueError(f"{source}: RoPE scaling on Gemma 3's sliding layers is not supported")
        local_theta = local.get("rope_theta", 10000.0)
        params = dict(params[FULL])
    elif gemma3:
        local_theta = d.get("rope_local_base_freq", 10000.0)
    if params:
        theta = params.get("rope_theta", d.get("rope_theta", default_theta))
        partial = params.get("partial_rotary_factor", partial)
        scaling = _scaling(params, d, model_type, source)
    else:
        theta = d.get("rope_theta", default_theta)
        scaling = _scaling(d.get("rope_scaling"), d, model_type, source)
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", partial), ("rope_local_base_freq", local_theta)):
        if (value is not None or name != "rope_local_base_freq") and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{source}: {name} must be a number, got {value!r}")
    return dict(rope_theta=float(theta), rope_scaling=scaling, partial_rotary_factor=float(partial),
                rope_local_theta=None if local_theta is None else float(local_theta))


def _layer_types(d: dict[str, Any], model_type: str, n_layers: int, source: str) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): which layers see only the last `sliding_window` keys."""
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    if model_type == "llama" or (window is None and model_type not in GEMMA):
        return None, None  # Gemma keeps its layer types without a window: Gemma 3's local layers own a RoPE base
    types = d.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
        elif model_type == "gemma3_text":
            pattern = d.get("sliding_window_pattern", 6)
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        elif model_type in ("qwen2", "qwen3"):
            start = d.get("max_window_layers", n_layers)
            types = [SLIDING if i >= start else FULL for i in range(n_layers)]
        else:  # mistral, phi3: every layer
            types = [SLIDING] * n_layers
    types = list(types)
    if len(types) != n_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"{source}: layer_types must list {n_layers} entries of {SLIDING!r} or {FULL!r}")
    return (None if window is None else int(window)), types


def family_fields(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The LlamaConfig fields (beyond the shape) that the config.json dict `d` of `model_type` sets."""
    act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if model_type in GEMMA else "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden activation {act!r} is not supported; expected one of {ACTIVATIONS}")
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=True (an encoder) is not supported")
    gemma = model_type in GEMMA
    window, types = _layer_types(d, model_type, d["num_hidden_layers"], source)
    bias = bool(d.get("attention_bias", False))
    fields = dict(
        hidden_act=act, sliding_window=window, layer_types=types, **_rope(d, model_type, source),
        qkv_bias=bias or model_type == "qwen2", o_bias=bias and model_type != "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        fused_projections=model_type == "phi3",
    )
    if gemma:
        fields.update(
            norm_offset=1.0, sandwich_norm=True, embed_scale=float(d["hidden_size"]) ** 0.5,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        )
    return fields


def family_hf(c) -> dict[str, Any]:
    """The config.json keys of a LlamaConfig's family fields, as transformers reads them back."""
    d: dict[str, Any] = {"architectures": [ARCHITECTURES[c.model_type]]}
    mt = c.model_type
    if mt in GEMMA:
        d.update(hidden_activation=c.hidden_act, query_pre_attn_scalar=c.query_pre_attn_scalar,
                 attn_logit_softcapping=c.attn_logit_softcapping, final_logit_softcapping=c.final_logit_softcapping)
    else:
        d["hidden_act"] = c.hidden_act
    if mt != "qwen2":  # qwen2's biases are fixed (q, k, v only), the others' follow attention_bias
        d["attention_bias"] = c.qkv_bias
    if mt == "gemma3_text":
        full = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
        d.update(rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_theta}},
                 rope_theta=c.rope_theta, rope_local_base_freq=c.rope_local_theta, rope_scaling=c.rope_scaling)
    else:
        d.update(rope_theta=c.rope_theta, rope_scaling=c.rope_scaling)
    if c.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = c.partial_rotary_factor
    if c.rope_scaling and c.rope_scaling["rope_type"] == "longrope":
        d["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    d["sliding_window"] = c.sliding_window
    if c.layer_types is not None and mt not in ("mistral", "phi3"):  # those two slide on every layer
        d["layer_types"] = c.layer_types
        if mt in ("qwen2", "qwen3"):
            d["use_sliding_window"] = c.sliding_window is not None
    return d


# ---------------------------------------------------------------------------- GGUF metadata
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}  # GGUF name -> model_type


def gguf_family_fields(fields: dict[str, Any], arch: str, head_dim: int, source: str) -> dict[str, Any]:
    """The family fields of a GGUF file's metadata, as llama.cpp's converter writes and its runtime reads them.

    llama.cpp keeps no `query_pre_attn_scalar` for Gemma: it scales scores by head_dim^-½, except for
    the 27B models (hidden / heads instead), and so do we. Gemma 3's local RoPE base and its five
    local layers per global one are fixed in llama.cpp unless the file says otherwise.
    """
    model_type = GGUF_ARCHITECTURES[arch]
    get = lambda key, default=None: fields.get(f"{arch}.{key}", default)  # noqa: E731
    n_layers, hidden, n_heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    biases = set(fields.get("_bias_tensors", ()))
    out: dict[str, Any] = dict(qkv_bias=arch == "qwen2" or bool(biases & {"attn_q", "attn_qkv"}),
                               o_bias="attn_output" in biases, mlp_bias=bool(biases & {"ffn_up", "ffn_down"}),
                               qk_norm=arch in ("qwen3", "gemma3"), fused_projections=arch == "phi3")
    window = get("attention.sliding_window") or None  # 0: none
    if arch == "phi3":
        rot = get("rope.dimension_count", head_dim)
        out["partial_rotary_factor"] = rot / head_dim
        if fields.get("_rope_factors_long") is not None:
            out["rope_scaling"] = {
                "rope_type": "longrope", "long_factor": fields["_rope_factors_long"],
                "short_factor": fields["_rope_factors_short"],
                "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
                "attention_factor": get("rope.scaling.attn_factor"),
            }
    if arch in ("mistral", "phi3") and window:
        out.update(sliding_window=int(window), layer_types=[SLIDING] * n_layers)
    if arch in ("gemma2", "gemma3"):
        pattern = get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
        if isinstance(pattern, list):  # per layer, True where the layer slides
            types = [SLIDING if p else FULL for p in pattern]
        else:
            types = [SLIDING if (i + 1) % int(pattern) else FULL for i in range(n_layers)]
        big = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))  # the 27B models
        out.update(
            hidden_act="gelu_pytorch_tanh", norm_offset=1.0, sandwich_norm=True, embed_scale=float(hidden) ** 0.5,
            query_pre_attn_scalar=hidden // n_heads if big else head_dim,
            attn_logit_softcapping=get("attn_logit_softcapping"), final_logit_softcapping=get("final_logit_softcapping"),
            sliding_window=None if window is None else int(window), layer_types=types,
        )
    if arch == "gemma3":
        out["rope_local_theta"] = float(get("rope.freq_base_swa", 10000.0))
    kind = get("rope.scaling.type")  # Phi-3's longrope and Llama 3.1's scaling come as tensors instead
    if kind not in (None, "none", "linear") and not (arch == "phi3" and kind == "longrope"):
        raise ValueError(f"{source}: GGUF RoPE scaling {kind!r} is not supported; expected 'linear'")
    if kind == "linear" and get("rope.scaling.factor", 1.0) != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return out
