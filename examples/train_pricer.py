"""Fine-tune a model to read a product description and answer its price, with QLoRA.

    python examples/train_pricer.py                      # the demo (`make demo`): SmolLM2-135M, NF4 base, diamonds, seed 0
    python examples/train_pricer.py --preset demo-full   # the slower demo: every attribute, half the layers
    python examples/train_pricer.py --preset llama31-8b --model ~/Llama-3.1-8B --data pricer_train.jsonl
    torchrun --nproc-per-node 2 examples/train_pricer.py --parallel fsdp ...   # the model sharded over 2 processes
    python examples/train_pricer.py --after runs/pricer/adapter --objective dpo  # then learn from its own misses
    python examples/train_pricer.py --after runs/pricer/adapter --objective grpo # or from a reward on its answers

Steps: load the base model (quantized to NF4 as it is read), read and split the data, wrap the
target modules in LoRA, score the test split, train (forward, loss on the answer, backward,
AdamW step), score the test split again, save the adapter in PEFT's layout and the chart.

Writes under --out: checkpoint-<step>/ (every --save-every steps), adapter/ (the final adapter),
runs/<run name>/ (TensorBoard) and pricer.png (truth against guess on the test split).

--after ADAPTER --objective dpo|grpo starts from a trained pricer adapter (its recorded split: the same
held-out diamonds) and trains it further (examples/pricer/after.py): DPO on pairs from its misses on its
training diamonds (chosen: the true price, rejected: its answer), or GRPO with a reward from the price
error; the held-out diamonds are scored before and after, with the CPU seconds of each stage, into
--out/after.json.

SIGTERM or Ctrl-C finishes the step, writes a checkpoint and exits (143 or 130) with the command
that resumes; run it (the same flags plus --resume) to continue exactly where the run stopped.
A mistake in the flags or files prints `error: <message>` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora, train) and the pricer package

from cli import add_recipe_flags, add_run_flags, fill_from_preset, run_command, start_run, trained_model  # noqa: E402
from lora import apply_lora, load_adapter, save_adapter, trainable_parameters  # noqa: E402
from pricer import (  # noqa: E402
    DESCRIPTIONS, PRESETS, answer_tokens, base_dtype, constant_baseline, evaluate_greedy_and_top_k,
    evaluate_prices, load_model, load_source, log_to_tensorboard, lora_config, print_report, results_table,
    save_scatter, adapter_split, split_items, split_record, train_config, tune_after,
)
from train import train  # noqa: E402
from export_gguf import how_to_run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="hyperparameters to start from; each flag given overrides its value [demo; after-dpo or "
                        "after-grpo with --after]")
    p.add_argument("--model", help="HF checkpoint folder or .gguf file [the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--data", help="meta_<Category>.jsonl[.gz] (Amazon Reviews 2023 metadata), a .jsonl/.csv "
                                  "with text and price, or 'diamonds' [the embedded diamonds]")
    p.add_argument("--out", default="runs/pricer",
                   help="folder for checkpoint-<step>/, adapter/, runs/ and pricer.png [runs/pricer]")
    tuned = add_recipe_flags(p, PRESETS, "tokens of prompt + answer; the prompt is cut from the left (0: no limit)")
    tuned("--description", "how a diamond is described: every attribute, or the four Cs alone",
          choices=tuple(DESCRIPTIONS))
    tuned("--train-size", "training items (0: all that remain after test and validation)", type=int)
    tuned("--val-size", "validation items, whose loss is logged", type=int)
    tuned("--test-size", "held-out items scored before and after training", type=int)
    add_run_flags(p)
    p.add_argument("--eval-batch-size", type=int, default=100, help="prompts per generation batch [100]")
    p.add_argument("--top-k-average", type=int, default=3, metavar="K",
                   help="also score the trained model by the average of the K likeliest prices, weighted by "
                        "their probabilities (0: greedy only) [3]")
    add_after_flags(p)
    args = p.parse_args(argv)
    if args.top_k_average < 0:
        p.error(f"--top-k-average must be 0 (greedy only) or more, got {args.top_k_average}")
    if (args.after is None) != (args.objective == "sft"):
        p.error("--after ADAPTER goes with --objective dpo or grpo, and they with it")
    args.preset = args.preset or ("demo" if args.after is None else f"after-{args.objective}")
    return fill_from_preset(args, PRESETS[args.preset])


def add_after_flags(p: argparse.ArgumentParser) -> None:
    """--after and --objective, and the settings of the DPO or GRPO stage (their preset's values by default)."""
    p.add_argument("--after", metavar="ADAPTER", help="a trained pricer adapter (adapter/ of a run) to train further")
    p.add_argument("--objective", choices=("sft", "dpo", "grpo"), default="sft",
                   help="sft: learn the answers; with --after, dpo: prefer the true price to its own misses, grpo: "
                        "raise the reward of its sampled answers [sft]")
    p.add_argument("--tune-size", type=int, help="training diamonds the DPO or GRPO stage uses [after-dpo: "
                                                  f"{PRESETS['after-dpo']['tune_size']}; after-grpo: "
                                                  f"{PRESETS['after-grpo']['tune_size']}]")
    p.add_argument("--beta", type=float, help="DPO's beta; GRPO's KL weight [after-dpo: "
                                              f"{PRESETS['after-dpo']['beta']}; after-grpo: {PRESETS['after-grpo']['beta']}]")
    p.add_argument("--sft-weight", type=float, help="DPO: weight of the chosen answers' negative log-likelihood "
                                                    f"[{PRESETS['after-dpo']['sft_weight']}]")
    p.add_argument("--group-size", type=int, help="GRPO: answers sampled per diamond [4]")
    p.add_argument("--temperature", type=float, help="GRPO: sampling temperature [1.0]")


def main(argv: list[str] | None = None) -> int:
    """Run the script; user errors (bad flags, missing or broken files) become one line and status 2,
    SIGTERM or Ctrl-C the command that resumes (examples/cli.py)."""
    return run_command(run, parse_args(argv), __file__, argv)


def run(args: argparse.Namespace) -> int:
    if args.after is not None:
        return run_after(args)
    start = time.perf_counter()
    if args.preset == "llama31-8b" and args.model is None:
        raise ValueError("--preset llama31-8b needs --model, a local Llama-3.1-8B folder (config.json + safetensors)")
    device = start_run(args)
    model, tokenizer, model_path = load_model(args.model, args.quant, device, dtype=base_dtype(args, device),
                                              double_quant=args.double_quant)
    loaded = load_source(args.data, tokenizer, args.description)
    print(loaded.summary())
    split = split_items(loaded.items, args.seed, args.test_size, args.val_size, args.train_size)
    print(f"split (seed {args.seed}): {len(split.train):,} train, {len(split.val):,} validation, {len(split.test):,} test")

    apply_lora(model, lora_config(args, model, args.seed))
    print(trainable_parameters(model))

    max_new = answer_tokens(tokenizer, [item.price for item in split.train])
    t0 = time.perf_counter()
    before = evaluate_prices(model, tokenizer, split.test, max_new, args.eval_batch_size)
    print(f"before training: {before.title()} ({time.perf_counter() - t0:.0f}s)", flush=True)

    # runs are named by their start time
    config = train_config(args, device, args.out, args.seed, progress=not args.no_progress, compile=args.compile,
                          parallel=args.parallel)
    result = train(model, tokenizer, [(i.prompt, i.answer) for i in split.train],
                   [(i.prompt, i.answer) for i in split.val], config, resume=args.resume)
    if result.val_losses:
        print(f"validation loss {result.val_losses[-1][1]:.4f} after {result.step} steps")
    if (trained := trained_model(args, device, model, tokenizer)) is None:   # an FSDP rank other than 0
        return 0
    model, tokenizer = trained

    t0 = time.perf_counter()
    after, top = evaluate_greedy_and_top_k(model, tokenizer, split.test, max_new, args.top_k_average,
                                           args.eval_batch_size)
    print(f"after training ({time.perf_counter() - t0:.0f}s):")
    print_report(after)
    rows = [("after training", after)]
    if top is not None:
        rows.append((f"after training, top-{args.top_k_average} average", top))
    baseline = constant_baseline([item.price for item in split.train], [item.price for item in split.test])
    print(f"\n{len(split.test)} held-out items\n" + results_table(
        [("constant mean price", baseline), ("before training", before), *rows]))

    adapter_dir = os.path.join(args.out, "adapter")
    save_adapter(model, adapter_dir, base_model_name_or_path=model_path,
                 split=split_record(args.data, args.description, args.seed, args.test_size, args.val_size,
                                    len(split.train)))
    chart = save_scatter(after, os.path.join(args.out, "pricer.png"), name="after training")
    if result.run_dir:
        log_to_tensorboard(after, result.run_dir, step=result.step, name="after training")
    print(f"adapter: {adapter_dir}\nchart: {chart}\nTensorBoard: {result.run_dir}\n"
          f"total {(time.perf_counter() - start) / 60:.1f} minutes")
    gguf = os.path.join(args.out, "pricer.gguf")
    print(f"\nTake it away as one file, merged into the weights it trained on (f16; --type q8_0 or q4_k_m for "
          f"smaller ones; docs/export.md):\n  python examples/export_gguf.py --adapter {adapter_dir} --out {gguf}\n"
          "then\n"
          + how_to_run(gguf, os.path.splitext(gguf)[0] + ".Modelfile", tokenizer))
    return 0


def run_after(args: argparse.Namespace) -> int:
    """--after ADAPTER --objective dpo|grpo: the adapter scored, trained further, scored again, saved; on the
    split the adapter recorded, so the held-out diamonds are the ones it never trained on."""
    if not os.path.isdir(args.after):
        raise FileNotFoundError(f"--after {args.after}: no such adapter folder (a run's adapter/)")
    recorded = adapter_split(args.after, args.seed)
    if recorded:
        args.test_size, args.val_size, args.train_size = (recorded[k] for k in ("test_size", "val_size", "train_size"))
    device = start_run(args)
    model, tokenizer, model_path = load_model(args.model, args.quant, device, dtype=base_dtype(args, device),
                                              double_quant=args.double_quant)
    split = split_items(load_source(args.data, tokenizer, args.description).items, args.seed, args.test_size,
                        args.val_size, args.train_size)
    load_adapter(model, args.after)
    record = tune_after(model, tokenizer, split, vars(args), args.objective, args.out, args.seed, device,
                        not args.no_progress, args.eval_batch_size)
    save_adapter(model, os.path.join(args.out, "adapter"), base_model_name_or_path=model_path,
                 split=recorded or split_record(args.data, args.description, args.seed, args.test_size,
                                                args.val_size, len(split.train)))
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in record["cpu_s"].items())
    print(f"{args.objective.upper()} after {args.after}: hits {record['sft']['hits']:.1f}% -> "
          f"{record['after']['hits']:.1f}%, mean error ${record['sft']['error']:,.0f} -> ${record['after']['error']:,.0f} "
          f"({record['steps']} steps; CPU s: {cpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
