"""The lab's watching-a-run experiments: the drop at each epoch and the validation loss (epochs), and
same seed, same curves (seed).

The lecture's chart: the training loss falls through epoch 1, drops again as epoch 2 starts (the model
has seen these examples), and again at epoch 3; the validation loss shows when overfitting starts.
That needs a training set the adapter can memorise: `epochs` trains several epochs of a small set and,
as the contrast, of a set too large to memorise in as many epochs, at each seed, validating
`EVALS_PER_EPOCH` times an epoch. Its runs are not scored on the held-out diamonds: they watch the
losses, not the prices.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from labkit import Lab, markdown_table, new_figure, record, runs_cost, timed
from labruns import RunSpec, run_one
from train import cosine_with_warmup

EVALS_PER_EPOCH = 2   # validation losses an epoch: at its middle and its end


def epochs_rows(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    b = lab.budget
    rows = []
    for name, n in (("small", b.small_set), ("large", b.large_set)):
        steps_per_epoch = -(-n // b.recipe()["batch_size"])
        rows.append((name, lab.settings(train_size=n, epochs=b.n_epochs, max_steps=None,
                                        eval_every=max(1, steps_per_epoch // EVALS_PER_EPOCH))))
    return rows


def epochs_specs(lab: Lab) -> list[RunSpec]:
    return [s for name, settings in epochs_rows(lab)
            for s in lab.specs(f"epochs-{name}", settings, score=False, top_k=None, curve_every=1)]


def boundary(losses: list[list[float]], steps_per_epoch: int, epoch: int, k: int) -> tuple[float, float]:
    """Mean training loss of the last `k` steps of `epoch` and of the first `k` steps of the next."""
    end = epoch * steps_per_epoch
    before = [l for s, l in losses if end - k < s <= end]
    after = [l for s, l in losses if end < s <= end + k]
    return statistics.fmean(before), statistics.fmean(after)


def analyse(run: dict[str, Any], n_epochs: int) -> dict[str, Any]:
    """At each epoch boundary the mean training loss of the half epoch before and the half epoch after;
    each epoch's mean loss; where the validation loss was lowest."""
    steps_per_epoch = run["steps"] // n_epochs
    k = max(1, steps_per_epoch // 2)
    losses, val = run["train_curve"], run["val_losses"]
    drops = [boundary(losses, steps_per_epoch, e, k) for e in range(1, n_epochs)]
    means = [statistics.fmean(l for s, l in losses if e * steps_per_epoch < s <= (e + 1) * steps_per_epoch)
             for e in range(n_epochs)]
    best_step, best = min(val, key=lambda sv: sv[1])
    return {"steps_per_epoch": steps_per_epoch, "k": k, "drops": drops, "epoch_means": means,
            "best_val": [best_step, best], "best_epoch": -(-best_step // steps_per_epoch), "last_val": val[-1],
            "turned_up": val[-1][1] > best + 1e-4}


@timed
def epochs(lab: Lab, started: float) -> str:
    """Several epochs of a small training set and of a larger one, validated EVALS_PER_EPOCH times an epoch,
    each seed; not scored on the held-out diamonds."""
    n_epochs = lab.budget.n_epochs
    rows, data, table_rows, all_runs = epochs_rows(lab), {}, [], []
    fig, axes = new_figure(2, 6.5)
    for ax, (name, settings) in zip(axes, rows):
        runs = lab.run(lab.specs(f"epochs-{name}", settings, score=False, top_k=None, curve_every=1))
        all_runs += runs
        found = [analyse(r, n_epochs) for r in runs]
        data[name] = {"train_items": settings["train_size"], "seeds": found,
                      "curves": [{"train": r["train_curve"], "val": r["val_losses"]} for r in runs]}
        if not runs:   # `report` before any of this set's runs is stored
            ax.set_title(f"{settings['train_size']} diamonds: not run yet")
            continue
        for seed, f in zip(lab.seeds, found):
            pair = lambda e: f"{f['drops'][e][0]:.3f} → {f['drops'][e][1]:.3f}" if len(f["drops"]) > e else "-"  # noqa: E731
            table_rows.append((f"{settings['train_size']} diamonds", seed, pair(0), pair(1),
                               f"{sum(a > b for a, b in f['drops'])} of {len(f['drops'])}",
                               f"{f['epoch_means'][0]:.3f} → {f['epoch_means'][-1]:.3f}",
                               f"{f['best_val'][1]:.3f} (step {f['best_val'][0]}, epoch {f['best_epoch']})",
                               f"{f['last_val'][1]:.3f}"))
        spe = found[0]["steps_per_epoch"]
        for i, r in enumerate(runs):
            alpha, width = (1.0, 1.0) if i == 0 else (0.35, 0.7)
            ax.plot(*zip(*r["train_curve"]), color="steelblue", linewidth=width, alpha=alpha,
                    label="training loss (each step)" if i == 0 else None)
            ax.plot(*zip(*r["val_losses"]), color="darkorange", marker="o", markersize=3, alpha=alpha, linewidth=width,
                    label="validation loss" if i == 0 else None)
        for e in range(1, n_epochs):
            ax.axvline(e * spe + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="optimizer step", ylabel="cross-entropy on the answer tokens", ylim=(0, 2.5),
               title=f"{settings['train_size']} diamonds, {n_epochs} epochs of {spe} steps (seed {lab.seeds[0]} bold)")
        total, warmup = runs[0]["steps"], math.ceil(settings["warmup_ratio"] * runs[0]["steps"])
        lr_ax = ax.twinx()
        lr_ax.plot(range(1, total + 1), [cosine_with_warmup(s - 1, total, warmup, settings["lr"])
                                         for s in range(1, total + 1)], color="grey", linewidth=1)
        lr_ax.set_ylabel("learning rate (grey)")
        ax.legend(loc="upper right", fontsize=8)
    table = markdown_table(("training set", "seed", "train loss, epoch 1 → 2", "epoch 2 → 3",
                            "boundaries with a drop", "mean train loss, first → last epoch", "lowest validation loss",
                            "last validation loss"), table_rows)
    notes = [f"Each run: {n_epochs} epochs, the validation loss ({rows[0][1]['val_size']} diamonds, answer tokens) taken {EVALS_PER_EPOCH} "
             f"times an epoch; the runs are not scored on the held-out diamonds. Steps an epoch: "
             + ", ".join(f"{d['seeds'][0]['steps_per_epoch']} for {d['train_items']} diamonds" for d in data.values()
                         if d["seeds"]) + "."]
    notes += [note(name, d, n_epochs) for name, d in data.items()]
    left = [f"{d['train_items']} diamonds ({len(d['seeds'])} of {len(lab.seeds)} seeds)" for d in data.values()
            if len(d["seeds"]) < len(lab.seeds)]
    notes += [f"**Not finished**: {', '.join(left)}."] if left else []
    return record(lab, "epochs", f"epochs: {n_epochs} passes over a small training set and a larger one", table, fig,
                  started, notes=notes, data=data, cost=runs_cost(all_runs))


def note(name: str, d: dict[str, Any], n_epochs: int) -> str:
    """One sentence per training set, written from the numbers."""
    seeds = d["seeds"]
    if not seeds:
        return f"{d['train_items']} diamonds: no run stored yet."
    drops = sum(a > b for f in seeds for a, b in f["drops"][:1])
    turned = [f for f in seeds if f["turned_up"]]
    rise = statistics.fmean(f["last_val"][1] - f["best_val"][1] for f in seeds)
    return (f"{d['train_items']} diamonds: the training loss drops as epoch 2 starts (the mean of its first half "
            f"epoch below that of epoch 1's second half) at {drops} of {len(seeds)} seeds; the validation loss ends "
            f"above its lowest value (turns up) at {len(turned)} of {len(seeds)}"
            + (f", lowest in epoch {', '.join(str(f['best_epoch']) for f in turned)}" if turned else "")
            + f"; it ends {rise:.3f} above its low on average.")


@timed
def seed(lab: Lab, started: float) -> str:
    """Two runs with seed 42 give identical loss curves; a run with seed 7 does not."""
    settings = lab.settings(max_steps=lab.budget.seed_steps)
    seeds, curves = (42, 42, 7), []
    for s in seeds:  # never from the store: the second seed-42 run must really run
        spec = lab.spec("seed", settings, s, score=False, top_k=None, curve_every=1)
        curves.append([loss for _, loss in run_one(spec, out=None)["train_curve"]])
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
    return record(lab, "seed", "seed: the same seed gives the same curves", table, fig, started,
                  notes=[f"Maximum difference between the two seed-42 curves: {same}."], data={"curves": curves})
