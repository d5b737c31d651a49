"""The lab's bench: one fine-tuning run of the pricer recipe, timed and scored, and each experiment's
written record (a Markdown fragment with its command, machine, date, time taken, table and figure).

`examples/lab.py` holds the experiments; everything they share lives here.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lora import apply_lora, lora_state_dict, trainable_parameters
from pricer import PRESETS, Split, evaluate_prices, load_model, load_source, lora_config, split_items, train_config
from pricer import answer_tokens
from train import TrainResult, answer_loss, build_examples, collate, train

# Every run of the lab starts from this preset (every attribute of each diamond, the upper half of the
# layers) and changes one or two values; LAB.md's recorded results were run from it. The faster demo
# ("demo") takes what the lab showed.
BASE = "demo-full"


@dataclass
class Budget:
    """How much each experiment trains and scores: the real lab, or `--tiny` (seconds, plumbing only)."""

    steps: int = 80            # optimizer steps of each rank / alpha / targets run
    test_size: int = 100       # held-out diamonds scored after each run (the first 100 of the demo's 200)
    val_size: int = 64
    seed_steps: int = 20       # steps of each of the three seed runs
    epoch_items: int = 160     # the epochs experiment's small training set (20 steps of 8 per epoch)
    eval_every: int = 4        # its validation interval, in steps
    batch_size: int = 8
    nf4_matrices: int | None = None   # None: every weight matrix of the model
    upper_half: str = PRESETS[BASE]["layers"]  # the upper half of the layers ('15-' of 30)
    # Stated, not measured: loading the NF4 model and scoring 100 diamonds took about 30 s on
    # this project's 2-core machine; the estimate adds it to each run.
    overhead_s: float = 30.0


TINY = Budget(steps=3, test_size=4, val_size=4, seed_steps=3, epoch_items=8, eval_every=1, batch_size=4,
              nf4_matrices=4, upper_half="1-", overhead_s=1.0)


@dataclass
class Run:
    """What one run of the recipe gave: the scores, sizes and speed, and its loss curves."""

    settings: dict[str, Any]
    result: TrainResult
    hit_rate: float = float("nan")
    mean_error: float = float("nan")
    rmsle: float = float("nan")
    trainable: int = 0
    adapter_bytes: int = 0
    cpu_s_per_step: float = 0.0     # process CPU time (all threads) per optimizer step
    wall_s_per_step: float = 0.0


@dataclass
class Lab:
    """The base model, the data and the budget shared by every run of one `lab.py` command."""

    model_path: str | None
    budget: Budget
    out: str
    description: str = PRESETS[BASE]["description"]
    flags: str = ""            # the command's flags, for the record
    cpu_started: float = 0.0   # process CPU time when the current experiment started
    seed: int = 42
    _split: Split | None = None
    _cache: dict[str, Run] = field(default_factory=dict)

    def settings(self, **changes: Any) -> dict[str, Any]:
        """The lab's base preset with `changes`, at the lab's budget: fresh runs, no checkpoints."""
        s = dict(PRESETS[BASE], max_steps=self.budget.steps, batch_size=self.budget.batch_size,
                 save_every=None, eval_every=None, layers=self.budget.upper_half)
        s.update(changes)
        return s

    def split(self, train_size: int) -> Split:
        if self._split is None:
            loaded = load_source(None, None, self.description)
            self._split = split_items(loaded.items, self.seed, self.budget.test_size, self.budget.val_size)
        return Split(self._split.train[:train_size], self._split.val, self._split.test)

    def load(self, settings: dict[str, Any], seed: int):
        """A fresh base model with the recipe's LoRA applied (each run starts from the same base)."""
        model, tokenizer, _ = load_model(self.model_path, settings["quant"], "cpu")
        apply_lora(model, lora_config(settings, model, seed))
        return model, tokenizer

    def run(self, settings: dict[str, Any], seed: int | None = None, score: bool = True,
            train_size: int | None = None) -> Run:
        """Train the recipe once (and score it on the held-out diamonds); the same settings run once."""
        seed = self.seed if seed is None else seed
        key = json.dumps([settings, seed, score, train_size], sort_keys=True, default=str)
        if key in self._cache:
            return self._cache[key]
        steps = settings["max_steps"] or settings["epochs"]
        split = self.split(train_size or steps * settings["batch_size"])
        model, tokenizer = self.load(settings, seed)
        config = train_config(settings, "cpu", out_dir=None, seed=seed, progress=True)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = train(model, tokenizer, pairs(split.train), pairs(split.val), config)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        run = Run(settings, result, trainable=trainable_parameters(model).trainable,
                  adapter_bytes=sum(t.numel() * t.element_size() for t in lora_state_dict(model).values()),
                  cpu_s_per_step=cpu / result.step, wall_s_per_step=wall / result.step)
        if score:
            max_new = answer_tokens(tokenizer, [item.price for item in split.train])
            report = evaluate_prices(model, tokenizer, split.test, max_new, batch_size=50)
            run.hit_rate, run.mean_error, run.rmsle = report.hit_rate, report.mean_error, report.rmsle
        self._cache[key] = run
        return run

    def estimate(self, name: str, n_runs: int, steps: int, settings: dict[str, Any] | None = None) -> None:
        """Print the expected time before starting: one measured training step times the steps."""
        settings = settings or self.settings()
        model, tokenizer = self.load(settings, self.seed)
        examples, _ = build_examples(tokenizer, pairs(self.split(settings["batch_size"]).train), None, True)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else tokenizer.eos_id
        batch = collate(examples[:settings["batch_size"]], pad)
        answer_loss(model, batch["input_ids"], batch["labels"]).backward()  # the first step pays for warm-up
        t0 = time.perf_counter()
        answer_loss(model, batch["input_ids"], batch["labels"]).backward()
        step_s = time.perf_counter() - t0
        total = n_runs * (steps * step_s + self.budget.overhead_s)
        print(f"{name}: {n_runs} run(s) x {steps} steps; one training step measured at {step_s:.2f} s, "
              f"plus about {self.budget.overhead_s:.0f} s a run to load and score (stated): "
              f"about {total / 60:.1f} minutes", flush=True)


