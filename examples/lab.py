"""The lectures' experiments, run to the end and repeated, on the embedded default (SmolLM2-135M, diamonds).

    python examples/lab.py rank        # r = 2 .. 64, with alpha = 2r and with alpha fixed at 16
    python examples/lab.py alpha       # r = 8 with alpha = 2 .. 64
    python examples/lab.py targets     # attention, MLP or all seven; the upper third, lower third or all layers
    python examples/lab.py qlora       # NF4, NF4 without double quantization, FP4, and the unquantized base
    python examples/lab.py epochs      # several epochs of a set small enough to memorise: the drops, validation
    python examples/lab.py nf4         # NF4 against FP4 and int4 on every real weight matrix; bits on disk and held
    python examples/lab.py seed        # same seed, same curves; another seed, other curves
    python examples/lab.py all --seeds 3 --jobs 2    # every experiment, then the report
    python examples/lab.py alpha rank --jobs 2       # several experiments, their runs in one queue
    python examples/lab.py report      # examples/LAB.md from the runs stored so far, nothing run

Every training run is the lab's base recipe (`PRESETS["lab"]`) with one or two values changed, trained
for all its steps, once per seed (0, 1, 2: the split, the LoRA initialisation and the order of the
examples); the runs of rank, alpha, targets and qlora are scored on the 200 held-out diamonds, those
of epochs are not (they watch the training and validation losses); each table row gives the mean and
the range of the seeds. Finished runs are stored in `<out>/runs/` and never run twice: a row shared by experiments runs
once, and an interrupted command picks up where it stopped. Before it starts, each command states
how long its runs will take, from measured CPU seconds per step.

Each experiment writes `<out>/<name>.png`, `<name>.json` and `<name>.md` (a fragment with the
command, machine, commit, cost, table and figure); `report` writes the training experiments' fragments
again from the runs stored so far (a row not finished says how many of its seeds are in), runs
nothing, and pastes each fragment between the `<!-- lab:<name> -->` markers of LAB.md, with the
lab's total (`<!-- lab:total -->`: runs, CPU hours, wall time, commits) and the page's first table,
each claim of the lectures beside what the runs found (`<!-- lab:claims -->`, examples/labclaims.py). `--tiny` runs every
experiment for a few steps on a few diamonds (with `--model`, a tiny checkpoint): the plumbing, in
seconds.
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import sys
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library, the pricer package and the lab's modules

import labepochs  # noqa: E402
from labclaims import claims  # noqa: E402
import labsweeps  # noqa: E402
from labkit import TINY, Budget, Lab, machine  # noqa: E402
from labruns import DEVICES, Estimate, RunSpec, load_result, stored_runs  # noqa: E402
from nf4lab import nf4  # noqa: E402

EXPERIMENTS = {"rank": labsweeps.rank, "alpha": labsweeps.alpha, "targets": labsweeps.targets,
               "qlora": labsweeps.qlora, "epochs": labepochs.epochs, "nf4": nf4, "seed": labepochs.seed}
# the runs each training experiment needs (nf4 and seed store none)
SPECS = {"rank": labsweeps.rank_specs, "alpha": labsweeps.alpha_specs, "targets": labsweeps.targets_specs,
         "qlora": labsweeps.qlora_specs, "epochs": labepochs.epochs_specs}


def plan(lab: Lab, names: list[str]) -> list[RunSpec]:
    """Every run the experiments `names` need, in their order, each once."""
    specs: dict[str, RunSpec] = {}
    for name in names:
        for spec in SPECS[name](lab) if name in SPECS else []:
            specs.setdefault(spec.key, spec)
    return list(specs.values())


def state_budget(lab: Lab, specs: list[RunSpec]) -> float:
    """Print, before anything runs, how many runs are left and how long they will take; return CPU s."""
    stored = stored_runs(specs, lab.out)
    todo = [s for s in specs if load_result(s, lab.out) is None]
    if lab.device != "cpu":   # the estimate measures CPU steps; a GPU's time is not estimated
        print(f"{len(specs)} runs, {len(stored)} stored, {len(todo)} to do on {lab.device}, {lab.jobs} at a time", flush=True)
        return 0.0
    estimate = Estimate(overhead_s=lab.budget.overhead_s)
    estimate.learn(stored)
    cpu = sum(estimate.cpu_s(s, labsweeps.steps_of(s.settings)) for s in todo)
    print(f"{len(specs)} runs, {len(stored)} stored, {len(todo)} to do: about {cpu / 3600:.1f} CPU hours "
          f"(measured CPU seconds per step times the steps, plus {estimate.overhead_s:.0f} s a run to load and "
          f"score); with --jobs {lab.jobs} about {cpu / max(1, lab.jobs) / 3600:.1f} hours if the cores are free",
          flush=True)
    return cpu


def total(lab: Lab) -> str:
    """`<out>/total.md`: what the whole lab's training runs took, from the stored runs (on the CPU: the
    CPU seconds of each run; on a GPU: the first start and the last end), and the commits they ran on."""
    specs = plan(lab, list(EXPERIMENTS))
    stored = {device: stored_runs(specs, lab.out, device) for device in DEVICES}
    done = sum(any(load_result(replace(s, device=d), lab.out) for d in DEVICES) for s in specs)
    lines = [f"The lab's training runs: {done} of {len(specs)} stored"
             + ("" if done == len(specs) else " (the rest not run yet; the same command runs them, resuming from the stored ones)") + "."]
    for device, runs in stored.items():
        if not runs:
            continue
        start = min(calendar.timegm(time.strptime(r["started"], "%Y-%m-%d %H:%M:%S")) for r in runs)
        end = max(calendar.timegm(time.strptime(r["started"], "%Y-%m-%d %H:%M:%S")) + r["wall_s"] for r in runs)
        span = (f"from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} to "
                f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(end))} UTC")
        commits = ", ".join(sorted({r["commit"] for r in runs}))
        if device == "cpu":
            cpu = sum(r["cpu_s"] for r in runs)
            lines.append(f"On the CPU, {len(runs)} runs: {cpu:,.0f} CPU seconds ({cpu / 3600:.1f} CPU hours: load, "
                         f"training and scoring, one torch thread a run), {span} (gaps included), on "
                         f"{machine(load=False)}; commit {commits}.")
        else:
            lines.append(f"On a GPU ({runs[0]['device']}, `--device cuda`, runs side by side), {len(runs)} runs: "
                         f"{(end - start) / 60:.0f} minutes {span}; commit {commits}.")
    lines += [whole_lab_on_cpu(lab, specs, stored["cpu"])] if stored["cpu"] else []
    for name in ("nf4", "seed"):   # they store no runs: the time their last command took
        path = os.path.join(lab.out, f"{name}.json")
        took = json.load(open(path)).get("took_s") if os.path.isfile(path) else None
        if took is not None:
            lines.append(f"`{name}` took {took / 60:.1f} minutes (one process).")
    path = os.path.join(lab.out, "total.md")
    with open(path + ".tmp", "w") as f:
        f.write(" ".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def whole_lab_on_cpu(lab: Lab, specs: list[RunSpec], cpu_runs: list[dict]) -> str:
    """What every training run would take on this machine alone: the CPU runs' measured seconds, and for
    each run stored only on a GPU its recipe's CPU seconds a step here (measured, `step_cpu.json`) times
    its steps, plus the CPU runs' mean seconds to load and score."""
    measured = sum(r["cpu_s"] for r in cpu_runs)
    scored = [r for r in cpu_runs if RunSpec(**r["spec"]).score]
    overhead = sum(r["cpu_s"] - r["cpu_s_per_step"] * r["steps"] for r in scored) / max(1, len(scored))
    per_step = lab._step_cpu() | {Estimate.cost_key(RunSpec(**r["spec"])): r["cpu_s_per_step"] for r in cpu_runs}
    missing = [replace(s, device="cpu") for s in specs if load_result(replace(s, device="cpu"), lab.out) is None]
    known = [s for s in missing if Estimate.cost_key(s) in per_step]
    estimated = sum(per_step[Estimate.cost_key(s)] * labsweeps.steps_of(s.settings) + overhead for s in known)
    total_h = (measured + estimated) / 3600
    unknown = (f"; {len(missing) - len(known)} runs not estimated (no step of their recipe measured here)"
               if len(known) < len(missing) else "")
    return (f"On this machine alone the lab's training runs would take about {total_h:.1f} CPU hours, about "
            f"{total_h / 2:.1f} hours with `--jobs 2` on its two cores: {len(cpu_runs)} runs measured here, "
            f"{len(known)} estimated from their recipe's CPU seconds a step measured here times their steps, plus "
            f"{overhead:.0f} s a run to load and score{unknown}.")


