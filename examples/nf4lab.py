"""The lab's `nf4` experiment: why QLoRA stores weights as NF4 (QLoRA §3).

NF4's 16 levels are quantiles of N(0, 1) scaled to [-1, 1]: if the weights of a block, divided by
the block's absmax, are spread like a normal distribution, each level is used about equally often
and the rounding error is small where most weights lie (near 0). FP4 (a tiny float: sign, 2 exponent
bits, 1 mantissa bit) and plain absmax int4 (15 evenly spaced levels, round(7 w / absmax) / 7) spend
their levels differently. All three use blocks of 64 weights sharing one absmax here.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from labkit import Lab, markdown_table, new_figure, record
from pricer import load_model
from quant import NF4_CODE, dequantize_fp4, dequantize_nf4, quantize_fp4, quantize_nf4

BLOCK = 64
BINS = 200


def int4_absmax(w: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """Plain symmetric int4 round trip: w_hat = round(7 w / absmax) / 7 * absmax per block of `blocksize`."""
    blocks = w.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    return (torch.round(blocks / absmax * 7).clamp(-7, 7) / 7 * absmax).reshape(w.shape)


ROUND_TRIPS = {
    "NF4": lambda w: dequantize_nf4(*quantize_nf4(w, BLOCK, double_quant=False)),
    "FP4": lambda w: dequantize_fp4(*quantize_fp4(w, BLOCK, double_quant=False)),
    "int4 (absmax)": int4_absmax,
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
    """Measured: (packed bytes + quant-state bytes) * 8 / weights, summed over the matrices, from quant's NF4."""
    n_bytes = n = 0
    for w in weights:
        packed, state = quantize_nf4(w, BLOCK, double_quant=double_quant)
        n_bytes += packed.numel() * packed.element_size() + state.nbytes()
        n += w.numel()
    return 8 * n_bytes / n


def nf4_experiment(lab: Lab, started: float, started_at: str) -> str:
    model, _, path = load_model(lab.model_path, "none", "cpu")
    control = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))  # N(0, 1) weights
    sq_err, sq_w, wins, hist = defaultdict(float), defaultdict(float), defaultdict(int), torch.zeros(BINS)
    weights, n_matrices = [], 0
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
        wins["FP4"] += errors["NF4"] < errors["FP4"]
        wins["int4 (absmax)"] += errors["NF4"] < errors["int4 (absmax)"]
        blocks = w.reshape(-1, BLOCK)
        hist += torch.histc(blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38), BINS, -1, 1)

    real = [k for k in dict.fromkeys(k for k, _ in sq_err) if k not in ("all real matrices", "N(0,1) control")]
    kinds = [*real, "all real matrices", "N(0,1) control"]
    rel = {(k, m): (sq_err[k, m] / sq_w[k]) ** 0.5 for k in kinds for m in ROUND_TRIPS}
    rows = [(k, *(f"{rel[k, m]:.4f}" for m in ROUND_TRIPS)) for k in kinds]
    table = markdown_table(("weights", *(f"{m}: RMSE / RMS" for m in ROUND_TRIPS)), rows)
    bits = {dq: bits_per_parameter(weights, dq) for dq in (False, True)}
    gguf_q4_1 = "Q4_1" in path
    notes = [
        f"Every 2-D weight of `{path.split('/')[-1]}` ({n_matrices} matrices, {sum(w.numel() for w in weights):,} "
        f"weights; the tied head counts once), blocks of {BLOCK}, no double quantization in the error columns. "
        f"NF4's error is lower than FP4's on {wins['FP4']} of {n_matrices} matrices and lower than int4's on "
        f"{wins['int4 (absmax)']} of {n_matrices}.",
        f"Bits per parameter of NF4, measured from `quant.quantize_nf4`'s packed bytes and quant state: "
        f"{bits[False]:.3f} without double quantization, {bits[True]:.3f} with it.",
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
        "without double quantization": bits[False], "with double quantization": bits[True]},
        "nf4_beats": dict(wins), "matrices": n_matrices, "histogram": hist.tolist()}
    return record(lab, "nf4", "nf4: the 16 NF4 levels over real weights; NF4 against FP4 and int4", table, fig,
                  started, started_at, notes=notes, data=data)