def pairs(items) -> list[tuple[str, str]]:
    return [(item.prompt, item.answer) for item in items]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows of already formatted cells as a Markdown table (first column left, the rest right)."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, torch threads and version, and the load average when the command started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s); load average {load:.1f} at the start")


def new_figure(ncols: int = 1, width: float = 7.0):
    """A matplotlib Figure on the Agg backend (no display) and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5), dpi=100)
    return fig, fig.subplots(1, ncols) if ncols > 1 else fig.subplots()


def record(lab: Lab, name: str, title: str, table: str, fig, started: float, started_at: str,
           notes: Sequence[str] = (), data: dict | None = None) -> str:
    """Write `<name>.png`, `<name>.json` (the raw numbers) and the `<name>.md` fragment; return its path."""
    out = lab.out
    os.makedirs(out, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"))
    if data is not None:
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
    command = f"python examples/lab.py {name}{lab.flags}"
    minutes, cpu = (time.perf_counter() - started) / 60, time.process_time() - lab.cpu_started
    text = [f"### {title}", "", f"Command: `{command}`", "",
            f"Ran {started_at} UTC on {machine()}; took {minutes:.1f} minutes ({cpu:.0f} CPU seconds).", "",
            table, ""]
    for note in notes:
        text += [note, ""]
    text += [f"![{name}](lab/{name}.png)", ""]
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def timed(fn: Callable[..., Any]):
    """Run an experiment with its start time (for the record) and print where it wrote."""
    def wrapper(lab: Lab) -> str:
        started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        lab.cpu_started = time.process_time()
        path = fn(lab, started, started_at)
        print(f"wrote {path} and its figure", flush=True)
        return path
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
