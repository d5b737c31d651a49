"""Score a model, with or without a trained adapter, on held-out items: the course's Tester.

    python examples/eval_pricer.py --adapter runs/pricer/adapter           # the demo's 200 held-out diamonds
    python examples/eval_pricer.py --adapter runs/pricer/adapter --top-k-average 3

The items are the first --n of the seed's shuffled order: the training script's test split, then
its validation split, never trained on. An adapter's `trained_on.json` gives the seed and the sizes
of its split: a --seed that disagrees, or an --n that reaches into its training items, is an error
(exit 2). Without an adapter (the base model) --seed picks the order [0, the demo's]. Prints the
first 20 items coloured by verdict, then error, RMSLE and hit rate beside a constant-mean baseline,
and writes the truth-vs-guess chart (PNG and TensorBoard). A mistake in the flags or files
prints `error: <message>` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora) and the pricer package


from cli import run_command  # noqa: E402
from lora import load_adapter, read_trained_on, recorded_checkpoint  # noqa: E402
from pricer import (  # noqa: E402
    DESCRIPTIONS, PRESETS, answer_tokens, constant_baseline, evaluate_prices, load_model, load_source,
    held_out, log_to_tensorboard, print_report, resolve_device, results_table, save_scatter,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF checkpoint folder or .gguf file [the adapter's base model when it exists "
                                   "here, else the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--adapter", help="a PEFT-layout adapter folder (adapter_config.json + "
                                     "adapter_model.safetensors) [none: score the base model]")
    p.add_argument("--data", help="as train_pricer.py: meta_<Category>.jsonl[.gz], a .jsonl/.csv with text and "
                                  "price, or 'diamonds' [the data the adapter recorded, else the embedded diamonds]")
    demo = PRESETS["demo"]["description"]
    p.add_argument("--description", choices=tuple(DESCRIPTIONS), default=demo,
                   help=f"how a diamond is described [the adapter's recorded one, else {demo}, the demo's]")
    p.add_argument("--n", type=int, default=200, help="items to score [200, the demo's held-out diamonds]")
    p.add_argument("--top-k-average", type=int, metavar="K",
                   help="price = probability-weighted average of the K most likely next tokens read as "
                        "numbers [greedy generation]")
    p.add_argument("--out", default="runs/pricer-eval",
                   help="folder for the chart and the TensorBoard events [runs/pricer-eval]")
    p.add_argument("--chart", help="PNG path of the truth-vs-guess chart [OUT/pricer.png]")
    p.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4",
                   help="4-bit type of the base weights; match the training run [nf4]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto: cuda when there is one]")
    p.add_argument("--batch-size", type=int, default=100, help="prompts per generation batch [100]")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens generated per answer [enough for the longest price in the data]")
    p.add_argument("--seed", type=int, help="seed of the shuffled order [the adapter's recorded seed; 0, the demo's, "
                                            "for the base model]")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.top_k_average is not None and args.top_k_average < 1:
        p.error(f"--top-k-average must be at least 1, got {args.top_k_average}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the script; user errors (bad flags, missing or broken files) become one line and status 2.

    The library reports bad input as ValueError or FileNotFoundError, naming the flag, file or key;
    any other exception is a bug and keeps its traceback.
    """
    return run_command(run, parse_args(argv), __file__, argv)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = resolve_device(args.device)
    record = (read_trained_on(args.adapter) or {}) if args.adapter else {}
    split = record.get("split")
    if split is not None:  # the seed, --n and --data checked against it before the slow load
        held_out([], args.n, args.seed, split, args.adapter, args.data)
    model_path = args.model or (recorded_checkpoint(args.adapter) if args.adapter else None)
    model, tokenizer, model_path = load_model(model_path, args.quant, device)
    if args.adapter:
        modules = load_adapter(model, args.adapter)
        print(f"adapter {args.adapter}: LoRA on {len(modules)} modules")

    data = args.data or (split or {}).get("data")  # the adapter's own data, unless told
    loaded = load_source(data, tokenizer, (split or {}).get("description", args.description))
    print(loaded.summary())
    items, rest = held_out(loaded.items, args.n, args.seed, split, args.adapter, args.data)
    max_new = args.max_new_tokens or answer_tokens(tokenizer, [item.price for item in loaded.items])

    t0 = time.perf_counter()
    report = evaluate_prices(model, tokenizer, items, max_new, args.batch_size, top_k=args.top_k_average)
    predictor = f"top-{args.top_k_average} average" if args.top_k_average else "greedy"
    print(f"{len(items)} items, {predictor} ({time.perf_counter() - t0:.0f}s):")
    print_report(report)
    rows = [("with adapter" if args.adapter else "base model", report)]
    if rest:
        rows.insert(0, ("constant mean price", constant_baseline([i.price for i in rest], report.truths)))
    print(results_table(rows))

    name = os.path.basename(os.path.normpath(args.adapter)) if args.adapter else "base model"
    chart = save_scatter(report, args.chart or os.path.join(args.out, "pricer.png"), name=name)
    log_to_tensorboard(report, os.path.join(args.out, "runs", f"eval-{datetime.now():%Y-%m-%d_%H-%M-%S}"), name=name)
    print(f"chart: {chart}\ntotal {(time.perf_counter() - start) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
