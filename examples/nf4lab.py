"""The lab's `nf4` experiment: why QLoRA stores weights as NF4 (QLoRA §3).

NF4's 16 levels are quantiles of N(0, 1) scaled to [-1, 1]: if the weights of a block, divided by
the block's absmax, are spread like a normal distribution, each level is used about equally often
and the rounding error is small where most weights lie (near 0). FP4 (a tiny float: sign, 2 exponent
bits, 1 mantissa bit) and plain symmetric absmax int4 spend their levels differently; the int4 here
has 15 evenly spaced levels, -7/7 .. 7/7 of the absmax (round(7 w / absmax) / 7), not 16: a symmetric
grid with an exact 0 leaves one of the 16 codes unused. All three use blocks of 64 weights sharing
one absmax here.

Bits a weight, over the decoder's projections (what training holds in 4 bits): on disk (the packed
codes and the stored quant state) 4.5 without double quantization and about 4.127 with it; held in
memory while training, counted as the qlora experiment counts them (`labruns.held_bytes`: every
buffer of the `quant.Linear4bit`), the fp32 scales it decodes once from the 8-bit codes (0.5 bit a
weight, quant/linear4bit.py) and the code books come on top: double quantization saves disk and
download here, and costs training memory.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from labkit import Lab, markdown_table, new_figure, record, timed
from labruns import held_bytes
from pricer import load_model
from quant import NF4_CODE, Linear4bit, dequantize_fp4, dequantize_nf4, quantize_fp4, quantize_nf4

BLOCK = 64
BINS = 200
INT4 = "int4 (absmax, 15 levels)"


def int4_absmax(w: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """Plain symmetric int4 round trip: w_hat = round(7 w / absmax) / 7 * absmax per block of `blocksize`.

    15 levels (-7 .. 7), evenly spaced, one an exact 0: the 16th code of 4 bits is left unused."""
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    return (torch.round(blocks / absmax * 7).clamp(-7, 7) / 7 * absmax).reshape(w.shape)


ROUND_TRIPS = {
    "NF4": lambda w: dequantize_nf4(*quantize_nf4(w, BLOCK, double_quant=False)),
    "FP4": lambda w: dequantize_fp4(*quantize_fp4(w, BLOCK, double_quant=False)),
    INT4: int4_absmax,
}


def weight_matrices(model, limit: int | None):
    """(kind, name, weight) for every 2-D weight of the decoder (projections and the embedding), each once."""
    seen = set()
    for name, p in model.named_parameters():
        if p.dim() != 2 or id(p) in seen or p.numel() % BLOCK:
            continue
        seen.add(id(p))
        kind = name.split(".")[-2]  # q_proj, ..., down_proj, embed_tokens, lm_head
        yield kind, name, p.detach().float()
        if limit is not None and len(seen) >= limit:
            return


def bits_per_parameter(weights: list[torch.Tensor], double_quant: bool) -> float:
    """Bits on disk, measured: (packed bytes + quant-state bytes) * 8 / weights, over the matrices, from
    quant's NF4."""
    n_bytes = n = 0
    for w in weights:
        packed, state = quantize_nf4(w, BLOCK, double_quant=double_quant)
        n_bytes += packed.numel() * packed.element_size() + state.nbytes()
        n += w.numel()
    return 8 * n_bytes / n


def bits_held(weights: list[torch.Tensor], double_quant: bool) -> float:
    """Bits in memory while training, measured on the layer training uses (`quant.Linear4bit`) and counted
    as the qlora experiment counts its base (`labruns.held_bytes`): the stored bytes, the fp32 scales
    decoded once for the kernels (none without double quant) and the code books."""
    n_bytes = n = 0
    for w in weights:
        nbytes, weights_held = held_bytes(Linear4bit.from_weight(w, quant_type="nf4", double_quant=double_quant,
                                                                 blocksize=BLOCK))
        n_bytes, n = n_bytes + nbytes, n + weights_held
    return 8 * n_bytes / n


