"""The pricer after SFT, then DPO or GRPO, at several seeds: one table of hits, errors and CPU seconds.

    python examples/after_table.py --sft /work/runs/demo-s{seed} --out /work/runs/after   # run what is missing, print
    python examples/after_table.py --sft /work/runs/demo-s{seed} --out /work/runs/after --no-run   # print only

For each seed and objective, `train_pricer.py --after <sft>/adapter --objective <objective> --seed <seed>`'s
stage (examples/pricer/after.py) runs in this one process, the base model loaded once (a run whose
<out>/<objective>-s<seed>/after.json exists is read, not run again). The SFT stage's CPU seconds come
from its run's `log` (the `User time` and `System time` lines of `/usr/bin/time -v`). With matplotlib,
the rewards and margins over the steps are drawn into --chart.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

from lora import load_adapter  # noqa: E402
from pricer import PRESETS, adapter_split, load_model, load_source, split_items, tune_after  # noqa: E402

PANELS = [("dpo", "rewards/margins"), ("dpo", "rewards/chosen"), ("dpo", "rewards/rejected"), ("grpo", "reward")]
SMOOTH = 8  # steps in the moving average drawn over each noisy curve


def sft_cpu_seconds(log: str) -> float | None:
    """User + system seconds of the SFT command, from the `/usr/bin/time -v` lines of its log."""
    if not os.path.isfile(log):
        return None
    text = open(log, encoding="utf-8", errors="replace").read()
    found = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", text) for kind in ("User", "System")]
    return sum(float(m.group(1)) for m in found) if all(found) else None


def run_missing(args, jobs: list[tuple[int, str]]) -> None:
    """Each (seed, objective) without its after.json, in this process on one loaded base model."""
    todo = [(s, o) for s, o in jobs if not os.path.isfile(os.path.join(args.out, f"{o}-s{s}", "after.json"))]
    if not todo:
        return
    model, tokenizer, _ = load_model(None, "nf4", "cpu")
    items = load_source(None, tokenizer, PRESETS["demo"]["description"]).items
    for seed, objective in todo:
        settings = dict(PRESETS[f"after-{objective}"], **args.set.get(objective, {}))
        adapter = os.path.join(args.sft.format(seed=seed), "adapter")
        recorded = adapter_split(adapter, seed) or settings   # the split the SFT adapter trained on
        settings.update({k: recorded[k] for k in ("test_size", "val_size", "train_size")})
        split = split_items(items, seed, settings["test_size"], settings["val_size"], settings["train_size"])
        load_adapter(model, adapter)
        torch.manual_seed(seed)
        print(f"--- seed {seed}, {objective}", flush=True)
        tune_after(model, tokenizer, split, settings, objective, os.path.join(args.out, f"{objective}-s{seed}"), seed)


def mean_range(values: list[float], fmt: str) -> str:
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))} to {fmt.format(max(values))}, {len(values)} seeds)"


def table(args, jobs) -> str:
    """One row per seed and stage (the SFT adapter once a seed), then each stage's mean and range."""
    records = {(s, o): json.load(open(os.path.join(args.out, f"{o}-s{s}", "after.json"))) for s, o in jobs
               if os.path.isfile(os.path.join(args.out, f"{o}-s{s}", "after.json"))}
    lines = ["| seed | stage | greedy hits | mean error | steps | CPU s: data + training (scoring) | CPU s of the SFT command |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    stages: dict[str, list[dict]] = {}
    for seed in sorted({s for s, _ in records}):
        mine = [(o, r) for (s, o), r in sorted(records.items()) if s == seed]
        sft_cpu = sft_cpu_seconds(os.path.join(args.sft.format(seed=seed), "log"))
        sft = mine[0][1]["sft"]
        stages.setdefault("SFT", []).append(sft)
        lines.append(f"| {seed} | SFT | {sft['hits']:.1f}% | ${sft['error']:,.0f} | | | "
                     f"{'' if sft_cpu is None else f'{sft_cpu:,.0f}'} |")
        for objective, r in mine:
            cpu = r["cpu_s"]
            stages.setdefault(f"SFT + {objective.upper()}", []).append({**r["after"], "gain": r["after"]["hits"] - sft["hits"]})
            lines.append(f"| {seed} | SFT + {objective.upper()} | {r['after']['hits']:.1f}% | ${r['after']['error']:,.0f} | "
                         f"{r['steps']} | {cpu['data'] + cpu['train']:,.0f} ({cpu['score']:,.0f}) | |")
    lines += ["", "| stage | greedy hits, mean (range) | mean error, mean (range) | hits over the SFT start, points |",
              "| --- | --- | --- | --- |"]
    for stage, rows in stages.items():
        gain = mean_range([r["gain"] for r in rows], "{:+.1f}") if "gain" in rows[0] else ""
        lines.append(f"| {stage} | {mean_range([r['hits'] for r in rows], '{:.1f}%')} | "
                     f"{mean_range([r['error'] for r in rows], '${:,.0f}')} | {gain} |")
    return "\n".join(lines)


def chart(args, jobs, path: str) -> str | None:
    """Each objective's curves per step, every seed (faint: each step; solid: the mean of SMOOTH steps), one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.6))
    for ax, (objective, name) in zip(axes, PANELS):
        for seed, o in jobs:
            file = os.path.join(args.out, f"{o}-s{seed}", "after.json")
            if o == objective and os.path.isfile(file):
                metrics = json.load(open(file))["metrics"]
                steps, values = [s for s, _ in metrics], [m[name] for _, m in metrics]
                line, = ax.plot(steps, values, alpha=0.3)
                k = min(SMOOTH, len(values))
                mean = [sum(values[i:i + k]) / k for i in range(len(values) - k + 1)]
                ax.plot(steps[k - 1:], mean, color=line.get_color(), label=f"seed {seed}")
        ax.set_title(f"{objective.upper()}: {name}")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="the SFT runs, {seed} standing for the seed: each has adapter/ and log")
    p.add_argument("--out", required=True, help="folder of the runs: <objective>-s<seed>/after.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--objectives", nargs="+", choices=("dpo", "grpo"), default=["dpo", "grpo"])
    p.add_argument("--no-run", action="store_true", help="print the table of the runs already done")
    p.add_argument("--chart", help="a PNG of the rewards and margins over the steps")
    p.add_argument("--set", action="append", default=[], metavar="OBJECTIVE.KEY=VALUE",
                   help="change one value of an objective's preset, e.g. dpo.lr=2e-4 (recorded in after.json)")
    args = p.parse_args(argv)
    changes: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        objective, _, name = key.partition(".")
        if objective not in ("dpo", "grpo") or name not in PRESETS[f"after-{objective}"]:
            p.error(f"--set {item}: expected dpo.KEY=VALUE or grpo.KEY=VALUE, KEY a key of the after-* preset")
        now = PRESETS[f"after-{objective}"][name]
        changes.setdefault(objective, {})[name] = type(now)(value) if now is not None else (
            int(value) if value.isdigit() else float(value))
    args.set = changes
    torch.set_num_threads(1)
    jobs = [(s, o) for s in args.seeds for o in args.objectives]
    if not args.no_run:
        run_missing(args, jobs)
    print(table(args, jobs))
    if args.chart:
        print(f"chart: {chart(args, jobs, args.chart)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
