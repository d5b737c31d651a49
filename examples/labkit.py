"""The lab's bench: the base recipe and budget every experiment starts from, the statistics of a row
of seeds, and each experiment's written record (a Markdown fragment with its command, machine, commit,
time taken, table and figure).

`examples/lab.py` holds the experiments; `examples/labruns.py` runs and stores the training runs.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from labruns import DEVICES, Estimate, RunSpec, commit, run_all, stored_runs, write_json
from pricer import PRESETS

# Every training run of the lab is this recipe (examples/pricer/recipe.py) with one or two values changed:
# SmolLM2-135M with an NF4 base, the four Cs, r 8 / alpha 16 on all seven projections of layers 20 to 29,
# 1,100 steps of 2, lr 2e-3; each run goes to its last step, and the sweeps' runs (rank, alpha, targets,
# qlora) are scored on the 200 held-out diamonds (the epochs runs watch the losses and are not).
BASE = "lab"


@dataclass(frozen=True)
class Budget:
    """How much each experiment trains and scores: the real lab, or `--tiny` (seconds, plumbing only)."""

    steps: int | None = None       # optimizer steps of a run; None: the recipe's (1,100)
    train_size: int | None = None  # None: the recipe's 4,000 training diamonds
    test_size: int | None = None   # None: the recipe's 200 held-out diamonds
    val_size: int | None = None    # None: the recipe's 64
    top_k: int | None = 3          # the top-k average scored beside greedy (None: greedy only)
    curve_every: int = 10          # training losses stored as means of this many steps
    small_set: int = 20            # epochs: a training set small enough to be memorised
    large_set: int = 160           # epochs: the contrast (the lab's set before), too large to memorise as fast
    n_epochs: int = 8
    seed_steps: int = 20           # steps of each of the seed experiment's three runs
    nf4_matrices: int | None = None   # None: every weight matrix of the model
    overhead_s: float = 60.0       # stated: loading and scoring a run (a stored run's measured one replaces it)

    def recipe(self) -> dict[str, Any]:
        """The base recipe at this budget: no checkpoints, no validation but the final one."""
        s = dict(PRESETS[BASE], save_every=None, eval_every=None)
        for key in ("train_size", "test_size", "val_size"):
            if getattr(self, key) is not None:
                s[key] = getattr(self, key)
        if self.steps is not None:
            s["max_steps"] = self.steps
        return s


TINY = Budget(steps=3, train_size=8, test_size=4, val_size=4, top_k=2, curve_every=1, small_set=4, large_set=8,
              n_epochs=3, seed_steps=3, nf4_matrices=4, overhead_s=1.0)


@dataclass
class Lab:
    """The base recipe, budget, seeds and output folder shared by every experiment of one command."""

    model_path: str | None
    budget: Budget
    out: str
    seeds: tuple[int, ...] = (0, 1, 2)
    jobs: int = 1
    device: str = "cpu"             # where the runs train ("cuda": a GPU, in the CPU's precision)
    flags: str = ""                 # the command's flags, for the record
    stored_only: bool = False       # `report`: tables from the runs stored so far, nothing run
    n_layers: int = 30
    _results: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from model import default_checkpoint, read_config

        self.n_layers = read_config(self.model_path or default_checkpoint()).num_hidden_layers

    @property
    def thirds(self) -> tuple[str, str]:
        """The upper and lower third of the layers as `--layers` specs ('20-' and '0-9' of 30)."""
        third = max(1, self.n_layers // 3)
        return f"{self.n_layers - third}-", f"0-{third - 1}"

    def settings(self, **changes: Any) -> dict[str, Any]:
        """The base recipe at the lab's budget, its layers the upper third, with `changes`."""
        return dict(self.budget.recipe(), layers=self.thirds[0]) | changes

    def spec(self, name: str, settings: dict[str, Any], seed: int, **kw: Any) -> RunSpec:
        kw = dict(top_k=self.budget.top_k, curve_every=self.budget.curve_every) | kw
        return RunSpec(settings=settings, seed=seed, model=self.model_path, name=name, device=self.device, **kw)

    def specs(self, name: str, settings: dict[str, Any], **kw: Any) -> list[RunSpec]:
        """One spec per seed of the lab."""
        return [self.spec(name, settings, seed, **kw) for seed in self.seeds]

    def run(self, specs: list[RunSpec]) -> list[dict[str, Any]]:
        """The results of `specs` (one row) in order: stored ones read, the rest run (`jobs` at a time);
        with `stored_only`, the stored ones alone (a row not finished has fewer than its seeds), from
        the device that holds most of the row's seeds (this lab's on a tie): a row never mixes devices.
        A row that ran on a GPU has its CPU seconds a step measured here, once (`step_cpu_s` reads them)."""
        if self.stored_only:
            found = (stored_runs(specs, self.out, device) for device in dict.fromkeys([self.device, *DEVICES]))
            results = max(found, key=len)   # the first of the longest: this lab's device on a tie
        else:
            self._results |= run_all(specs, self.out, self.jobs)
            results = [self._results[s.key] for s in specs]
        if results and where(results[0]) != "CPU":
            cache, on_cpu = self._step_cpu(), cpu_spec(results[0])
            if Estimate.cost_key(on_cpu) not in cache:
                cache[Estimate.cost_key(on_cpu)] = Estimate().measure(on_cpu)
                write_json(os.path.join(self.out, "step_cpu.json"), cache)
        return results

    def _step_cpu(self) -> dict[str, float]:
        """`<out>/step_cpu.json`: CPU seconds of a step, one thread, of each GPU row's recipe, by cost key."""
        path = os.path.join(self.out, "step_cpu.json")
        return json.load(open(path)) if os.path.isfile(path) else {}

    def step_cpu_s(self, results: list[dict[str, Any]]) -> tuple[float, bool]:
        """CPU seconds of one training step of a row's recipe on this machine, one thread, and whether it
        is the mean of its whole runs (True) or, for a row that ran on a GPU, of the few steps `run`
        measured here (`Estimate.measure`)."""
        cpu = [r["cpu_s_per_step"] for r in results if where(r) == "CPU"]
        if cpu:
            return stats(cpu)["mean"], True
        return self._step_cpu()[Estimate.cost_key(cpu_spec(results[0]))], False

    def seeds_cell(self, results: list[dict[str, Any]]) -> str:
        """'3' for a finished row; '1 of 3' while its other seeds are not stored yet."""
        n = len(self.seeds)
        return f"{len(results)}" if len(results) >= n else f"{len(results)} of {n}"