@timed
def nf4(lab: Lab, started: float) -> str:
    """NF4 against FP4 and plain absmax int4 (blocks of 64) on every weight matrix of the real model;
    NF4's bits a weight on disk and held in memory while training."""
    model, _, path = load_model(lab.model_path, "none", "cpu")
    control = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))  # N(0, 1) weights
    sq_err, sq_w, wins, hist = defaultdict(float), defaultdict(float), defaultdict(int), torch.zeros(BINS)
    weights, kinds_seen, n_matrices = [], [], 0   # every real matrix, for the errors; the projections among them for the bits
    for kind, _, w in [*weight_matrices(model, lab.budget.nf4_matrices), ("N(0,1) control", "control", control)]:
        errors = {}
        for method, round_trip in ROUND_TRIPS.items():
            err = float(((round_trip(w).float() - w) ** 2).sum())
            errors[method] = err
            sq_err[kind, method] += err
            sq_err["all real matrices", method] += err if kind != "N(0,1) control" else 0.0
        sq_w[kind] += float((w ** 2).sum())
        if kind == "N(0,1) control":
            continue
        sq_w["all real matrices"] += float((w ** 2).sum())
        n_matrices += 1
        weights.append(w)
        kinds_seen.append(kind)
        wins["FP4"] += errors["NF4"] < errors["FP4"]
        wins[INT4] += errors["NF4"] < errors[INT4]
        blocks = w.reshape(-1, BLOCK)
        hist += torch.histc(blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38), BINS, -1, 1)

    real = [k for k in dict.fromkeys(k for k, _ in sq_err) if k not in ("all real matrices", "N(0,1) control")]
    kinds = [*real, "all real matrices", "N(0,1) control"]
    rel = {(k, m): (sq_err[k, m] / sq_w[k]) ** 0.5 for k in kinds for m in ROUND_TRIPS}
    rows = [(k, *(f"{rel[k, m]:.4f}" for m in ROUND_TRIPS)) for k in kinds]
    table = markdown_table(("weights", *(f"{m}: RMSE / RMS" for m in ROUND_TRIPS)), rows)
    projections = [w for kind, w in zip(kinds_seen, weights) if kind.endswith("_proj")]
    bits = {dq: bits_per_parameter(projections, dq) for dq in (False, True)}
    held = {dq: bits_held(projections, dq) for dq in (False, True)}
    table += "\n\n" + markdown_table(
        ("NF4, blocks of 64", "bits a weight on disk", "bits a weight held in memory while training"),
        [("with double quantization (QLoRA)", f"{bits[True]:.3f}", f"{held[True]:.3f}"),
         ("without double quantization", f"{bits[False]:.3f}", f"{held[False]:.3f}")])
    gguf_q4_1 = "Q4_1" in path
    notes = [
        f"Every 2-D weight of `{path.split('/')[-1]}` ({n_matrices} matrices, {sum(w.numel() for w in weights):,} "
        f"weights; the tied head counts once), blocks of {BLOCK}, no double quantization in the error columns. "
        f"NF4's error is lower than FP4's on {wins['FP4']} of {n_matrices} matrices and lower than int4's on "
        f"{wins[INT4]} of {n_matrices}. The int4 baseline is symmetric absmax rounding, round(7 w / absmax) / 7: "
        f"15 levels from -7 to 7, not 16 (an exact 0 and a symmetric grid leave one 4-bit code unused).",
        f"Bits a weight over the {len(projections)} projection matrices of the decoder ({sum(w.numel() for w in projections):,} "
        f"weights: what training holds in 4 bits). On disk: the packed codes and the quant state "
        f"`quant.quantize_nf4` stores ({bits[False]:.3f} without double quantization, {bits[True]:.3f} with it). "
        f"Held in memory while training, counted as the qlora table counts its base (every buffer of each "
        f"`quant.Linear4bit`): besides, the fp32 scales it decodes once from the 8-bit codes, so that each use of a "
        f"weight is one dequantization, and the code books ({held[True]:.3f} bits with double quantization, "
        f"{held[False]:.3f} without). Double quantization saves {bits[False] - bits[True]:.3f} bits a weight on disk; "
        "in memory during training it "
        + (f"saves {held[False] - held[True]:.3f}." if held[True] < held[False] else
           f"costs {held[True] - held[False]:.3f} bits a weight: the 8-bit codes are kept beside the fp32 scales "
           f"decoded from them."),
        ("The embedded SmolLM2 is a GGUF stored in Q4_1 (blocks of 32, 16 even levels from a minimum and a "
         "scale): the 'real' weights here are those dequantized values, already on a 4-bit grid, not the "
         "original bf16 weights. " if gguf_q4_1 else "")
        + "The N(0,1) row is a random 576 x 1536 matrix, the distribution NF4 is built for.",
    ]

    fig, (left, right) = new_figure(2, 6)
    centres = torch.linspace(-1, 1, BINS + 1)[:-1] + 1.0 / BINS
    left.bar(centres.tolist(), (hist / hist.sum()).tolist(), width=2.0 / BINS, color="lightsteelblue",
             label="w / absmax of its block of 64")
    for i, level in enumerate(NF4_CODE.tolist()):
        left.axvline(level, color="crimson", linewidth=0.8, label="the 16 NF4 levels" if i == 0 else None)
    left.set(xlabel="w / absmax", ylabel="share of weights", title="real SmolLM2 weights, block by block")
    left.legend(loc="upper left", fontsize=8)
    x = torch.arange(len(kinds)).float()
    for j, method in enumerate(ROUND_TRIPS):
        right.bar((x + (j - 1) * 0.27).tolist(), [rel[k, method] for k in kinds], width=0.27, label=method)
    right.set_xticks(x.tolist(), kinds, rotation=45, ha="right", fontsize=8)
    right.set(ylabel="RMSE / RMS of the weights", title=f"4-bit round trip, blocks of {BLOCK}")
    right.legend(fontsize=8)
    data = {"relative_rmse": {f"{k} / {m}": v for (k, m), v in rel.items()}, "bits_per_parameter": {
        "without double quantization": bits[False], "with double quantization": bits[True]}, "bits_held": {
        "without double quantization": held[False], "with double quantization": held[True]},
        "nf4_beats": dict(wins), "matrices": n_matrices, "projections": len(projections),
        "projection_weights": sum(w.numel() for w in projections), "histogram": hist.tolist()}
    return record(lab, "nf4", "nf4: the 16 NF4 levels over real weights; NF4 against FP4 and int4", table, fig,
                  started, notes=notes, data=data)
