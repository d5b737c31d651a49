"""The lab's runs: one recipe at one seed, trained to the end, scored, and stored as a small JSON file.

    spec = RunSpec(settings=dict(PRESETS["lab"], r=16, alpha=32), seed=1)
    results = run_all([spec, ...], out="examples/lab", jobs=2)   # {spec.key: the stored result}

A run's file, `<out>/runs/<label>-s<seed>-<key>.json`, is named by what its recipe changes from the
lab's base (`label(settings)`: 'r16_alpha32', 'base') and keyed by everything that decides its numbers
(`RunSpec.key`): the whole recipe (the training-set size among its values), the seed (which draws the
split, the LoRA initialisation and the order of the examples), the model, the device and what is
scored; never by the run's `name`, which only the log and the stored result show. A run that is already stored is
never run again: experiments share runs (the lab's base recipe is a row of rank, alpha, targets and
qlora, run once), and an interrupted lab resumes from the runs it finished. Each run is one process
with one torch thread; `jobs` of them run side by side, each writing its own file (written to a
temporary name, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = "runs"  # the folder under the lab's output that holds one JSON file per finished run
DEVICES = ("cpu", "cuda")  # where a run can train; each device's runs are stored apart


@dataclass(frozen=True)
class RunSpec:
    """What decides a run's numbers: the recipe (`settings`, a preset's keys), the seed, the model (None:
    the embedded SmolLM2) and the device; `score`: greedy (and the top-k average when `top_k`) on the
    held-out diamonds; `curve_every`: training losses kept as means of this many steps (1: every step)."""

    settings: dict[str, Any]
    seed: int
    model: str | None = None
    score: bool = True
    top_k: int | None = 3
    curve_every: int = 10
    name: str = "run"   # for the log and the stored result only: neither the key nor the file name
    device: str = "cpu"  # where it trains, in the CPU's precision (fp32 unless the recipe's dtype says bf16)

    @property
    def key(self) -> str:
        # the device enters the key only when it is not the CPU, so the runs stored before it existed keep theirs
        what = {k: v for k, v in asdict(self).items() if k != "name" and not (k == "device" and v == "cpu")}
        return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def path(self, out: str) -> str:
        """`<out>/runs/<what differs from the lab's base>-s<seed>-<key>.json`: the same run, the same file,
        whichever experiment asks for it."""
        where = "" if self.device == "cpu" else f"-{self.device}"
        return os.path.join(out, RUNS, f"{label(self.settings)}{where}-s{self.seed}-{self.key}.json")


def label(settings: dict[str, Any]) -> str:
    """What a recipe changes from the lab's base, for file names: 'r16_alpha32', 'base' when nothing."""
    from pricer import ATTENTION, MLP, PRESETS

    short = {ATTENTION: "attention", MLP: "mlp", None: "none", True: "yes", False: "no"}
    skip = ("save_every", "eval_every", "val_size", "test_size")
    parts = [f"{k.replace('_', '')}{short.get(v, v) if isinstance(v, (str, bool, type(None))) else v}"
             for k, v in settings.items() if k not in skip and PRESETS["lab"].get(k) != v]
    return "_".join(str(p).replace(",", "+").replace("/", "") for p in parts) or "base"


def load_result(spec: RunSpec, out: str) -> dict[str, Any] | None:
    """The stored result of `spec`, or None when it has not finished."""
    path = spec.path(out)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def stored_runs(specs: list[RunSpec], out: str, device: str | None = None) -> list[dict[str, Any]]:
    """The stored results of `specs` in order, each looked up as run on `device` (its own when None);
    the runs not finished are left out."""
    return [r for s in specs if (r := load_result(s if device is None else replace(s, device=device), out)) is not None]


def write_json(path: str, data: dict[str, Any]) -> None:
    """One key a line (curves stay on one line each); atomic: a temporary name, then rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n")
    os.replace(tmp, path)


def commit() -> str:
    """The commit the lab runs on (`+` when its Python files have changes), for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def held_bytes(module) -> tuple[int, int]:
    """(bytes, weights) of one frozen projection while training: a 4-bit layer's packed codes and every
    buffer it holds (the scales as stored, the fp32 scales decoded from them once, the code books); a
    plain layer's weight and bias. (0, 0) for any other module. The one count of "bits a weight, held"."""
    from torch import nn

    from quant import Linear4bit

    if isinstance(module, Linear4bit):
        tensors, weights = [module.weight, *module.buffers()], module.in_features * module.out_features
    elif isinstance(module, nn.Linear):
        tensors, weights = [module.weight] + ([module.bias] if module.bias is not None else []), module.weight.numel()
    else:
        return 0, 0
    return sum(t.numel() * t.element_size() for t in tensors), weights


