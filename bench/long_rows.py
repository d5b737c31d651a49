"""Long rows: what a packed row costs against its documents alone, from 512 to 32,768 tokens, on the CPU.

A SmolLM2-shaped decoder body (hidden 576, 9 heads, 3 key/value heads, MLP 1536; 2 layers; seeded random
weights, NF4 with double quantization computing in fp32, LoRA r 8 on q, k, v, o) runs one forward and
backward pass of `model.model(ids, None, position_ids).pow(2).mean()` on one row of T tokens:

  * one document: position ids 0 .. T-1 (the fused causal path);
  * n packed documents (n = 4, 32): position ids restarting at 0 every T/n tokens (transformers'
    padding-free convention), each document attending to itself only (model/attention.py);
  * the same n documents alone: n rows of T/n tokens, one after another (the cost packing must match);
  * masked: the packed row through the block-diagonal T x T mask (a padding mask of ones forces it), the
    path packed rows took before;
  * transformers + PEFT on the same weights (bitsandbytes' Linear4bit, PEFT's LoRA, SDPA attention), one
    document and the packed row with their padding-free position ids.

Saved bytes: every tensor autograd keeps for the backward pass, through saved_tensors_hooks, each storage
once (bench/lean.py's count), weights excluded; per token of the row. Time: CPU seconds of the process (user
+ system) for the forward and backward pass, one torch thread: a neighbour on the other core changes wall
time more than CPU time. Median of --repeat runs (default 3 up to 2,048 tokens, 1 above). The system part is
mostly page faults: glibc maps every tensor over 32 MiB afresh and the kernel zeroes its pages, which a
long row pays whatever its attention (one document of the same length too) and short rows do not; the
user part alone is shown beside the ratio.

    python bench/long_rows.py                        # 512 to 32,768 tokens (about 15 minutes)
    python bench/long_rows.py --lengths 512 2048 --theirs-max 2048 --masked-max 2048   # a quick look
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import header, set_threads, table
from random_llama import RandomOurs, RandomTheirs, random_tensors

SMOLLM2_BODY = dict(  # SmolLM2-135M's config.json, cut to 2 layers, untied, positions to 32k
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(sides: list[str], layers: int) -> dict:
    """{side: (its model, a function (ids, position_ids, attention_mask) -> the body's last hidden state)},
    on the same weights: `random_tensors` hands each layer to both sides, which quantize it."""
    from lora import LoRAConfig, apply_lora

    cfg = dict(SMOLLM2_BODY, num_hidden_layers=layers)
    builders = {s: (RandomOurs if s == "ours" else RandomTheirs)(cfg, "cpu", torch.float32) for s in sides}
    for layer, named in random_tensors(cfg, 0, "cpu", torch.float32):
        for b in builders.values():
            b.add(layer, named)
    out = {}
    if "ours" in builders:
        ours = builders["ours"].finish()
        apply_lora(ours, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS))
        out["ours"] = (ours.train(), lambda ids, pos, mask: ours.model(ids, mask, pos))
    if "theirs" in builders:
        from peft import LoraConfig, get_peft_model

        hf = builders["theirs"].finish()
        hf.config.use_cache = False
        peft = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS),
                                             bias="none", task_type="CAUSAL_LM")).train()
        body = peft.base_model.model.model
        out["theirs"] = (peft, lambda ids, pos, mask: body(input_ids=ids, position_ids=pos,
                                                            attention_mask=mask).last_hidden_state)
    return out


def step(body, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[int, float, float]:
    """One forward and backward pass: (bytes saved for backward, CPU seconds, of which user seconds)."""
    seen: dict[int, torch.UntypedStorage] = {}  # held to the end, so no address is reused meanwhile
    weights = step.weights

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen.setdefault(s.data_ptr(), s)
        return t

    t0 = os.times()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = body(ids, pos, mask)
    h.pow(2).mean().backward()
    t1 = os.times()
    return sum(s.nbytes() for s in seen.values()), t1.user + t1.system - t0.user - t0.system, t1.user - t0.user


def documents(T: int, n: int) -> torch.Tensor:
    return torch.arange(T // n).repeat(n)[None]                                   # (1, T)


def measure(body, T: int, n: int, repeat: int, alone: bool = True, masked: bool = False) -> dict:
    """Bytes per token and median CPU seconds of one row of n documents (and of the n documents alone)."""
    g = torch.Generator().manual_seed(T + n)
    ids = torch.randint(100, SMOLLM2_BODY["vocab_size"], (1, T), generator=g)
    pos = documents(T, n)
    mask = torch.ones_like(ids) if masked else None
    row, each = [], []
    for _ in range(repeat):
        saved, s, user = step(body, ids, pos, mask)
        row.append((s, user))
        if alone and n > 1:
            runs = [step(body, d, torch.arange(T // n)[None]) for d in ids.split(T // n, dim=1)]
            each.append((sum(r[1] for r in runs), sum(r[2] for r in runs)))
    pick = lambda xs: min(xs, key=lambda x: abs(x[0] - statistics.median(y[0] for y in xs)))  # noqa: E731  median run
    out = {"kib": saved / T / 1024, "s": pick(row)[0], "user": pick(row)[1]}
    if each:
        out["alone"], out["alone_user"] = pick(each)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768], help="row lengths")
    ap.add_argument("--docs", type=int, nargs="+", default=[4, 32], help="documents per packed row (4 32)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (2)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (3 up to 2,048 tokens, then 1)")
    ap.add_argument("--masked-max", type=int, default=8192, help="longest row for the block-diagonal mask (8192)")
    ap.add_argument("--theirs-max", type=int, default=8192,
                    help="longest row for transformers + PEFT (8192; their T x T mask grows as T²)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    sides = ["ours"] + (["theirs"] if args.theirs_max else [])
    built = build(sides, args.layers)
    bodies = {side: fn for side, (_, fn) in built.items()}
    step.weights = {t.untyped_storage().data_ptr() for model, _ in built.values()  # in memory anyway: not counted
                    for t in list(model.parameters()) + list(model.buffers())}
    gap = None
    if "theirs" in bodies:  # same weights, same numbers
        ids = torch.randint(100, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            gap = (bodies["ours"](ids, None, None) - bodies["theirs"](ids, None, None)).abs().max().item()
    for side in sides:  # warm-up
        step(bodies[side], torch.randint(100, 49152, (1, 256)), documents(256, 4))
    ours, theirs = {}, {}
    for T in args.lengths:
        repeat = args.repeat or (3 if T <= 2048 else 1)
        ours[T, 1] = measure(bodies["ours"], T, 1, repeat)
        for n in args.docs:
            ours[T, n] = measure(bodies["ours"], T, n, repeat)
        if T <= args.masked_max:
            ours[T, "masked"] = measure(bodies["ours"], T, args.docs[0], repeat, alone=False, masked=True)
        if "theirs" in bodies and T <= args.theirs_max:
            for n in (1, args.docs[0]):
                theirs[T, n] = measure(bodies["theirs"], T, n, repeat, alone=False)
        print(f"{T} tokens done", file=sys.stderr, flush=True)
    print(report(args, threads, ours, theirs, gap, argv))


def report(args, threads: int, ours: dict, theirs: dict, gap: float | None, argv) -> str:
    lines = [header("Long rows: a packed row against its documents alone", "cpu",
                    sys.argv if argv is None else [sys.argv[0], *argv]),
             f"SmolLM2-shaped body, {args.layers} layers, random weights, NF4 (double quant) computing in fp32, "
             f"LoRA r 8 on q, k, v, o; one forward + backward of the body's squared mean; torch threads {threads}.",
             "", "Saved for backward, KiB per token of the row (each storage once, weights excluded):", ""]
    n1 = args.docs
    rows = [["tokens", "one document", *[f"{n} packed" for n in n1], "packed / one (worst)",
             f"{n1[0]} packed, T x T mask (before)"]]
    for T in args.lengths:
        worst = max(ours[T, n]["kib"] for n in n1) / ours[T, 1]["kib"]
        masked = ours.get((T, "masked"))
        rows.append([f"{T:,}", f"{ours[T, 1]['kib']:.1f}", *[f"{ours[T, n]['kib']:.1f}" for n in n1],
                     f"{worst:.3f}x", f"{masked['kib']:.1f}" if masked else "-"])
    lines += [table(rows), "", "CPU seconds of the forward + backward pass:", ""]
    rows = [["tokens", "one document", *[f"{n} packed / {n} alone (ratio; user time only)" for n in n1],
             f"{n1[0]} packed, T x T mask (before)"]]
    for T in args.lengths:
        masked = ours.get((T, "masked"))
        rows.append([f"{T:,}", f"{ours[T, 1]['s']:.2f}",
                     *[f"{o['s']:.2f} / {o['alone']:.2f} ({o['s'] / o['alone']:.2f}x; {o['user'] / o['alone_user']:.2f}x)"
                       for o in (ours[T, n] for n in n1)], f"{masked['s']:.2f}" if masked else "-"])
    lines.append(table(rows))
    if theirs:
        lines += ["", f"Beside transformers + PEFT (padding-free: the same position ids, no attention mask; SDPA), "
                      f"same weights (largest difference of the body's output on 64 tokens: {gap:.1e}):", ""]
        rows = [["tokens", "row", "KiB/token ours", "KiB/token theirs", "ms/token ours", "ms/token theirs",
                 "ours / theirs (bytes, time)"]]
        for (T, n), th in theirs.items():
            o = ours[T, n]
            rows.append([f"{T:,}", "one document" if n == 1 else f"{n} packed", f"{o['kib']:.1f}", f"{th['kib']:.1f}",
                         f"{1e3 * o['s'] / T:.3f}", f"{1e3 * th['s'] / T:.3f}",
                         f"{o['kib'] / th['kib']:.2f}x, {o['s'] / th['s']:.2f}x"])
        lines.append(table(rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
