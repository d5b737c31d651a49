"""Fine-tune a chat model on your own conversations with QLoRA: one command, any model the library loads.

    python examples/finetune.py                      # the embedded default: SmolLM2-135M-Instruct learns to price diamonds
    python examples/finetune.py --model ~/Qwen2.5-0.5B-Instruct --data train.jsonl --val val.jsonl --out runs/mine
    python examples/finetune.py --model model.gguf --data chats.jsonl --packing --max-len 1024
    torchrun --nproc-per-node 2 examples/finetune.py --parallel fsdp --model ... --data ...
    python examples/finetune.py --objective dpo --data pairs.jsonl   # preference tuning (examples/objectives.py)
    python examples/finetune.py --objective grpo --data prompts.jsonl --reward rewards.py:score   # reward tuning

The data: JSON Lines, one conversation a line, in any of three shapes (train/jsonl.py):
{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, or Alpaca's {"instruction",
"input", "output"}. Each conversation is written by the model's own chat template and the loss sees
the assistant's turns only (train/chat.py). A model without a template needs --chat-template chatml
or --chat-template FILE.jinja. With neither --model nor --data: the demo as a chat, the embedded
SmolLM2-135M-Instruct and the embedded diamonds as conversations (examples/pricer/chat.py), with the
demo's recipe (`PRESETS["demo"]`) and seed (0), whose held-out diamonds are priced before and after
training. Your data is read and checked with the model's tokenizer before the model itself is loaded.

Steps: load the base model (quantized to NF4 as it is read), read the conversations, wrap the target
modules in LoRA, show the replies to a few validation prompts, train (forward, loss on the assistant's
tokens, backward, AdamW step), show the replies again, save the adapter in PEFT's layout.

Writes under --out: checkpoint-<step>/ (every --save-every steps), adapter/ (the final adapter),
runs/<run name>/ (TensorBoard); with the embedded default also data/train.jsonl and data/val.jsonl,
the diamond conversations in the messages shape, ready for --data and --val.

SIGTERM or Ctrl-C finishes the step, writes a checkpoint and exits (143 or 130) with the command
that resumes; run it (the same flags plus --resume) to continue exactly where the run stopped.
A mistake in the flags or files (a bad JSONL line: `path:line: what is wrong`) prints
`error: <message>` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora, train) and the examples' packages

from cli import (add_recipe_flags, add_run_flags, fill_from_preset, is_main_process, run_command,  # noqa: E402
                 start_run, trained_model)
from lora import apply_lora, save_adapter, trainable_parameters  # noqa: E402
from model import CHATML, default_checkpoint, load_tokenizer  # noqa: E402
from objectives import DIAMOND_STEPS, add_objective_flags, diamond_rows, make_objective, user_rows  # noqa: E402
from pricer import (  # noqa: E402
    CHAT_DEMO, DiamondChat, answer_budget, base_dtype, chat_replies, constant_baseline, evaluate_chat_prices,
    load_diamond_chats, load_model, log_to_tensorboard, lora_config, results_table, split_items, split_record,
    train_config, write_chats_jsonl,
)
from train import Example, chat_example, load_chat_jsonl, read_jsonl_conversations, train  # noqa: E402

# Any model on your data: common QLoRA defaults (r 16, alpha 32, dropout 0.05, lr 2e-4), every projection
# of every layer.
GENERAL = dict(
    quant="nf4", double_quant=True, dtype=None, r=16, alpha=32, dropout=0.05, dora=False, target="all", layers="all", epochs=1, max_steps=None,
    batch_size=4, grad_accum=4, lr=2e-4, warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0, optimizer="adamw",
    max_len=1024, group_by_length=False, eval_every=None, save_every=500, keep_last=2, packing=False,
    overlong="truncate",
)
PRESETS = {"diamonds": CHAT_DEMO, "general": GENERAL}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF checkpoint folder or .gguf file [the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--data", help="training conversations, a .jsonl file in one of the three shapes "
                                  "[the embedded diamonds as a chat]")
    p.add_argument("--val", help="validation conversations (.jsonl): their loss is logged, the first few are "
                                 "the prompts shown before and after [none: the first of --data are shown]")
    p.add_argument("--out", default="runs/finetune",
                   help="folder for checkpoint-<step>/, adapter/ and runs/ [runs/finetune]")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="hyperparameters to start from; each flag given overrides its value [diamonds with neither "
                        "--model nor --data, else general]")
    p.add_argument("--chat-template", metavar="chatml|PATH.jinja",
                   help="the chat template, for a model without one (or to replace its own): ChatML by name, or a "
                        "Jinja file [the model's own]")
    tuned = add_recipe_flags(p, PRESETS, "tokens of a conversation, and of a packed row (0: no limit)")
    tuned("--packing", "fill rows of --max-len tokens with whole conversations (train/packing.py)",
          action=argparse.BooleanOptionalAction)
    tuned("--overlong", "a conversation longer than --max-len: cut to its first --max-len tokens, or left out",
          choices=("truncate", "skip"))
    p.add_argument("--grad-checkpointing", choices=("off", "on", "offload"), default="off",
                   help="recompute each decoder layer in the backward pass (on), its input kept in host memory "
                        "meanwhile (offload): what rows of many thousand tokens need [off]")
    diamonds = "the embedded diamonds only"
    p.add_argument("--train-size", type=int, default=CHAT_DEMO["train_size"],
                   help=f"training diamonds, 0: all that remain ({diamonds}) [{CHAT_DEMO['train_size']}]")
    p.add_argument("--val-size", type=int, default=CHAT_DEMO["val_size"],
                   help=f"validation diamonds, whose loss is logged ({diamonds}) [{CHAT_DEMO['val_size']}]")
    p.add_argument("--test-size", type=int, default=CHAT_DEMO["test_size"],
                   help=f"held-out diamonds priced before and after training ({diamonds}) [{CHAT_DEMO['test_size']}]")
    add_run_flags(p)
    p.add_argument("--samples", type=int, default=3, help="validation prompts whose replies are shown [3]")
    p.add_argument("--sample-tokens", type=int, default=48, help="new tokens at most in each reply shown [48]")
    p.add_argument("--eval-batch-size", type=int, default=100, help="prompts per generation batch [100]")
    add_objective_flags(p)
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "diamonds" if args.model is None and args.data is None else "general"
    for name in ("samples", "sample_tokens", "eval_batch_size"):
        if getattr(args, name) < (0 if name == "samples" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'samples' else 1}")
    preset = PRESETS[args.preset]
    if args.preset == "diamonds" and args.objective != "sft":
        preset = dict(preset, **DIAMOND_STEPS[args.objective])
    return fill_from_preset(args, preset)


def main(argv: list[str] | None = None) -> int:
    """Run the script; user errors become `error: <message>` and status 2, SIGTERM or Ctrl-C the
    command that resumes (examples/cli.py)."""
    return run_command(run, parse_args(argv), __file__, argv)


@dataclass
class RunData:
    """What a run trains on, and what it shows and scores before and after."""

    train: list[Example]
    val: list[Example]
    samples: list[list[dict]]                     # conversations whose last assistant turn is asked for
    samples_from: str                             # where they come from, as the printout says
    held_out: list[DiamondChat] = field(default_factory=list)   # the embedded default's scored diamonds
    baseline_prices: list[float] = field(default_factory=list)  # its training prices (the constant baseline)


def read_template(flag: str | None) -> str | None:
    """--chat-template: 'chatml' -> model.CHATML; a path -> the file's text."""
    if flag is None:
        return None
    if flag.lower() == "chatml":
        return CHATML
    if not os.path.isfile(flag):
        raise FileNotFoundError(f"--chat-template {flag}: no such file; expected 'chatml' or a Jinja template file")
    with open(flag, encoding="utf-8") as f:
        return f.read()