def base_memory(model) -> dict[str, float]:
    """Bytes the frozen decoder projections hold in memory (`held_bytes`) and bits per weight; and the
    whole model's bytes."""
    held = weights = 0
    for module in model.model.layers.modules():
        nbytes, n = held_bytes(module)
        held, weights = held + nbytes, weights + n
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return {"projection_bytes": held, "projection_weights": weights, "bits_per_weight": 8 * held / weights,
            "model_bytes": sum(storages.values())}


def curve(losses: list[tuple[int, float]], every: int) -> list[list[float]]:
    """(step, loss) pairs as means over blocks of `every` steps: [[last step of the block, mean], ...]."""
    blocks = [losses[i:i + every] for i in range(0, len(losses), every)]
    return [[b[-1][0], round(sum(loss for _, loss in b) / len(b), 5)] for b in blocks]


def run_one(spec: RunSpec, out: str | None, threads: int = 1) -> dict[str, Any]:
    """Train `spec` once with `threads` torch threads, score it, write its file under `out` (if given).
    On a GPU the run keeps the CPU's precision (an fp32 base and no autocast unless the recipe's dtype
    says otherwise), so that a GPU's rows answer the same question as the CPU's."""
    from lora import apply_lora, lora_state_dict, trainable_parameters
    from pricer import (answer_tokens, base_dtype, constant_baseline, evaluate_greedy_and_top_k, load_model,
                        load_source, lora_config, split_items, train_config)
    from train import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s, started, code = spec.settings, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), commit()  # the code it runs
        cpu0, wall0 = time.process_time(), time.perf_counter()
        torch.manual_seed(spec.seed)
        device = spec.device
        model, tokenizer, _ = load_model(spec.model, s["quant"], device, dtype=base_dtype(s, "cpu") or torch.float32,
                                         double_quant=s["double_quant"])
        memory = base_memory(model)
        items = load_source(None, tokenizer, s["description"]).items
        split = split_items(items, spec.seed, s["test_size"], s["val_size"], s["train_size"])
        apply_lora(model, lora_config(s, model, spec.seed))
        config = train_config(s, device, out_dir=None, seed=spec.seed, progress=False, autocast_dtype=None)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        result = train(model, tokenizer, [(i.prompt, i.answer) for i in split.train],
                       [(i.prompt, i.answer) for i in split.val], config)
        if device == "cuda":
            torch.cuda.synchronize()
        train_cpu, train_wall = time.process_time() - cpu1, time.perf_counter() - wall1
        data: dict[str, Any] = {
            "name": spec.name, "key": spec.key, "spec": asdict(spec), "started": started, "commit": code,
            "threads": threads, "device": device_name(device), "train_items": len(split.train), "steps": result.step,
            "cpu_s_per_step": train_cpu / result.step, "wall_s_per_step": train_wall / result.step,
            "trainable": trainable_parameters(model).trainable,
            "adapter_bytes": sum(t.numel() * t.element_size() for t in lora_state_dict(model).values()),
            "base_memory": memory, **peak_memory(device), "val_losses": [[st, round(v, 5)] for st, v in result.val_losses],
            "train_curve": curve(result.train_losses, spec.curve_every)}
        if spec.score:
            truths, max_new = [i.price for i in split.test], answer_tokens(tokenizer, [i.price for i in split.train])
            greedy, top = evaluate_greedy_and_top_k(model, tokenizer, split.test, max_new, spec.top_k, batch_size=50)
            if top is not None:
                data[f"top{spec.top_k}"] = scores(top)
            data["greedy"] = scores(greedy) | {"guesses": [round(g, 2) for g in greedy.guesses]}
            data["constant"] = scores(constant_baseline([i.price for i in split.train], truths))
        data["cpu_s"], data["wall_s"] = time.process_time() - cpu0, time.perf_counter() - wall0
        if out is not None:
            write_json(spec.path(out), data)
        return data
    finally:
        torch.set_num_threads(before)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def peak_memory(device: str) -> dict[str, int]:
    """The most bytes the run held on the GPU at once (nothing on the CPU, where torch does not count)."""
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if device == "cuda" else {}


