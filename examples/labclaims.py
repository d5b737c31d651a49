"""The lab's first table: each claim of the lectures, what the lab found, and the figure that shows it.

    python examples/lab.py report      # writes <out>/claims.md from the experiments' JSON, pastes it into LAB.md

Every sentence is written from the numbers each experiment stored (`<out>/<name>.json`, the same numbers
as its table), never typed by hand: a row whose experiment has not run says which command runs it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from labsweeps import FIXED_ALPHA

# (the experiment whose numbers a row reads, the lectures' claim)
CLAIMS = [
    ("rank", "r, the rank: start at 8, double to 16, 32, ... while results improve"),
    ("alpha", "alpha, the scaling: alpha = 2r"),
    ("targets", "target modules: most often the attention layers"),
    ("targets", "target later layers when the output must change a lot"),
    ("epochs", "the training loss drops again as epoch 2 starts: overfitting begins"),
    ("epochs", "a validation loss shows when overfitting starts"),
    ("seed", "the same hyperparameters and seed give the same curves"),
    ("qlora", "QLoRA: an NF4 base matches 16-bit LoRA and beats FP4"),
    ("nf4", "NF4: 4-bit codes of N(0, 1)'s quantiles, about 4.127 bits a weight with double quantization"),
]


def hits(row: dict[str, Any]) -> str:
    """The mean greedy hit rate of a stored row, '61.3%' ('-' for a row with no run)."""
    value = row.get("greedy.hit_rate", {}).get("mean", math.nan)
    return "-" if math.isnan(value) else f"{value:.1f}%"


def mean(row: dict[str, Any], key: str) -> float:
    return row.get(key, {}).get("mean", math.nan)


def rank(d: dict[str, Any]) -> str:
    rows = {tuple(int(float(part.split("=")[1])) for part in k.split(", ")): v for k, v in d.items()}   # (r, alpha)
    two_r = {r: v for (r, a), v in rows.items() if a == 2 * r}
    fixed = sorted(mean(v, "greedy.hit_rate") for (r, a), v in rows.items() if a == FIXED_ALPHA)
    best = max(two_r, key=lambda r: mean(two_r[r], "greedy.hit_rate"))
    helped = mean(two_r.get(16, {}), "greedy.hit_rate") > mean(two_r.get(8, {}), "greedy.hit_rate")
    return (f"At alpha = 2r, doubling r from 8 to 16 {'helped' if helped else 'did not help'} "
            f"({hits(two_r.get(8, {}))} against {hits(two_r.get(16, {}))} mean hits); the best r was {best} "
            f"({hits(two_r[best])}), r {max(two_r)} scored {hits(two_r[max(two_r)])}; at alpha {FIXED_ALPHA} every r "
            f"from {min(r for r, a in rows if a == FIXED_ALPHA)} to {max(r for r, a in rows if a == FIXED_ALPHA)} "
            f"scored {fixed[0]:.1f}% to {fixed[-1]:.1f}%.")


def alpha(d: dict[str, Any]) -> str:
    by_alpha = {float(k.split("=")[1]): v for k, v in d.items()}
    best = max(by_alpha, key=lambda a: mean(by_alpha[a], "greedy.hit_rate"))
    return (f"With r = 8 the best alpha was {best:g} (alpha / r = {best / 8:g}): {hits(by_alpha[best])} mean hits, "
            f"against {hits(by_alpha.get(16.0, {}))} at alpha 16 = 2r and {hits(by_alpha[max(by_alpha)])} at "
            f"alpha {max(by_alpha):g}.")


def modules(d: dict[str, Any]) -> str:
    attention, mlp, seven = list(d.values())[:3]
    return (f"On the upper third of the layers, attention alone scored {hits(attention)} mean hits, the MLP alone "
            f"{hits(mlp)}, all seven projections {hits(seven)}, with {attention['trainable']:,}, {mlp['trainable']:,} "
            f"and {seven['trainable']:,} trainable parameters.")


def layers(d: dict[str, Any]) -> str:
    upper, lower, everywhere = list(d.values())[2:5]
    better = "lower" if mean(lower, "greedy.hit_rate") > mean(upper, "greedy.hit_rate") else "upper"
    return (f"All seven projections on the lower third scored {hits(lower)} mean hits, on the upper third "
            f"{hits(upper)}, on every layer {hits(everywhere)}: the {better} third did better here.")


def epoch_two(d: dict[str, Any]) -> str:
    small = d["small"]
    seeds = small["seeds"]
    first = [f["drops"][0] for f in seeds if f["drops"]]
    dropped = sum(a > b for a, b in first)
    before, after = (sum(x[i] for x in first) / len(first) for i in (0, 1))
    return (f"On {small['train_items']} diamonds the training loss dropped as epoch 2 started at {dropped} of "
            f"{len(seeds)} seeds, from {before:.2f} to {after:.2f} (mean loss of the half epochs either side).")


def validation(d: dict[str, Any]) -> str:
    parts = []
    for name in ("small", "large"):
        seeds = d[name]["seeds"]
        rise = sum(f["last_val"][1] - f["best_val"][1] for f in seeds) / len(seeds)
        parts.append(f"on {d[name]['train_items']} diamonds it was lowest in epoch "
                     f"{', '.join(str(f['best_epoch']) for f in seeds)} and ended {rise:.3f} above that low "
                     f"({sum(f['turned_up'] for f in seeds)} of {len(seeds)} seeds turned up)")
    return "The validation loss turned up as the training loss kept falling: " + "; ".join(parts) + "."


def seed(d: dict[str, Any]) -> str:
    first, again, other = d["curves"]
    same = max(abs(a - b) for a, b in zip(first, again))
    apart = max(abs(a - b) for a, b in zip(first, other))
    return (f"Two runs at seed 42: the largest difference between their loss curves was {same!r}; "
            f"a run at seed 7 differed by up to {apart:.4f}.")


def qlora(d: dict[str, Any]) -> str:
    def cell(label: str) -> str:
        row = d.get(label, {})
        return f"{hits(row)} (validation loss {mean(row, 'val_loss'):.3f})"

    bf16 = f", bf16 {cell('unquantized, bf16')}" if "unquantized, bf16" in d else ""
    return (f"Mean hits: NF4 {cell('NF4, double quantization (QLoRA)')}, FP4 {cell('FP4, double quantization')}, "
            f"the unquantized fp32 base {cell('unquantized, fp32')}{bf16}.")


def nf4(d: dict[str, Any]) -> str:
    disk, held = d["bits_per_parameter"], d["bits_held"]
    dq, plain = "with double quantization", "without double quantization"
    return (f"Over the decoder's projections: {disk[dq]:.3f} bits a weight on disk with double quantization, "
            f"{disk[plain]:.3f} without; held while training {held[dq]:.3f} and {held[plain]:.3f}: double "
            f"quantization saves {disk[plain] - disk[dq]:.3f} bits on disk and costs {held[dq] - held[plain]:.3f} held.")


FINDINGS: list[Callable[[dict[str, Any]], str]] = [rank, alpha, modules, layers, epoch_two, validation, seed, qlora, nf4]


def claims(out: str) -> str:
    """`<out>/claims.md`: the table of claims and findings, from `<out>/<experiment>.json`."""
    rows = []
    for (name, claim), finding in zip(CLAIMS, FINDINGS):
        path = os.path.join(out, f"{name}.json")
        data = json.load(open(path)) if os.path.isfile(path) else None
        try:
            found = finding(data) if data else f"*Not run yet: `python examples/lab.py {name}`.*"
        except (KeyError, ValueError, ZeroDivisionError, IndexError):   # a row or seed not stored yet
            found = f"*Not finished: `python examples/lab.py {name}` runs the rest.*"
        rows.append(f"| {claim} | {found} | [{name}](lab/{name}.png) |")
    text = ("| the lectures claim | what the lab found (means over its seeds) | chart |\n| --- | --- | --- |\n"
            + "\n".join(rows) + "\n")
    path = os.path.join(out, "claims.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