def use_template(tokenizer, template: str | None) -> None:
    """The flag's template, else the model's own; neither is the library's error, with the flag to give."""
    if template is not None:
        tokenizer.chat_template = template
        return
    try:
        tokenizer.render_chat([{"role": "user", "content": "?"}])
    except ValueError as e:
        raise ValueError(f"{e}. Here: --chat-template chatml or --chat-template FILE.jinja") from None


def user_data(args: argparse.Namespace, template: str | None) -> RunData:
    """--data and --val read by `train.load_chat_jsonl` (the template, labels on the assistant turns) with the
    model's tokenizer alone, before the model is loaded: a file with nothing to train on stops the run here."""
    tokenizer = load_tokenizer(args.model or default_checkpoint())
    use_template(tokenizer, template)
    data = {}
    for name in ("data", "val"):
        path = getattr(args, name)
        if path:
            data[name] = load_chat_jsonl(path, tokenizer, args.max_len, args.overlong)
            d = data[name]
            print(f"{path}: {len(d.examples):,} conversations, {d.truncated:,} cut to --max-len {args.max_len}, "
                  f"{d.skipped:,} left out")
            check_left(f"--{name}", path, d, args)
    shown = args.val or args.data
    samples = [c for _, (_, c) in zip(range(args.samples), read_jsonl_conversations(shown))]
    return RunData(data["data"].examples, data["val"].examples if "val" in data else [], samples,
                    f"the first {len(samples)} conversations of {shown}")


