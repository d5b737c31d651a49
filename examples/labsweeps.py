"""The lab's sweeps: rank, alpha, target modules and the 4-bit base (QLoRA), each row three seeds run to the end.

Each experiment is a list of rows, a row is one recipe (the lab's base with a value or two changed),
and each row runs once per seed; `<name>_specs(lab)` lists the runs, `<name>(lab)` writes the table
and figure from the stored results (`examples/lab.py` runs what is missing first).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from labkit import Lab, field_of, markdown_table, new_figure, record, runs_cost, spread, stats, timed, where
from labruns import DEVICES, RunSpec, stored_runs
from pricer import ATTENTION, MLP

RANKS = (2, 4, 8, 16, 32, 64)
ALPHAS = (2, 4, 8, 16, 32, 64)
FIXED_ALPHA = 16


def steps_of(settings: dict[str, Any]) -> int:
    """Optimizer steps of a recipe: max_steps, or its epochs over the training set in batches."""
    if settings["max_steps"]:
        return settings["max_steps"]
    return settings["epochs"] * -(-settings["train_size"] // settings["batch_size"])


def score_cells(lab: Lab, results: list[dict[str, Any]], top_k: int | None) -> list[str]:
    """The first table's cells of a row: hit rate and mean error (greedy), the final validation loss (64
    diamonds, answer tokens: steadier than the hit rate), the top-k average's hit rate, and CPU s per step on
    this machine (* when measured over a few steps because the row ran on a GPU)."""
    cells = [spread(field_of(results, "greedy.hit_rate"), unit="%"),
             spread(field_of(results, "greedy.mean_error"), "{:,.0f}", "$"),
             spread([r["val_losses"][-1][1] for r in results if r["val_losses"]], "{:.3f}")]
    if top_k:
        cells.append(spread(field_of(results, f"top{top_k}.hit_rate"), unit="%"))
    if not results:
        return cells + ["-"]
    step, whole = lab.step_cpu_s(results)
    return cells + [f"{step:.3f}" + ("" if whole else "*")]


def score_header(top_k: int | None) -> tuple[str, ...]:
    top = (f"hits, top-{top_k} average",) if top_k else ()
    return ("hit rate", "mean error", "validation loss", *top, "CPU s / step")


def more_cells(lab: Lab, results: list[dict[str, Any]], top_k: int | None) -> list[str]:
    """The second table's cells of a row: RMSLE (greedy), the top-k average's mean error, where the row ran
    and how many of its seeds are in."""
    cells = [spread(field_of(results, "greedy.rmsle"), "{:.2f}")]
    if top_k:
        cells.append(spread(field_of(results, f"top{top_k}.mean_error"), "{:,.0f}", "$"))
    return cells + [where(results[0]) if results else "-", lab.seeds_cell(results)]


def more_header(top_k: int | None) -> tuple[str, ...]:
    return ("RMSLE", *((f"error, top-{top_k} average",) if top_k else ()), "ran on", "seeds")


def two_tables(first: str, second: str) -> str:
    """A row's scores, then the rest of its numbers: two tables, neither wider than 8 columns."""
    return f"{first}\n\nThe same rows, more of their numbers:\n\n{second}"


