"""The lectures' experiments, reproduced and drawn on the embedded default (SmolLM2-135M, NF4, diamonds).

    python examples/lab.py rank        # r = 2 .. 32 with alpha = 2r
    python examples/lab.py alpha       # r = 8 with alpha = 4 .. 64
    python examples/lab.py targets     # attention only, MLP only, all seven; all layers or the upper half
    python examples/lab.py epochs      # three epochs of a small set: the drops at each epoch, validation, lr
    python examples/lab.py nf4         # NF4 against FP4 and int4 on every real weight matrix
    python examples/lab.py seed        # same seed, same curves; another seed, other curves
    python examples/lab.py all         # every experiment, then the report
    python examples/lab.py report      # examples/LAB.md from the fragments in examples/lab/

Each experiment writes `<out>/<name>.png`, `<name>.json` (the raw numbers) and `<name>.md` (a
fragment with the command, machine, date, time taken, table and figure); `report` pastes each
fragment between the `<!-- lab:<name> -->` markers of LAB.md. `--tiny` runs every experiment for a
few steps on a few diamonds (with `--model`, a tiny checkpoint): the plumbing, in seconds.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library, the pricer package and labkit

from labkit import TINY, Budget, Lab, markdown_table, new_figure, record, timed  # noqa: E402
from pricer import ALL_PROJECTIONS, ATTENTION, MLP  # noqa: E402
from train import cosine_with_warmup  # noqa: E402

RANKS = (2, 4, 8, 16, 32)
ALPHAS = (4, 8, 16, 32, 64)
UPPER = "upper half"  # the base preset's layers (15 to 29 of SmolLM2's 30)
TARGETS = (("attention (q, k, v, o), upper half", ATTENTION, UPPER), ("MLP (gate, up, down), upper half", MLP, UPPER),
           ("all seven, upper half", ALL_PROJECTIONS, UPPER), ("all seven, all layers", ALL_PROJECTIONS, "all"))
SCORE_HEADER = ("hit rate", "mean error", "RMSLE", "trainable parameters", "adapter bytes", "CPU s / step")


def score_cells(run) -> list[str]:
    return [f"{run.hit_rate:.1f}%", f"${run.mean_error:,.0f}", f"{run.rmsle:.2f}", f"{run.trainable:,}",
            f"{run.adapter_bytes:,}", f"{run.cpu_s_per_step:.2f}"]


def sweep(lab: Lab, name: str, title: str, label: str, values, settings_of, started, started_at) -> str:
    """Train one run per value, then draw hit rate and mean error against the value."""
    from tqdm import tqdm

    lab.estimate(name, len(values), lab.budget.steps)
    runs = [lab.run(settings_of(v)) for v in tqdm(values, desc=name, unit="run")]
    fig, (left, right) = new_figure(2, 5.5)
    names = [str(v) for v in values]
    left.bar(names, [r.hit_rate for r in runs], color="seagreen")
    left.set(xlabel=label, ylabel="hit rate (%)", title=f"hits on {lab.budget.test_size} held-out diamonds")
    right.bar(names, [r.mean_error for r in runs], color="indianred")
    right.set(xlabel=label, ylabel="mean error ($)", title=f"after {lab.budget.steps} steps")
    table = markdown_table((label, *SCORE_HEADER), [(v, *score_cells(r)) for v, r in zip(names, runs)])
    data = {"values": names, "runs": [{k: getattr(r, k) for k in ("hit_rate", "mean_error", "rmsle", "trainable",
                                                                   "adapter_bytes", "cpu_s_per_step")} | {
        "settings": r.settings, "train_losses": r.result.train_losses} for r in runs]}
    return record(lab, name, title, table, fig, started, started_at, data=data)


@timed
def rank(lab: Lab, started, started_at) -> str:
    """r = 2, 4, 8, 16, 32 with alpha = 2r (the course's rule of thumb)."""
    return sweep(lab, "rank", "rank: r = 2 to 32, alpha = 2r", "r", RANKS,
                 lambda r: lab.settings(r=r, alpha=2 * r), started, started_at)


@timed
def alpha(lab: Lab, started, started_at) -> str:
    """r = 8 with alpha = 4, 8, 16, 32, 64: the scaling alpha / r from 0.5 to 8."""
    return sweep(lab, "alpha", "alpha: r = 8, alpha = 4 to 64", "alpha", ALPHAS,
                 lambda a: lab.settings(r=8, alpha=a), started, started_at)


@timed
def targets(lab: Lab, started, started_at) -> str:
    """Which modules get adapters (attention, MLP, all seven), and in which layers."""
    by_name = {n: dict(target=t, layers=lab.budget.upper_half if layers == UPPER else layers)
               for n, t, layers in TARGETS}
    return sweep(lab, "targets", "targets: attention, MLP or all seven; all layers or the upper half", "targets",
                 list(by_name), lambda n: lab.settings(**by_name[n]), started, started_at)


@timed
def epochs(lab: Lab, started, started_at) -> str:
    """Three epochs of a small training set, validated often: the training loss, validation loss and lr."""
    b = lab.budget
    settings = lab.settings(epochs=3, max_steps=None, eval_every=b.eval_every)
    steps_per_epoch = b.epoch_items // b.batch_size
    lab.estimate("epochs", 1, 3 * steps_per_epoch, settings)
    run = lab.run(settings, score=False, train_size=b.epoch_items)
    train_losses, val_losses = run.result.train_losses, run.result.val_losses
    total = run.result.total_steps
    warmup = math.ceil(settings["warmup_ratio"] * total)
    lrs = [cosine_with_warmup(s - 1, total, warmup, settings["lr"]) for s, _ in train_losses]  # lr of step s

    fig, ax = new_figure(1, 9)
    ax.plot(*zip(*train_losses), color="steelblue", linewidth=1, label="training loss (each step)")
    ax.plot(*zip(*val_losses), color="darkorange", marker="o", markersize=3, label="validation loss")
    for e in range(1, 3):
        ax.axvline(e * steps_per_epoch + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy on the answer tokens",
           title=f"{b.epoch_items} diamonds, 3 epochs of {steps_per_epoch} steps (dotted: epoch starts)")
    lr_ax = ax.twinx()
    lr_ax.plot([s for s, _ in train_losses], lrs, color="grey", linewidth=1, label="learning rate")
    lr_ax.set_ylabel("learning rate (warmup, then cosine)")
    ax.legend(loc="upper right")

    k = max(1, steps_per_epoch // 4)   # steps compared on each side of an epoch boundary
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows, notes = [], []
    for e in range(3):
        epoch = [l for s, l in train_losses if e * steps_per_epoch < s <= (e + 1) * steps_per_epoch]
        vals = [l for s, l in val_losses if e * steps_per_epoch < s <= (e + 1) * steps_per_epoch]
        rows.append((e + 1, f"{mean(epoch[:k]):.3f}", f"{mean(epoch[-k:]):.3f}",
                     f"{min(vals):.3f}" if vals else "-", f"{vals[-1]:.3f}" if vals else "-"))
    for e in (1, 2):
        before, after = float(rows[e - 1][2]), float(rows[e][1])
        notes.append(f"Epoch {e + 1} start: the mean training loss of its first {k} steps is {after:.3f} against "
                     f"{before:.3f} over the last {k} steps of epoch {e}: "
                     + ("a drop." if after < before else "no drop."))
    best_step, best = min(val_losses, key=lambda sl: sl[1])
    notes.append(f"Lowest validation loss {best:.3f} at step {best_step} of {total}; at the end {val_losses[-1][1]:.3f}: "
                 + ("the validation loss turned up after its low (overfitting)." if val_losses[-1][1] > best
                    else "it did not turn up: no overfitting within these three epochs."))
    table = markdown_table(("epoch", f"train loss, first {k} steps", f"train loss, last {k} steps",
                            "lowest validation loss", "last validation loss"), rows)
    data = {"train_losses": train_losses, "val_losses": val_losses, "lr": lrs, "steps_per_epoch": steps_per_epoch}
    return record(lab, "epochs", "epochs: three passes over a small training set", table, fig,
                  started, started_at, notes=notes, data=data)


@timed
def seed(lab: Lab, started, started_at) -> str:
    """Two runs with seed 42 give identical loss curves; a run with seed 7 does not."""
    from tqdm import tqdm

    b = lab.budget
    settings = lab.settings(max_steps=b.seed_steps)
    lab.estimate("seed", 3, b.seed_steps, settings)
    seeds = (42, 42, 7)
    curves, lab._cache = [], {}  # the second seed-42 run must really run, not come from the cache
    for s in tqdm(seeds, desc="seed", unit="run"):
        lab._cache.clear()
        curves.append([loss for _, loss in lab.run(settings, seed=s, score=False).result.train_losses])
    same = max(abs(a - c) for a, c in zip(curves[0], curves[1]))
    other = max(abs(a - c) for a, c in zip(curves[0], curves[2]))
    print(f"seed 42 twice: maximum difference of the loss curves {same}; seed 42 against 7: {other:.4f}")
    fig, ax = new_figure(1, 8)
    for curve, s, style in zip(curves, ("42 (first run)", "42 (second run)", "7"), ("-", "--", "-")):
        ax.plot(range(1, len(curve) + 1), curve, linestyle=style, label=f"seed {s}")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="same seed, same curve")
    ax.legend()
    table = markdown_table(("run", "seed", "final training loss", "max |difference| from the first run"),
                           [(i + 1, s, f"{c[-1]:.4f}", repr(d) if d == 0 else f"{d:.4g}") for i, (s, c, d) in
                            enumerate(zip(seeds, curves, (0.0, same, other)))])
    return record(lab, "seed", "seed: the same seed gives the same curves", table, fig, started, started_at,
                  notes=[f"Maximum difference between the two seed-42 curves: {same}."], data={"curves": curves})


@timed
def nf4(lab: Lab, started, started_at) -> str:
    """NF4 against FP4 and plain absmax int4 (blocks of 64) on every weight matrix of the real model."""
    from nf4lab import nf4_experiment

    return nf4_experiment(lab, started, started_at)


EXPERIMENTS = {f.__name__: f for f in (rank, alpha, targets, epochs, nf4, seed)}


def report(out: str, page: str) -> str:
    """Paste each `<out>/<name>.md` fragment between `<!-- lab:<name> -->` and `<!-- /lab:<name> -->` of `page`."""
    with open(page) as f:
        text = f.read()
    for name in EXPERIMENTS:
        path = os.path.join(out, f"{name}.md")
        body = open(path).read().strip() if os.path.isfile(path) else f"*Not run yet: `python examples/lab.py {name}`.*"
        pattern = re.compile(rf"(<!-- lab:{name} -->\n).*?(\n<!-- /lab:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{page}: no <!-- lab:{name} --> ... <!-- /lab:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    with open(page, "w") as f:
        f.write(text)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all", "report"])
    p.add_argument("--out", default=os.path.join(HERE, "lab"), help="folder for figures and fragments [examples/lab]")
    p.add_argument("--page", default=os.path.join(HERE, "LAB.md"), help="the page `report` fills [examples/LAB.md]")
    p.add_argument("--model", help="HF folder or .gguf [the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--tiny", action="store_true", help="a few steps on a few diamonds: the plumbing in seconds")
    p.add_argument("--steps", type=int, help="optimizer steps of each rank/alpha/targets run [80]")
    args = p.parse_args(argv)
    if args.experiment == "report":
        print(f"wrote {report(args.out, args.page)}")
        return 0
    budget = TINY if args.tiny else Budget()
    if args.steps:
        budget = Budget(**{**budget.__dict__, "steps": args.steps})
    flags = "".join(f" {flag} {value}" for flag, value in (("--model", args.model), ("--steps", args.steps),
                                                           ("--out", args.out if argv is not None else None)) if value)
    lab = Lab(args.model, budget, args.out, flags=flags + (" --tiny" if args.tiny else ""))
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    t0 = time.perf_counter()
    for name in names:
        EXPERIMENTS[name](lab)
    if args.experiment == "all":
        print(f"all experiments in {(time.perf_counter() - t0) / 60:.1f} minutes; wrote {report(args.out, args.page)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