def check_left(flag: str, path: str, data, args: argparse.Namespace) -> None:
    """A file that leaves nothing to train on is the user's mistake, said in the command's terms: the file,
    the conversations read and left out, and the flag that left them out."""
    if data.examples:
        return
    if not data.skipped:
        raise ValueError(f"{flag} {path}: 0 conversations read (the file has no non-blank line): nothing to "
                         "train on; expected JSON Lines, one conversation a line")
    why = ("longer than that, with --overlong skip" if args.overlong == "skip" else
           "none keeps an assistant token within that many tokens")
    raise ValueError(f"{flag} {path}: {data.skipped:,} conversations read, all {data.skipped:,} left out by "
                     f"--max-len {args.max_len} ({why}): nothing to train on; raise --max-len")


def diamond_data(args: argparse.Namespace, tokenizer) -> RunData:
    """The embedded diamonds as a chat, split as `make demo` splits them (the default --seed and sizes are
    the demo's); written out as JSON Lines."""
    split = split_items(load_diamond_chats(), args.seed, args.test_size, args.val_size, args.train_size)
    print(f"diamonds as a chat (seed {args.seed}): {len(split.train):,} train, {len(split.val):,} validation, "
          f"{len(split.test):,} held out")
    if is_main_process():
        for name, chats in (("train", split.train), ("val", split.val)):
            print(f"wrote {write_chats_jsonl(chats, os.path.join(args.out, 'data', f'{name}.jsonl'))}")
    examples = [[chat_example(tokenizer, c.messages) for c in chats] for chats in (split.train, split.val)]
    samples = [c.messages for c in split.test[:args.samples]]
    return RunData(*examples, samples, f"the first {len(samples)} held-out diamonds", split.test,
                    [c.price for c in split.train])


