"""A Llama-3.1-8B-shaped model with seeded random weights, built for both sides of a benchmark.

Nothing to download: each decoder layer's weights are drawn, handed to every side (ours and
transformers'), quantized to NF4 there, and dropped before the next layer is drawn, so an 8B model
fits on one GPU without a 16 GB checkpoint and both sides hold exactly the same numbers.
"""
from __future__ import annotations

import torch
from torch import nn

LLAMA31_8B = dict(  # config.json of meta-llama/Llama-3.1-8B, the parts that fix the shape
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


def llama_config(args) -> dict:
    """The HF config dict of the random model: Llama-3.1-8B, or a scaled-down stand-in of it."""
    d = dict(LLAMA31_8B)
    if args.layers:
        d["num_hidden_layers"] = args.layers
    if args.shrink > 1:  # keep head_dim 128 and the GQA ratio; divide the widths
        k = args.shrink
        if 32 % k or 8 % k:
            raise ValueError(f"--shrink {k}: must divide the 8 key/value heads (1, 2, 4 or 8)")
        d.update(hidden_size=4096 // k, intermediate_size=14336 // k, vocab_size=128256 // k,
                 num_attention_heads=32 // k, num_key_value_heads=8 // k, bos_token_id=1, eos_token_id=2)
    if getattr(args, "vocab", None):  # a smaller head and embedding: for figures of the decoder layers alone
        d["vocab_size"] = args.vocab
    return d


def random_tensors(cfg: dict, seed: int, device: str, dtype: torch.dtype):
    """Yield (layer index or None, {HF name: tensor}) for a random model, one decoder layer at a time.

    One generator drawn in a fixed order, so every caller with the same seed and device gets the same
    numbers: both sides of one run, and each side's memory probe. Weights ~ N(0, 0.02), norms 1.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)

    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hs = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hs, cfg["num_key_value_heads"] * hs
    ones = lambda n: torch.ones(n, device=device, dtype=dtype)  # noqa: E731
    yield None, {"model.embed_tokens.weight": randn(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield i, {
            p + "self_attn.q_proj.weight": randn(q, D), p + "self_attn.k_proj.weight": randn(kv, D),
            p + "self_attn.v_proj.weight": randn(kv, D), p + "self_attn.o_proj.weight": randn(D, q),
            p + "mlp.gate_proj.weight": randn(I, D), p + "mlp.up_proj.weight": randn(I, D),
            p + "mlp.down_proj.weight": randn(D, I),
            p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
        }
    yield None, {"model.norm.weight": ones(D), "lm_head.weight": randn(V, D)}


def set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put t in place of the (meta) parameter `name`, frozen."""
    module_name, _, kind = name.rpartition(".")
    model.get_submodule(module_name)._parameters[kind] = nn.Parameter(t, requires_grad=False)


def check_materialised(model: nn.Module, side: str) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    assert not left, f"{side}: tensors left on the meta device: {left[:5]}"


class RandomOurs:
    """Our Llama filled from `random_tensors`, each decoder layer quantized to NF4 as soon as it is full."""

    def __init__(self, cfg: dict, device: str, dtype: torch.dtype):
        from model import Llama, LlamaConfig

        self.config, self.device, self.dtype = LlamaConfig.from_hf(cfg), device, dtype
        with torch.device("meta"):
            self.model = Llama(self.config)

    def add(self, layer: int | None, named: dict[str, torch.Tensor]) -> None:
        from quant import quantize_model

        for name, t in named.items():
            set_tensor(self.model, name, t)
        if layer is not None:
            quantize_model(self.model.model.layers[layer], quant_type="nf4", double_quant=True,
                           compute_dtype=self.dtype, skip=())

    def finish(self) -> nn.Module:
        self.model.model.rotary_emb._buffers["inv_freq"] = self.config.rope_inv_freq().to(self.device)
        check_materialised(self.model, "ours")
        return self.model


class RandomTheirs:
    """transformers' LlamaForCausalLM filled from `random_tensors`, its linears swapped for
    bitsandbytes' `Linear4bit` (NF4, double quant) layer by layer: the modules that
    `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` builds,
    without a 16 GB checkpoint on disk."""

    def __init__(self, cfg: dict, device: str, dtype: torch.dtype):
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers import LlamaForCausalLM

        self.config = HFLlamaConfig(**cfg)
        self.config._attn_implementation = "sdpa"  # from_pretrained's default where torch has SDPA
        self.device, self.dtype = device, dtype
        with torch.device("meta"):
            self.model = LlamaForCausalLM(self.config)

    def add(self, layer: int | None, named: dict[str, torch.Tensor]) -> None:
        import bitsandbytes as bnb

        for name, t in named.items():
            set_tensor(self.model, name, t)
        if layer is None:
            return
        block = self.model.model.layers[layer]
        for name, lin in list(block.named_modules()):
            if not isinstance(lin, nn.Linear):
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=self.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(self.device)  # quantizes on the move
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, q)

    def finish(self) -> nn.Module:
        with torch.device(self.device):  # built on meta, the RoPE buffers hold no numbers yet
            self.model.model.rotary_emb = type(self.model.model.rotary_emb)(config=self.config)
        self.model.is_loaded_in_4bit = True  # as from_pretrained marks it: PEFT then wraps with its bnb LoRA layer
        check_materialised(self.model, "theirs")
        return self.model


def build_random(args, sides: list[str], device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The random model for each side in `sides`, from one pass over `random_tensors`: each layer's
    float weights are handed to every side, quantized, and dropped before the next is drawn."""
    cfg = llama_config(args)
    builders = {s: (RandomOurs if s == "ours" else RandomTheirs)(cfg, device, dtype) for s in sides}
    for layer, named in random_tensors(cfg, args.seed, device, dtype):
        for b in builders.values():
            b.add(layer, named)
    return {s: b.finish() for s, b in builders.items()}


def parameter_count(cfg: dict) -> int:
    """N of the unquantized model: embeddings, attention, MLP, norms and (untied) head."""
    D, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hs = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hs, cfg["num_key_value_heads"] * hs
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * I + 2 * D
    return V * D * (1 if cfg.get("tie_word_embeddings") else 2) + L * per_layer + D