def device_notes(lab: Lab, names: list[str], rows: list[list[dict[str, Any]]]) -> list[str]:
    """What '*' means, when a row ran on a GPU; and each row stored on both devices, the other's hits."""
    notes = []
    if any(res and where(res[0]) != "CPU" for res in rows):
        notes.append("Rows that ran on a GPU trained in the CPU's precision (an fp32 base, no autocast: "
                     "`--device cuda`), with the same seeds; their CPU s / step* is the mean of a few steps "
                     "measured here, one thread, as `--plan` measures them.")
    twins = []
    for name, res in dict(zip(names, rows)).items():   # a row twice in one table (rank's r 8, alpha 16) once
        if not res:
            continue
        other = stored_runs([RunSpec(**x["spec"]) for x in res], lab.out, "cuda" if where(res[0]) == "CPU" else "cpu")
        if other:
            twins.append(f"{name}: {spread(field_of(res, 'greedy.hit_rate'), unit='%')} on the {where(res[0])}, "
                         f"{spread(field_of(other, 'greedy.hit_rate'), unit='%')} on the {where(other[0])}")
    if twins:
        notes.append("The same rows, seeds and recipe on both devices (greedy hits): " + "; ".join(twins) +
                     ". Runs that differ only in how the kernels round part ways over 1,100 steps: a few points "
                     "between two rows is within this noise.")
    return notes


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's numbers for the JSON: each seed's scores and the statistics over the seeds ({} while none
    is stored)."""
    if not results:
        return {}
    keys = ["greedy.hit_rate", "greedy.mean_error", "greedy.rmsle", "constant.hit_rate", "constant.mean_error",
            "cpu_s_per_step"] + [f"{k}.{m}" for k in ("top3", "top2") for m in ("hit_rate", "mean_error")]
    values = {k: field_of(results, k) for k in keys}
    values["val_loss"] = [r["val_losses"][-1][1] if r["val_losses"] else math.nan for r in results]
    out = {k: stats(v) | {"seeds": v} for k, v in values.items() if not any(math.isnan(x) for x in v)}
    return out | {"runs": [r["key"] for r in results], "trainable": results[0]["trainable"],
                  "adapter_bytes": results[0]["adapter_bytes"], "base_memory": results[0]["base_memory"]}


def first(rows: list[list[dict[str, Any]]], key: str, fmt: Callable[[Any], str] = str) -> list[str]:
    """`key` of each row's first stored run, formatted ('-' for a row with none yet)."""
    return [fmt(res[0][key]) if res else "-" for res in rows]


def running_note(lab: Lab, names: list[str], rows: list[list[dict[str, Any]]]) -> list[str]:
    """A sentence naming the rows whose seeds are not all stored yet (none when the table is complete)."""
    left = [f"{name} ({len(res)} of {len(lab.seeds)} seeds)" for name, res in zip(names, rows) if len(res) < len(lab.seeds)]
    return [f"**Not finished**: {', '.join(left)}; their cells show the seeds stored so far."] if left else []


def baseline_note(rows: list[list[dict[str, Any]]]) -> str:
    results = next((res for res in rows if res), [])
    hits, error = field_of(results, "constant.hit_rate"), field_of(results, "constant.mean_error")
    return (f"Always answering the training mean price scores {spread(hits, unit='%')} hits and "
            f"{spread(error, '{:,.0f}', '$')} mean error on the same test splits ({len(hits)} seeds).")


def draw(ax_hits, ax_error, labels: list[str], rows: list[list[dict[str, Any]]], name: str, color: str,
         offset: float = 0.0) -> None:
    """Mean hit rate and mean error of each row as a point, its seeds' range as a bar."""
    x = [i + offset for i in range(len(labels))]
    for ax, key in ((ax_hits, "greedy.hit_rate"), (ax_error, "greedy.mean_error")):
        s = [stats(field_of(r, key)) for r in rows]   # NaN for a row with no stored run: a gap
        ax.errorbar(x, [v["mean"] for v in s], yerr=[[v["mean"] - v["min"] for v in s], [v["max"] - v["mean"] for v in s]],
                    fmt="o-", color=color, capsize=3, label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20 if len(max(labels, key=len)) > 6 else 0)


def sweep_figure(lab: Lab, label: str, labels: list[str], series: dict[str, list[list[dict]]]):
    fig, (left, right) = new_figure(2, 6)
    colors = ("seagreen", "indianred", "steelblue")
    for i, (name, rows) in enumerate(series.items()):
        draw(left, right, labels, rows, name, colors[i % 3], offset=0.08 * i)
    left.set(xlabel=label, ylabel="hit rate (%)", title="hits on the held-out diamonds (mean; bar: the seeds' range)")
    right.set(xlabel=label, ylabel="mean error ($)", title="mean error (mean; bar: the seeds' range)")
    if len(series) > 1:
        left.legend(fontsize=8)
    return fig


def rows_specs(lab: Lab, rows: list[tuple[str, dict[str, Any]]], prefix: str) -> list[RunSpec]:
    return [s for name, settings in rows for s in lab.specs(f"{prefix}-{name}", settings)]


def results_of(lab: Lab, rows: list[tuple[str, dict[str, Any]]], prefix: str) -> list[list[dict[str, Any]]]:
    return [lab.run(lab.specs(f"{prefix}-{name}", settings)) for name, settings in rows]


# ---------------------------------------------------------------- rank