def ask(conversation: list[dict]) -> tuple[list[dict], str]:
    """(the conversation before its last assistant turn, that turn's content): the prompt and the reference."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last], conversation[last].get("content") or ""


def show_replies(when: str, model, tokenizer, data: RunData, args: argparse.Namespace) -> None:
    """The model's replies to the sample prompts, through its chat template, beside the data's answers."""
    if not data.samples:
        return
    prompts, answers = zip(*(ask(c) for c in data.samples))
    replies = chat_replies(model, tokenizer, prompts, args.sample_tokens, args.eval_batch_size)
    print(f"replies {when} ({data.samples_from}):")
    for prompt, answer, reply in zip(prompts, answers, replies):
        print(f"  user:   {prompt[-1]['content'][:300]!r}\n  reply:  {reply[:300]!r}\n  data:   {answer[:300]!r}")


def score_diamonds(title: str, model, tokenizer, data: RunData, args: argparse.Namespace):
    """The held-out diamonds priced through the chat template (None without them)."""
    if not data.held_out:
        return None
    t0 = time.perf_counter()
    report, _ = evaluate_chat_prices(model, tokenizer, data.held_out, answer_budget(tokenizer, data.held_out),
                                     args.eval_batch_size)
    print(f"{title}: {len(data.held_out)} held-out diamonds: {report.title()} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    return report


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = start_run(args)
    config = train_config(args, device, args.out, args.seed, progress=not args.no_progress, compile=args.compile,
                          grad_checkpointing={"off": False, "on": True}.get(args.grad_checkpointing, "offload"),
                          parallel=args.parallel, packing=args.packing)
    for path in (args.data, args.val):  # before the slow load
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file (expected JSON Lines, one conversation a line)")
    template = read_template(args.chat_template)
    sft_file = args.objective == "sft" and args.data is not None   # read and checked before the slow load
    data = user_data(args, template) if sft_file else None
    model, tokenizer, model_path = load_model(args.model, args.quant, device, dtype=base_dtype(args, device),
                                              double_quant=args.double_quant)
    use_template(tokenizer, template)
    if args.objective == "sft" and data is None:
        data = diamond_data(args, tokenizer)
    elif args.data is None:  # the embedded diamonds as pairs or prompt rows; the held-out ones scored
        train_rows, val_rows, split = diamond_rows(args, load_diamond_chats())
        data = RunData(train_rows, val_rows, [c.messages for c in split.test[:args.samples]],
                       f"the first {min(args.samples, len(split.test))} held-out diamonds", split.test,
                       [c.price for c in split.train])
        args.max_new_tokens = args.max_new_tokens or answer_budget(tokenizer, split.train)
    elif data is None:
        data = RunData(*user_rows(args, tokenizer), [], "")
    objective = make_objective(args)

    apply_lora(model, lora_config(args, model, args.seed))
    print(trainable_parameters(model))
    show_replies("before training", model, tokenizer, data, args)
    before = score_diamonds("before training", model, tokenizer, data, args)

    result = train(model, tokenizer, data.train, data.val or None, config, resume=args.resume, objective=objective)
    losses = [loss for _, loss in result.train_losses]
    k = max(1, min(50, len(losses) // 4))
    print(f"training loss: {sum(losses[:k]) / k:.4f} over the first {k} steps, {sum(losses[-k:]) / k:.4f} over the "
          f"last {k} ({result.step} steps)" + (f"; validation loss {result.val_losses[-1][1]:.4f}"
                                                if result.val_losses else "")
          + ("\n  (GRPO's loss is about 0 by construction: each group's advantages are centred; its reward, "
             "below, is what rises)" if args.objective == "grpo" else ""))
    if result.metrics:  # DPO's rewards and margins, GRPO's reward: the first and the last steps
        first, last = result.metrics[0][1], result.metrics[-1][1]
        print("  ".join(f"{name} {first[name]:.4f} -> {last[name]:.4f}" for name in first))
    if (trained := trained_model(args, device, model, tokenizer, template)) is None:   # an FSDP rank other than 0
        return 0
    model, tokenizer = trained

    show_replies("after training", model, tokenizer, data, args)
    after = score_diamonds("after training", model, tokenizer, data, args)
    if after is not None:
        baseline = constant_baseline(data.baseline_prices, after.truths)
        print(results_table([("constant mean price", baseline), ("before training", before),
                             ("after training", after)]))
        if result.run_dir:
            log_to_tensorboard(after, result.run_dir, tag="diamonds", step=result.step, name="after training")
    adapter_dir = os.path.join(args.out, "adapter")
    if is_main_process():  # the record of what it trained on: the diamonds' split, or the user's files
        split = (split_record(None, "chat", args.seed, args.test_size, args.val_size, len(data.train))
                 if args.data is None else {"data": os.path.abspath(args.data),
                                            "val": args.val and os.path.abspath(args.val)})
        save_adapter(model, adapter_dir, base_model_name_or_path=model_path, split=split)
    print(f"adapter: {adapter_dir}\nTensorBoard: {result.run_dir}")
    print(f"total {(time.perf_counter() - start) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
