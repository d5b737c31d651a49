"""Fine-tune a model to read a product description and answer its price, with QLoRA.

    python examples/train_pricer.py                      # the demo: SmolLM2-135M, NF4 base, diamonds, CPU
    python examples/train_pricer.py --preset demo-full   # the slower demo: every attribute, half the layers
    python examples/train_pricer.py --preset llama31-8b --model ~/Llama-3.1-8B --data pricer_train.jsonl
    torchrun --nproc-per-node 2 examples/train_pricer.py --parallel fsdp ...   # the model sharded over 2 processes

Steps: load the base model (quantized to NF4 as it is read), read and split the data, wrap the
target modules in LoRA, score the test split, train (forward, loss on the answer, backward,
AdamW step), score the test split again, save the adapter in PEFT's layout and the chart.

Writes under --out: checkpoint-<step>/ (every --save-every steps), adapter/ (the final adapter),
runs/<run name>/ (TensorBoard) and pricer.png (truth against guess on the test split).

SIGTERM or Ctrl-C finishes the step, writes a checkpoint and exits (143 or 130) with the command
that resumes; run it (the same flags plus --resume) to continue exactly where the run stopped.
A mistake in the flags or files prints `error: <message>` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora, train) and the pricer package

import torch  # noqa: E402

from lora import LoRAConfig, apply_lora, load_adapter, save_adapter, trainable_parameters  # noqa: E402
from pricer import (  # noqa: E402
    DESCRIPTIONS, PRESETS, answer_tokens, constant_baseline, evaluate_prices, load_model, load_source,
    log_to_tensorboard, lora_config, parse_layers, print_report, resolve_device, results_table, save_scatter,
    split_items, compute_dtype, train_config,
)
from train import OPTIMIZERS, TrainingInterrupted, latest_checkpoint, train  # noqa: E402
from export_gguf import how_to_run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def tuned(flag: str, help: str, **kw) -> None:
        """A flag whose default comes from the preset; the help shows each preset's value."""
        key = flag[2:].replace("-", "_")
        values = "; ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items())
        p.add_argument(flag, help=f"{help} [{values}]", **kw)

    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="hyperparameters to start from; each flag given overrides its value [demo]")
    p.add_argument("--model", help="HF checkpoint folder or .gguf file [the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--data", help="meta_<Category>.jsonl[.gz] (Amazon Reviews 2023 metadata), a .jsonl/.csv "
                                  "with text and price, or 'diamonds' [the embedded diamonds]")
    p.add_argument("--out", default="runs/pricer",
                   help="folder for checkpoint-<step>/, adapter/, runs/ and pricer.png [runs/pricer]")
    tuned("--quant", "4-bit type of the frozen base weights", choices=("nf4", "fp4", "none"))
    tuned("--r", "LoRA rank: the inner dimension of A (r x in) and B (out x r)", type=int)
    tuned("--alpha", "LoRA scaling: the update is (alpha / r) B A x", type=float)
    tuned("--dropout", "dropout on the LoRA path's input", type=float)
    tuned("--target", "comma-separated module names to adapt, or 'all' (every projection of a decoder layer: "
                      "q, k, v, o, gate, up, down; Phi-3's fused qkv_proj and gate_up_proj)")
    p.add_argument("--dora", action="store_true", help="DoRA: train each output feature's length apart from "
                                                       "the direction of W0 + B A")
    tuned("--layers", "decoder layers to adapt: 'all', '15-' (15 to the last), '10-19' or '3,5,7'")
    tuned("--epochs", "passes over the training split, when --max-steps is not set", type=int)
    tuned("--max-steps", "optimizer steps; overrides --epochs (0: run the epochs)", type=int)
    tuned("--batch-size", "examples per micro-batch", type=int)
    tuned("--grad-accum", "micro-batches per optimizer step", type=int)
    tuned("--lr", "peak learning rate of the cosine schedule", type=float)
    tuned("--warmup-ratio", "share of the steps spent warming the learning rate up", type=float)
    tuned("--weight-decay", "AdamW weight decay", type=float)
    tuned("--max-grad-norm", "gradient clipping threshold", type=float)
    tuned("--optimizer", "the optimizer of the LoRA parameters",
          choices=OPTIMIZERS)
    tuned("--max-len", "tokens of prompt + answer; the prompt is cut from the left (0: no limit)", type=int)
    tuned("--description", "how a diamond is described: every attribute, or the four Cs alone",
          choices=tuple(DESCRIPTIONS))
    tuned("--train-size", "training items (0: all that remain after test and validation)", type=int)
    tuned("--val-size", "validation items, whose loss is logged", type=int)
    tuned("--test-size", "held-out items scored before and after training", type=int)
    tuned("--eval-every", "steps between validation losses (0: at the end only)", type=int)
    tuned("--save-every", "steps between checkpoints (0: none, only the final adapter)", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-<step>/ under --out")
    p.add_argument("--seed", type=int, default=42, help="seed of the split, the LoRA initialisation and the order [42]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto: cuda when there is one]")
    p.add_argument("--eval-batch-size", type=int, default=100, help="prompts per generation batch [100]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp copies the model to every process, fsdp shards it across them [ddp]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer: faster steps after a compile of about a minute")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():  # flags left unset take the preset's value
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("max_steps", "max_len", "train_size", "eval_every", "save_every"):  # 0 means "none"
        if getattr(args, key) == 0:
            setattr(args, key, None)
    return args


def resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run: the same flags, plus --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.relpath(os.path.abspath(__file__))
    script = script if not script.startswith("..") else os.path.abspath(__file__)  # short when run from the repo
    return shlex.join(["python", script] + argv + ([] if "--resume" in argv else ["--resume"]))


def main(argv: list[str] | None = None) -> int:
    """Run the script; user errors (bad flags, missing or broken files) become one line and status 2.

    The library reports bad input as ValueError or FileNotFoundError, always naming the flag, file
    or key; any other exception is a bug and keeps its traceback.
    """
    args = parse_args(argv)
    try:
        return run(args)
    except TrainingInterrupted as e:
        print(f"{e}; resume with: {resume_command(argv)}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    if args.preset == "llama31-8b" and args.model is None:
        raise ValueError("--preset llama31-8b needs --model, a local Llama-3.1-8B folder (config.json + safetensors)")
    # r, alpha and dropout checked before the slow load ("all" is known only once the model is)
    LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
               target_modules=("q_proj",) if args.target == "all" else tuple(args.target.split(",")))
    model, tokenizer, model_path = load_model(args.model, args.quant, device, dtype=compute_dtype(device))
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
    if args.parallel == "fsdp":  # each process now holds only its shards: rank 0 reloads the base and the adapter
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        model, tokenizer, _ = load_model(args.model, args.quant, device)
        load_adapter(model, latest_checkpoint(args.out))

    t0 = time.perf_counter()
    after = evaluate_prices(model, tokenizer, split.test, max_new, args.eval_batch_size)
    print(f"after training ({time.perf_counter() - t0:.0f}s):")
    print_report(after)
    baseline = constant_baseline([item.price for item in split.train], [item.price for item in split.test])
    print(f"\n{len(split.test)} held-out items\n" + results_table(
        [("constant mean price", baseline), ("before training", before), ("after training", after)]))

    adapter_dir = os.path.join(args.out, "adapter")
    save_adapter(model, adapter_dir, base_model_name_or_path=model_path)
    chart = save_scatter(after, os.path.join(args.out, "pricer.png"), name="after training")
    if result.run_dir:
        log_to_tensorboard(after, result.run_dir, step=result.step, name="after training")
    print(f"adapter: {adapter_dir}\nchart: {chart}\nTensorBoard: {result.run_dir}\n"
          f"total {(time.perf_counter() - start) / 60:.1f} minutes")
    gguf = os.path.join(args.out, "pricer.gguf")
    print(f"\nRun it in llama.cpp or Ollama (README: \"Run it in llama.cpp or Ollama\"):\n"
          f"  python examples/export_gguf.py --adapter {adapter_dir} --out {gguf} --type q8_0\n"
          + how_to_run(gguf, os.path.splitext(gguf)[0] + ".Modelfile", tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
