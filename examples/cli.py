"""What the training commands share: their flags, drawn from a recipe; one line for a user's mistake;
the command that resumes a stopped run.

    p = argparse.ArgumentParser(description=...)
    tuned = add_recipe_flags(p, PRESETS, max_len_help="...")   # --quant, --r, --alpha, ..., --save-every
    tuned("--test-size", "held-out items", type=int)           # a script's own flag with preset values
    add_run_flags(p)                                           # --resume, --seed, --device, ...
    args = p.parse_args(argv)
    fill_from_preset(args, PRESETS[args.preset])               # a flag left unset takes the preset's value
    sys.exit(run_command(run, args, __file__, argv))           # error: <message> and status 2; the resume line

A recipe (a preset) is a dict with one value per tuned flag (`examples/pricer/recipe.py`); each
flag's help lists every preset's value, so `--help` shows what a run will do.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable, Mapping

from lora import LoRAConfig, load_adapter
import torch

from pricer import DEMO_SEED, base_dtype, load_model, resolve_device
from train import OPTIMIZERS, TrainingInterrupted, latest_checkpoint

# a flag set to 0 means "none" (no step limit, no length limit, ...)
ZERO_IS_NONE = ("max_steps", "max_len", "train_size", "eval_every", "save_every")


def preset_flag(p: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]]) -> Callable[..., None]:
    """`tuned(flag, help, **kw)`: adds a flag whose default comes from the preset; its help lists each preset's value."""

    def tuned(flag: str, help: str, **kw) -> None:
        key = flag[2:].replace("-", "_")
        values = "; ".join(f"{name}: {preset[key]}" for name, preset in presets.items())
        p.add_argument(flag, help=f"{help} [{values}]", **kw)

    return tuned


def add_recipe_flags(p: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]],
                     max_len_help: str) -> Callable[..., None]:
    """The flags of a recipe, each defaulting to the preset's value: the quantized base, LoRA (rank, alpha,
    dropout, targets, layers, DoRA) and the optimization (steps, batches, learning rate, optimizer,
    length, validation and checkpoint intervals). Returns `tuned`, for the script's own such flags."""
    tuned = preset_flag(p, presets)
    tuned("--quant", "4-bit type of the frozen base weights", choices=("nf4", "fp4", "none"))
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None,
                   help="keep each 4-bit block's scale in fp32 instead of 8 bits (4.5 bits a weight, not 4.127)")
    tuned("--dtype", "dtype of the frozen base (None: fp32 on the CPU; on a GPU bf16, or fp16 where bf16 is missing)", choices=("float32", "bfloat16"))
    tuned("--r", "LoRA rank: the inner dimension of A (r x in) and B (out x r)", type=int)
    tuned("--alpha", "LoRA scaling: the update is (alpha / r) B A x", type=float)
    tuned("--dropout", "dropout on the LoRA path's input", type=float)
    tuned("--target", "comma-separated module names to adapt, or 'all' (every projection of a decoder layer: "
                      "q, k, v, o, gate, up, down; Phi-3's fused qkv_proj and gate_up_proj)")
    tuned("--dora", "DoRA: train each output feature's length apart from the direction of W0 + B A",
          action=argparse.BooleanOptionalAction)
    tuned("--layers", "decoder layers to adapt: 'all', '15-' (15 to the last), '10-19' or '3,5,7'")
    tuned("--epochs", "passes over the training data, when --max-steps is not set", type=int)
    tuned("--max-steps", "optimizer steps; overrides --epochs (0: run the epochs)", type=int)
    tuned("--batch-size", "examples per micro-batch (packed rows with --packing)", type=int)
    tuned("--grad-accum", "micro-batches per optimizer step", type=int)
    tuned("--lr", "peak learning rate of the cosine schedule", type=float)
    tuned("--warmup-ratio", "share of the steps spent warming the learning rate up", type=float)
    tuned("--weight-decay", "AdamW weight decay", type=float)
    tuned("--max-grad-norm", "gradient clipping threshold", type=float)
    tuned("--optimizer", "the optimizer of the LoRA parameters", choices=OPTIMIZERS)
    tuned("--max-len", max_len_help, type=int)
    tuned("--eval-every", "steps between validation losses (0: at the end only)", type=int)
    tuned("--save-every", "steps between checkpoints (0: none, only the final adapter)", type=int)
    return tuned


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """How a run goes, whatever the recipe: resuming, the seed, the device, the progress bar, torchrun, compile."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-<step>/ under --out")
    p.add_argument("--seed", type=int, default=DEMO_SEED,
                   help=f"seed of the split, the LoRA initialisation and the order [{DEMO_SEED}: the demo's]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto: cuda when there is one]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp copies the model to every process, fsdp shards it across them [ddp]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer: faster steps after a compile of about a minute")


def fill_from_preset(args: argparse.Namespace, preset: Mapping[str, Any]) -> argparse.Namespace:
    """Each flag left unset (None) takes the preset's value; then 0 means none for the ZERO_IS_NONE flags."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ZERO_IS_NONE:
        if getattr(args, key, None) == 0:
            setattr(args, key, None)
    return args


def resume_command(script: str, argv: list[str] | None) -> str:
    """The command line that continues this run: the same flags, plus --resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = os.path.abspath(script)
    short = os.path.relpath(path)
    return shlex.join(["python", short if not short.startswith("..") else path]  # short when run from the repo
                      + argv + ([] if "--resume" in argv else ["--resume"]))


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, script: str,
                argv: list[str] | None) -> int:
    """`run(args)`; user errors (bad flags, missing or broken files) become one line and status 2.

    The library reports bad input as ValueError or FileNotFoundError, always naming the flag, file
    or key; any other exception is a bug and keeps its traceback. SIGTERM or Ctrl-C during training
    (`train.TrainingInterrupted`): the checkpoint written and the command that resumes, exit 143 or 130.
    """
    try:
        return run(args)
    except TrainingInterrupted as e:
        print(f"{e}; resume with: {resume_command(script, argv)}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def start_run(args: argparse.Namespace) -> str:
    """What a run does before its slow load: seed torch, check the LoRA flags (r, alpha, dropout, the target
    names; 'all' is known only once the model is), and choose the device (`resolve_device`), returned."""
    torch.manual_seed(args.seed)
    LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
               target_modules=("q_proj",) if args.target == "all" else tuple(args.target.split(",")))
    return resolve_device(args.device)


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a run of one process."""
    return int(os.environ.get("RANK", "0")) == 0


def trained_model(args: argparse.Namespace, device: str, model, tokenizer, chat_template: str | None = None):
    """(model, tokenizer) to score and save after training, or None on a process that has no more to do.

    After DDP or one process: the trained model as it is. After FSDP each process holds only its shards:
    rank 0 reads the base model again (--model, --quant), loads the adapter of the last checkpoint under
    --out into it and gives the tokenizer `chat_template` when the run replaced the model's own; the
    other ranks get None."""
    if args.parallel != "fsdp":
        return model, tokenizer
    if not is_main_process():
        return None
    model, tokenizer, _ = load_model(args.model, args.quant, device, dtype=base_dtype(args, device),
                                     double_quant=args.double_quant)
    load_adapter(model, latest_checkpoint(args.out))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return model, tokenizer