def report(out: str, page: str) -> str:
    """Paste each `<out>/<name>.md` fragment between `<!-- lab:<name> -->` and `<!-- /lab:<name> -->` of `page`
    (the experiments, then `total` and `claims`)."""
    with open(page) as f:
        text = f.read()
    for name in [*EXPERIMENTS, "total", "claims"]:
        path = os.path.join(out, f"{name}.md")
        body = open(path).read().strip() if os.path.isfile(path) else f"*Not run yet: `python examples/lab.py {name}`.*"
        pattern = re.compile(rf"(<!-- lab:{name} -->\n)(?:.*?\n)?(<!-- /lab:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{page}: no <!-- lab:{name} --> ... <!-- /lab:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    tmp = page + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, page)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", nargs="+", choices=[*EXPERIMENTS, "all", "report"],
                   help="one or more experiments (their runs share one queue), 'all', or 'report'")
    p.add_argument("--out", default=os.path.join(HERE, "lab"), help="folder for runs, figures and fragments [examples/lab]")
    p.add_argument("--page", default=os.path.join(HERE, "LAB.md"), help="the page `report` fills [examples/LAB.md]")
    p.add_argument("--model", help="HF folder or .gguf [the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of each row [3]")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one process and one torch thread each [1]")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the runs train; on cuda in the CPU's precision, stored as other runs [cpu]")
    p.add_argument("--tiny", action="store_true", help="a few steps on a few diamonds: the plumbing in seconds")
    p.add_argument("--plan", action="store_true", help="state the runs and their time, run nothing")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        print("error: --seeds and --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    flags = "".join(f" {flag} {value}" for flag, value in (("--model", args.model),
                                                           ("--out", args.out if argv is not None else None),
                                                           ("--device", args.device if args.device != "cpu" else None)) if value)
    lab = Lab(args.model, TINY if args.tiny else Budget(), args.out, seeds=tuple(range(args.seeds)), jobs=args.jobs,
              device=args.device,
              flags=flags + (" --tiny" if args.tiny else ""), stored_only="report" in args.experiment)
    if lab.stored_only:   # every training experiment's table from the runs stored so far
        for name in SPECS:
            EXPERIMENTS[name](lab)
        total(lab)
        claims(lab.out)
        print(f"wrote {report(args.out, args.page)}")
        return 0
    names = list(EXPERIMENTS) if "all" in args.experiment else list(dict.fromkeys(args.experiment))
    t0 = time.perf_counter()
    state_budget(lab, plan(lab, names))
    if args.plan:
        return 0
    lab.run(plan(lab, names))   # every run first, `jobs` at a time, in the experiments' order
    for name in names:
        EXPERIMENTS[name](lab)
    if "all" in args.experiment:
        total(lab)
        claims(lab.out)
        print(f"all experiments in {(time.perf_counter() - t0) / 60:.1f} minutes; wrote {report(args.out, args.page)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
