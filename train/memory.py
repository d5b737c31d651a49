"""How many bytes one process holds in QLoRA training, by component, with the model sharded N ways (FSDP).

    python -m train.memory            # the tables of bench/RESULTS.md: Llama-3.1 8B/70B/405B on 1, 2, 4, 8
                                      # processes, and a Llama-3.1-8B step on one row of 8k, 16k, 32k tokens

Per process, for a Llama of hidden size H, L layers, MLP width I, vocabulary V, query width Q = heads x
head_dim, key/value width K = kv_heads x head_dim; P = L (2HQ + 2HK + 3HI) weights in the linear layers:

    base          P / 2 / N                       packed NF4, two weights a byte, sharded
    quant state   5 P / 64 / N + 4 P / 16384 / N  absmax: one uint8 code per block of 64 weights (double
                  + 1,092 per linear layer        quant), one fp32 per 256 blocks, and the fp32 scale per
                                                  block decoded from them once for the kernels (quant/
                                                  linear4bit.py); the 16- and 256-value code books and the
                                                  offset are replicated
    other frozen  2 (2VH + (2L+1) H) / N          embeddings, head, norms in bf16 (4 bytes each in fp32)
    LoRA          4 r (in + out) per target / N   fp32 A and B (lm_head: in = H, out = V)
    gradients     the same as LoRA                fp32, reduce-scattered to each process's shard
    optimizer     2 x LoRA                        AdamW's two moments, fp32
    gathered      one layer's base + quant state  FSDP all-gathers a layer just before it runs (the rest
                  + LoRA, + the root's (with      of the world's shards), and the root (embeddings, head,
                  lm_head's LoRA)                 final norm) for the whole step
    activations   rows b = B / N per process, T tokens, e bytes per value (2 for bf16):
                  no checkpointing  L b T a                      a: what autograd keeps per layer and token
                  checkpointing     L b T H e + one layer's      (measured on our layers with saved_tensors_
                  offload           one layer's + b T H e        hooks: tests/test_fsdp.py checks it)
                  a = (3H + Q + 2K + 2I) e + 4 (2 + heads) + r t e: each norm's x̂, q, k, v and the
                  attention output (also o's input), SwiGLU's gate and up; each norm's r and attention's
                  log-sum-exp per head in fp32; XA of each of the t adapters. No projection keeps a copy of
                  its input (a norm's or SwiGLU's output is remade, model/backward.py), nor the frozen base.
                  + per layer the compute-dtype copies of A and B that the fused function keeps: the stacked
                  A of q, k, v (and of gate, up), and in bf16 every A and B (r (in + out) values an adapter).
                  Not counted: the dropout masks when LoRA dropout is on (one per adapted input).
                  + the final norm b T H e, + the fused head at the b A answer positions (it runs there
                  only): the gradient of its input, b A H e, and one chunk of c = min(b A, 1024) fp32 logits
                  and log-probabilities, 8 c V. Packed rows keep the same: they attend per document, with
                  no T x T mask (model/attention.py).
    a step's peak (`step_peak_bytes`, long rows): what autograd keeps, plus the working set of the head or
                  of the last layer's backward pass, plus the LoRA gradients (its docstring; bench/long_memory.py
                  measures it)
"""
from __future__ import annotations

from dataclasses import dataclass

from model import LlamaConfig

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CODE_BOOKS = 16 * 4 + 256 * 4 + 4   # quant_map, nested_quant_map (fp32) and the offset, per 4-bit layer
LLAMA_31 = {  # config.json of meta-llama/Llama-3.1-*: hidden, layers, heads, kv heads, MLP width, vocabulary
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672, vocab_size=128256),
    "Llama-3.1-405B": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                           intermediate_size=53248, vocab_size=128256),
}