def rank_rows(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    rows = [(f"r{r}-a{2 * r}", lab.settings(r=r, alpha=2 * r)) for r in RANKS]
    return rows + [(f"r{r}-a{FIXED_ALPHA}", lab.settings(r=r, alpha=FIXED_ALPHA)) for r in RANKS]


def rank_specs(lab: Lab) -> list[RunSpec]:
    return rows_specs(lab, rank_rows(lab), "rank")


@timed
def rank(lab: Lab, started: float) -> str:
    """r = 2 .. 64 with alpha = 2r (the course's rule), and with alpha fixed at 16."""
    results = results_of(lab, rank_rows(lab), "rank")
    two_r, fixed = results[:len(RANKS)], results[len(RANKS):]
    k = lab.budget.top_k
    pairs = [(r, 2 * r) for r in RANKS] + [(r, FIXED_ALPHA) for r in RANKS]
    table = two_tables(
        markdown_table(("r", "alpha", *score_header(k), "trainable parameters"),
                       [(r, a, *score_cells(lab, res, k), n)
                        for (r, a), res, n in zip(pairs, results, first(results, "trainable", "{:,}".format))]),
        markdown_table(("r", "alpha", *more_header(k)), [(r, a, *more_cells(lab, res, k)) for (r, a), res in zip(pairs, results)]))
    fig = sweep_figure(lab, "r", [str(r) for r in RANKS], {"alpha = 2r": two_r, f"alpha = {FIXED_ALPHA}": fixed})
    names = [f"r={r}, alpha={a}" for r, a in pairs]
    return record(lab, "rank", f"rank: r = 2 to 64, alpha = 2r and alpha = {FIXED_ALPHA}", table, fig, started,
                  notes=[baseline_note(results), *running_note(lab, names, results), *device_notes(lab, names, results)],
                  data={name: summary(res) for name, res in zip(names, results)}, cost=runs_cost(sum(results, [])))


# ---------------------------------------------------------------- alpha

def alpha_rows(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    return [(f"r8-a{a}", lab.settings(r=8, alpha=a)) for a in ALPHAS]


def alpha_specs(lab: Lab) -> list[RunSpec]:
    return rows_specs(lab, alpha_rows(lab), "alpha")


@timed
def alpha(lab: Lab, started: float) -> str:
    """r = 8 with alpha = 2 .. 64: the scaling alpha / r from 0.25 to 8, the parameters unchanged."""
    results = results_of(lab, alpha_rows(lab), "alpha")
    k = lab.budget.top_k
    table = two_tables(
        markdown_table(("alpha", "alpha / r", *score_header(k)),
                       [(a, f"{a / 8:g}", *score_cells(lab, res, k)) for a, res in zip(ALPHAS, results)]),
        markdown_table(("alpha", *more_header(k)), [(a, *more_cells(lab, res, k)) for a, res in zip(ALPHAS, results)]))
    fig = sweep_figure(lab, "alpha (r = 8)", [str(a) for a in ALPHAS], {"r = 8": results})
    names = [f"alpha={a}" for a in ALPHAS]
    return record(lab, "alpha", "alpha: r = 8, alpha = 2 to 64", table, fig, started,
                  notes=[baseline_note(results), *running_note(lab, names, results), *device_notes(lab, names, results)],
                  data={name: summary(r) for name, r in zip(names, results)}, cost=runs_cost(sum(results, [])))


# ---------------------------------------------------------------- targets

def targets_rows(lab: Lab) -> list[tuple[str, str, str, dict[str, Any]]]:
    upper, lower = lab.thirds
    return [("attention", "attention (q, k, v, o)", f"upper third ({upper})", lab.settings(target=ATTENTION)),
            ("mlp", "MLP (gate, up, down)", f"upper third ({upper})", lab.settings(target=MLP)),
            ("all", "all seven", f"upper third ({upper})", lab.settings()),
            ("all-lower", "all seven", f"lower third ({lower})", lab.settings(layers=lower)),
            ("all-layers", "all seven", "all layers", lab.settings(layers="all"))]


def targets_specs(lab: Lab) -> list[RunSpec]:
    return rows_specs(lab, [(n, s) for n, _, _, s in targets_rows(lab)], "targets")


@timed
def targets(lab: Lab, started: float) -> str:
    """Which modules get adapters (attention, MLP, all seven), and in which layers (upper, lower third, all)."""
    rows = targets_rows(lab)
    results = results_of(lab, [(n, s) for n, _, _, s in rows], "targets")
    k = lab.budget.top_k
    table = two_tables(
        markdown_table(("modules", "layers", *score_header(k), "trainable parameters"),
                       [(m, layers, *score_cells(lab, res, k), n)
                        for (_, m, layers, _), res, n in zip(rows, results, first(results, "trainable", "{:,}".format))]),
        markdown_table(("modules", "layers", *more_header(k)),
                       [(m, layers, *more_cells(lab, res, k)) for (_, m, layers, _), res in zip(rows, results)]))
    fig = sweep_figure(lab, "targets", [f"{m.split(' (')[0]}, {layers.split(' (')[0]}" for _, m, layers, _ in rows],
                       {"": results})
    names = [f"{m}, {layers}" for _, m, layers, _ in rows]
    return record(lab, "targets", "targets: attention, MLP or all seven; upper third, lower third or all layers",
                  table, fig, started,
                  notes=[baseline_note(results), *running_note(lab, names, results), *device_notes(lab, names, results)],
                  data={name: summary(r) for name, r in zip(names, results)}, cost=runs_cost(sum(results, [])))


# ---------------------------------------------------------------- qlora

def has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where a bf16 base is fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def qlora_rows(lab: Lab) -> list[tuple[str, str, dict[str, Any]]]:
    rows = [("nf4", "NF4, double quantization (QLoRA)", lab.settings()),
            ("nf4-single", "NF4, no double quantization", lab.settings(double_quant=False)),
            ("fp4", "FP4, double quantization", lab.settings(quant="fp4")),
            ("fp32", "unquantized, fp32", lab.settings(quant="none", dtype="float32"))]
    bf16 = ("bf16", "unquantized, bf16", lab.settings(quant="none", dtype="bfloat16"))
    stored = lab.stored_only and any(stored_runs(lab.specs(f"qlora-{bf16[0]}", bf16[2]), lab.out, device)
                                     for device in DEVICES)   # `report` shows the runs stored on any machine
    return rows + ([bf16] if lab.device == "cuda" or has_bf16() or stored else [])


def qlora_specs(lab: Lab) -> list[RunSpec]:
    return rows_specs(lab, [(n, s) for n, _, s in qlora_rows(lab)], "qlora")


@timed
def qlora(lab: Lab, started: float) -> str:
    """The QLoRA paper's claim here: NF4 matches 16-bit LoRA and beats FP4; what double quantization saves."""
    rows = qlora_rows(lab)
    results = results_of(lab, [(n, s) for n, _, s in rows], "qlora")
    k = lab.budget.top_k
    def mib(key: str) -> Callable[[dict[str, float]], str]:
        return lambda memory: f"{memory[key] / 2 ** 20:,.1f}"

    memory = zip(first(results, "base_memory", mib("projection_bytes")),
                 first(results, "base_memory", lambda m: f"{m['bits_per_weight']:.3f}"),
                 first(results, "base_memory", mib("model_bytes")))
    table = two_tables(
        markdown_table(("frozen base", *score_header(k)),
                       [(label, *score_cells(lab, res, k)) for (_, label, _), res in zip(rows, results)]),
        markdown_table(("frozen base", *more_header(k), "projections held, MiB", "bits a weight, held",
                        "whole model, MiB"),
                       [(label, *more_cells(lab, res, k), *held) for (_, label, _), res, held in zip(rows, results, memory)]))
    fig = sweep_figure(lab, "frozen base", [n for n, _, _ in rows], {"": results})
    labels = [label for _, label, _ in rows]
    notes = [baseline_note(results), *running_note(lab, labels, results), *device_notes(lab, labels, results),
             "Held: the bytes the decoder's projections occupy while training (packed 4-bit codes, their scales as "
             "stored and the fp32 scales decoded from them once, the code books; or the plain weights); the whole "
             "model adds the embedding (tied to the head), the norms and the LoRA parameters."]
    if all(name != "bf16" for name, _, _ in rows):
        notes.append("This CPU has no native bf16 (AVX512-BF16 or AMX): the bf16 row is left out.")
    return record(lab, "qlora", "qlora: NF4 against FP4, without double quantization, and the unquantized base",
                  table, fig, started, notes=notes, data={label: summary(r) for (_, label, _), r in zip(rows, results)},
                  cost=runs_cost(sum(results, [])))