def cpu_spec(result: dict[str, Any]) -> RunSpec:
    """The spec of a stored run, as if it ran on the CPU."""
    return replace(RunSpec(**result["spec"]), device="cpu")


def where(result: dict[str, Any]) -> str:
    """Where a stored run trained: 'CPU', or the GPU's name without its maker ('H200')."""
    return "CPU" if result.get("device", "cpu") == "cpu" else result["device"].replace("NVIDIA ", "")


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max (NaN for no value)."""
    if not values:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def spread(values: Sequence[float], fmt: str = "{:.1f}", unit: str = "") -> str:
    """'61.3% (58.5–64.0)': the mean of the seeds and their range."""
    if not values or any(math.isnan(v) for v in values):
        return "-"
    s = stats(values)
    pre, post = ("$", "") if unit == "$" else ("", unit)
    body = f"{pre}{fmt.format(s['mean'])}{post}"
    return body if len(values) == 1 else f"{body} ({pre}{fmt.format(s['min'])}–{pre}{fmt.format(s['max'])}{post})"


def field_of(results: list[dict[str, Any]], path: str) -> list[float]:
    """The values of 'greedy.hit_rate'-style paths across runs (NaN where a run lacks it)."""
    out = []
    for r in results:
        value: Any = r
        for part in path.split("."):
            value = value.get(part, math.nan) if isinstance(value, dict) else math.nan
        out.append(float(value))
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows of already formatted cells as a Markdown table (first column left, the rest right)."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(load: bool = True) -> str:
    """CPU model, cores, torch version and (with `load`) the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if load and hasattr(os, "getloadavg"):
        text += f"; load average {os.getloadavg()[0]:.1f}"
    return text


def new_figure(ncols: int = 1, width: float = 7.0):
    """A matplotlib Figure on the Agg backend (no display) and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5), dpi=100)
    return fig, fig.subplots(1, ncols) if ncols > 1 else fig.subplots()


def runs_cost(results: list[dict[str, Any]]) -> str:
    """What the runs behind a table cost: their count, CPU seconds and the commit they ran on."""
    unique = {r["key"]: r for r in results}.values()
    if not unique:
        return "no run finished yet"
    parts = []
    for device in sorted({where(r) for r in unique}):
        runs = [r for r in unique if where(r) == device]
        commits = sorted({r["commit"] for r in runs})
        dates = sorted(r["started"][:10] for r in runs)
        cost = (f"{sum(r['cpu_s'] for r in runs):,.0f} CPU seconds in all (load, training and scoring)" if device == "CPU"
                else f"{sum(r['wall_s'] for r in runs) / 60:,.0f} minutes of run time in all, the runs side by side on one GPU")
        parts.append(f"{len(runs)} runs on {'the CPU, one torch thread each' if device == 'CPU' else 'an ' + device}, "
                     f"{cost}, run {dates[0]} to {dates[-1]} on commit {', '.join(commits)}")
    return "; ".join(parts)


def record(lab: Lab, name: str, title: str, table: str, fig, started: float, notes: Sequence[str] = (),
           data: dict | None = None, cost: str | None = None) -> str:
    """Write `<name>.png`, `<name>.json` (the numbers behind the table) and the `<name>.md` fragment."""
    import json

    os.makedirs(lab.out, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(lab.out, f"{name}.png"))
    if data is not None:
        if cost is None:   # an experiment that stores no runs: the time this command took, for the lab's total
            data = dict(data, took_s=time.perf_counter() - started)
        with open(os.path.join(lab.out, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
    seeds = f" --seeds {len(lab.seeds)}" if name not in ("nf4", "seed") else ""
    command = f"python examples/lab.py {name}{seeds}{lab.flags}"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    text = [f"### {title}", "", f"Command: `{command}`", "",
            (f"Table written {when} UTC from the stored runs on {machine(load=False)}. Behind it: {cost}."
             if cost else f"Written {when} UTC on {machine()}; commit {commit()}. "
             f"Took {(time.perf_counter() - started) / 60:.1f} minutes."), "", table, ""]
    for note in notes:
        text += [note, ""]
    text += [f"![{name}](lab/{name}.png)", ""]
    path = os.path.join(lab.out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def timed(fn: Callable[..., Any]):
    """Run an experiment with its start time (for the record) and print where it wrote."""
    def wrapper(lab: Lab) -> str:
        path = fn(lab, time.perf_counter())
        print(f"wrote {path} and its figure", flush=True)
        return path
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


__all__ = ["BASE", "Budget", "TINY", "Lab", "where", "stats", "spread", "field_of", "markdown_table", "machine",
           "new_figure", "runs_cost", "record", "timed"]