def scores(report) -> dict[str, float]:
    return {"hit_rate": report.hit_rate, "mean_error": report.mean_error, "rmsle": report.rmsle}


def _worker(spec: RunSpec, out: str) -> dict[str, Any]:
    sys.path[:0] = [p for p in (os.path.dirname(HERE), HERE) if p not in sys.path]
    return run_one(spec, out, threads=1)


def run_all(specs: list[RunSpec], out: str, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Every spec's result by key: stored ones read, the others run (`jobs` processes at a time, or in
    this process when jobs is 1), each stored as it finishes."""
    unique = list({s.key: s for s in specs}.values())
    done = {s.key: r for s in unique if (r := load_result(s, out)) is not None}
    todo = [s for s in unique if s.key not in done]
    if todo:
        print(f"{len(todo)} run(s) to do, {len(done)} already stored under {os.path.join(out, RUNS)}", flush=True)

    def finished(i: int, spec: RunSpec, r: dict[str, Any]) -> None:
        done[spec.key] = r
        hits = f"{r['greedy']['hit_rate']:.1f}% hits, ${r['greedy']['mean_error']:,.0f}, " if "greedy" in r else ""
        print(f"[{i}/{len(todo)}] {spec.name} seed {spec.seed}: {hits}{r['cpu_s_per_step']:.3f} CPU s/step, "
              f"{r['cpu_s']:.0f} CPU s ({time.strftime('%H:%M:%S')})", flush=True)

    if jobs <= 1:
        for i, spec in enumerate(todo, 1):
            finished(i, spec, run_one(spec, out))
    elif todo:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = {pool.submit(_worker, spec, out): spec for spec in todo}
            for i, future in enumerate(as_completed(futures), 1):
                finished(i, futures[future], future.result())
    return done


@dataclass
class Estimate:
    """Time a list of runs will take: CPU seconds per step by cost (what changes a step's price)."""

    per_step: dict[str, float] = field(default_factory=dict)
    overhead_s: float = 60.0   # loading, the split and scoring, per run (stated); a stored run's replaces it

    @staticmethod
    def cost_key(spec: RunSpec) -> str:
        s = spec.settings
        return json.dumps([spec.model, spec.device, s["quant"], s["double_quant"], s["dtype"], s["r"], s["target"], s["layers"],
                           s["description"], s["batch_size"], s["eval_every"]])

    def learn(self, results: list[dict[str, Any]]) -> None:
        """Take the per-step cost (and the per-run overhead) from runs already stored."""
        for r in results:
            spec = RunSpec(**r["spec"])
            self.per_step.setdefault(self.cost_key(spec), r["cpu_s_per_step"])
            if spec.score:
                self.overhead_s = r["cpu_s"] - r["cpu_s_per_step"] * r["steps"]

    def measure(self, spec: RunSpec, steps: int = 4) -> float:
        """CPU seconds of one training step of `spec`, one thread: the mean of `steps` after a first."""
        from pricer import lora_config, train_config
        from train import train

        key = self.cost_key(spec)
        if key not in self.per_step:
            from pricer import base_dtype, load_model, load_source, split_items
            from lora import apply_lora

            before = torch.get_num_threads()
            torch.set_num_threads(1)
            s = dict(spec.settings, eval_every=None, max_steps=1, epochs=1)
            model, tok, _ = load_model(spec.model, s["quant"], "cpu", base_dtype(s, "cpu"), s["double_quant"])
            split = split_items(load_source(None, tok, s["description"]).items, 0, s["test_size"], s["val_size"],
                                s["train_size"])
            apply_lora(model, lora_config(s, model, 0))
            pairs = [(i.prompt, i.answer) for i in split.train]
            train(model, tok, pairs, None, train_config(s, "cpu", None, 0, progress=False))   # warm-up
            cpu0 = time.process_time()
            train(model, tok, pairs, None, train_config(dict(s, max_steps=steps), "cpu", None, 1, progress=False))
            self.per_step[key] = (time.process_time() - cpu0) / steps
            torch.set_num_threads(before)
        return self.per_step[key]

    def cpu_s(self, spec: RunSpec, steps: int) -> float:
        return self.measure(spec) * steps + self.overhead_s