@dataclass
class Shape:
    hidden: int
    layers: int
    inter: int
    vocab: int
    q: int        # heads x head_dim
    kv: int       # kv_heads x head_dim
    tied: bool = False
    heads: int = 32

    @classmethod
    def of(cls, config: LlamaConfig) -> "Shape":
        hd = config.head_dim
        return cls(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size,
                   config.num_attention_heads * hd, config.num_key_value_heads * hd, config.tie_word_embeddings,
                   config.num_attention_heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.inter
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _split(n: float, procs: int) -> float:
    return n / procs


def per_process_bytes(shape: Shape, procs: int = 1, r: int = 32, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      batch: int = 4, seq: int = 182, checkpointing: bool | str = False,
                      frozen_bytes: int = 2, act_bytes: int = 2, answer_tokens: int = 5) -> dict[str, float]:
    """Bytes one of `procs` processes holds, by component (see the module docstring for each formula)."""
    per_layer = shape.linears()
    p_layer = sum(i * o for i, o in per_layer.values())
    P = shape.layers * p_layer
    n_linear = shape.layers * len(per_layer)
    quant_layer = (1 + 4) * p_layer / 64 + 4 * p_layer / (64 * 256)  # uint8 codes + decoded fp32 scales
    out = {
        "base": _split(P / 2, procs),
        "quant state": _split(shape.layers * quant_layer, procs) + n_linear * CODE_BOOKS,
        "other frozen": _split(frozen_bytes * ((1 if shape.tied else 2) * shape.vocab * shape.hidden
                                               + (2 * shape.layers + 1) * shape.hidden), procs),
    }
    lora = shape.layers * sum(4 * r * sum(per_layer[t]) for t in targets if t in per_layer)
    head_lora = 4 * r * (shape.hidden + shape.vocab) if "lm_head" in targets else 0
    lora += head_lora
    out["LoRA"] = out["gradients"] = _split(lora, procs)
    out["optimizer"] = 2 * out["LoRA"]
    if procs > 1:  # the other processes' shards of one layer and of the root, gathered while they run
        layer = p_layer / 2 + quant_layer + (lora - head_lora) / shape.layers
        root = frozen_bytes * ((1 if shape.tied else 2) * shape.vocab * shape.hidden + shape.hidden) + head_lora
        out["gathered"] = (layer + root) * (1 - 1 / procs)
    else:
        out["gathered"] = 0.0
    rows = max(1, -(-batch // procs))
    layer_acts = layer_activations(shape, rows * seq, r, targets, act_bytes)
    inputs = rows * seq * shape.hidden * act_bytes
    if checkpointing == "offload":
        acts = layer_acts + inputs           # the layer inputs wait in host memory
    elif checkpointing:
        acts = layer_acts + shape.layers * inputs
    else:
        acts = shape.layers * layer_acts
    kept, working = head_bytes(shape, rows * answer_tokens, act_bytes)
    out["activations"] = acts + inputs + kept + working  # + the final norm's input
    return out


def layer_activations(shape: Shape, tokens: int, r: int, targets, act_bytes: int) -> float:
    """Bytes autograd keeps for one decoder layer over `tokens` tokens: the module docstring's a a token,
    plus the compute-dtype copies of the adapters' A and B."""
    per_layer = shape.linears()
    # the lean step's layer: each norm's x̂, q k v and the attention output for SDPA (also o's input),
    # SwiGLU's gate and up; fp32 r of each norm and log-sum-exp of each head; each XA
    adapted = sum(t in per_layer for t in targets)
    per_token = ((3 * shape.hidden + shape.q + 2 * shape.kv + 2 * shape.inter) * act_bytes
                 + 4 * (2 + shape.heads) + r * adapted * act_bytes)
    stacked = {t for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
               if all(g in targets for g in group) for t in group}
    low = act_bytes != 4  # fp32 A and B cast to the compute dtype: copies
    copies = act_bytes * sum(r * (i * (t in stacked or low) + o * low) for t, (i, o) in per_layer.items() if t in targets)
    return tokens * per_token + copies


def head_bytes(shape: Shape, answers: int, act_bytes: int, chunk: int = 1024) -> tuple[float, float]:
    """The fused head and loss (train/loss.py `LinearCrossEntropy`) over `answers` labelled positions:
    (kept for the backward pass: the gradient of its input, A H e; working while it runs: the fp32 logits
    and log-probabilities of one chunk of c = min(A, chunk) positions, 8 c V)."""
    return answers * shape.hidden * act_bytes, 8 * min(answers, chunk) * shape.vocab


def step_peak_bytes(shape: Shape, seq: int, batch: int = 1, r: int = 32, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                    checkpointing: bool | str = False, act_bytes: int = 2, answer_tokens: int | None = None) -> dict[str, float]:
    """What one training step holds at its peak on top of the weights and the optimizer's moments, one process:

        activations  what autograd keeps when the forward pass ends: every layer's (no checkpointing) or every
                     layer's input (checkpointing); the final norm's input, RoPE's cos and sin (2 hs e a
                     token), the token ids (8 a token) and the head's kept gradient
        offloaded    with "offload", every layer's input, in host memory (the same memory on a CPU)
        working      what the peak adds to those, at the larger of two moments: the head running (the final
                     hidden states, the labelled ones gathered, a chunk's logits), or the last layer's backward
                     pass, once the head's gradient and the final norm's input are freed (with checkpointing
                     that layer's activations made again, the first to be recomputed): its residual gradient
                     and SwiGLU's four (T, I) tensors (dh, dh ⊙ u, then dg, silu(g), du)
        gradients    the LoRA weights' fp32 gradients

    answer_tokens: labelled positions a row (default every one but the first)."""
    tokens = batch * seq
    answers = batch * (seq - 1 if answer_tokens is None else answer_tokens)
    layer = layer_activations(shape, tokens, r, targets, act_bytes)
    hidden = tokens * shape.hidden * act_bytes
    kept, chunk = head_bytes(shape, answers, act_bytes)
    acts = shape.layers * (hidden if checkpointing is True else 0 if checkpointing else layer)
    acts += hidden + tokens * (2 * shape.q // shape.heads * act_bytes + 8) + kept
    head = hidden + answers * shape.hidden * act_bytes + chunk
    backward = (layer if checkpointing else 0) + hidden + 4 * tokens * shape.inter * act_bytes - kept - hidden
    lora = shape.layers * sum(4 * r * sum(shape.linears()[t]) for t in targets if t in shape.linears())
    offloaded = shape.layers * hidden if checkpointing == "offload" else 0
    return {"activations": acts, "offloaded": offloaded, "working": max(head, backward), "gradients": lora}


def table(shapes: dict[str, Shape], procs: tuple[int, ...] = (1, 2, 4, 8), **kw: object) -> str:
    """A markdown table: GiB per process, and which GPU sizes the whole fits in."""
    rows = ["| model | shape | processes | base + quant state | other frozen | LoRA + grads + AdamW | gathered "
            "| activations | total GiB per process | fits in |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    gib = 2 ** 30
    for name, shape in shapes.items():
        for n in procs:
            b = per_process_bytes(shape, n, **kw)
            total = sum(b.values())
            fits = next((f"{g} GB" for g in (16, 24, 40, 48, 80, 141) if total * 1.1 <= g * 1e9), "none of 141 GB")
            rows.append(f"| {name} | {kw.get('batch', 4)} x {kw.get('seq', 182)}"
                        f"{', offload' if kw.get('checkpointing') == 'offload' else ''} | {n} "
                        f"| {(b['base'] + b['quant state']) / gib:.2f} | {b['other frozen'] / gib:.2f} "
                        f"| {(b['LoRA'] + b['gradients'] + b['optimizer']) / gib:.2f} | {b['gathered'] / gib:.2f} "
                        f"| {b['activations'] / gib:.2f} | {total / gib:.2f} | {fits} |")
    return "\n".join(rows)


def long_rows_table(shape: Shape, lengths=(8192, 16384, 32768), r: int = 16, targets=ALL_PROJECTIONS) -> str:
    """A markdown table: one process, one row of each length, every token labelled, without and with offload."""
    gib = 2 ** 30
    rows = ["| tokens | checkpointing | base + quant state | other frozen | LoRA + grads + AdamW | activations kept "
            "| working set | total on the GPU, GiB | host (offloaded inputs) GiB | fits in |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for T in lengths:
        for ckpt in (False, "offload"):
            w = per_process_bytes(shape, 1, r=r, targets=targets, batch=1, seq=T)
            a = step_peak_bytes(shape, T, 1, r, targets, ckpt)
            lora = w["LoRA"] + w["optimizer"] + a["gradients"]
            total = w["base"] + w["quant state"] + w["other frozen"] + lora + a["activations"] + a["working"]
            fits = next((f"{g} GB" for g in (16, 24, 40, 48, 80, 141) if total * 1.1 <= g * 1e9), "none of 141 GB")
            rows.append(f"| {T:,} | {'offload' if ckpt else 'none'} | {(w['base'] + w['quant state']) / gib:.2f} "
                        f"| {w['other frozen'] / gib:.2f} | {lora / gib:.2f} | {a['activations'] / gib:.2f} "
                        f"| {a['working'] / gib:.2f} | {total / gib:.2f} | {a['offloaded'] / gib:.2f} | {fits} |")
    return "\n".join(rows)


def main() -> None:
    shapes = {name: Shape.of(LlamaConfig.from_hf(dict(model_type="llama", **d))) for name, d in LLAMA_31.items()}
    print("Per-process memory of QLoRA training with the NF4 base sharded by FSDP (r=32 on q, k, v, o; bf16\n"
          "embeddings, head and activations; \"fits in\" keeps 10% spare). Generated by `python -m train.memory`.\n")
    print(table(shapes, batch=4, seq=182))
    print()
    print(table(shapes, batch=2, seq=2048, checkpointing="offload"))
    print("\nOne Llama-3.1-8B step on a long row (one process, r=16 on all seven projections, every token labelled,\n"
          "bf16 activations; `step_peak_bytes`: what the step holds at its peak beside the weights and AdamW):\n")
    print(long_rows_table(shapes["Llama-3.1-8B"]))


if __name__ == "__main__":
    main()
