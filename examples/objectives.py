"""finetune.py's --objective: supervised (sft), preference (dpo) or reward (grpo) tuning, one loop for all.

    python examples/finetune.py --objective dpo                          # the embedded diamonds: pairs, chosen the true price
    python examples/finetune.py --objective dpo --data pairs.jsonl       # TRL's preference rows
    python examples/finetune.py --objective grpo                         # the embedded diamonds, rewarded by the price error
    python examples/finetune.py --objective grpo --data prompts.jsonl --reward my_rewards.py:score

DPO data: JSON Lines of {"prompt", "chosen", "rejected"}, each text or a list of messages (the chat
template writes them), or {"chosen", "rejected"} whose common start is the prompt (train/preference.py).
GRPO data: JSON Lines of {"prompt": text or messages, ...any fields}; --reward names a function in a
Python file, called as function(prompt, completion, **fields) -> float (train/rollout.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Callable

from pricer import split_items
from pricer import diamond_chat_pairs, diamond_chat_rows, price_reward
from train import DPO, GRPO, SFT, Objective, load_preference_jsonl, load_prompt_jsonl

OBJECTIVES = ("sft", "dpo", "grpo")
# What the embedded diamonds change in the diamonds preset for preference and reward tuning: fewer steps (a
# DPO step runs two rows a pair, a GRPO step samples group_size answers a prompt first) at a lower rate.
DIAMOND_STEPS = {"dpo": dict(max_steps=300, lr=5e-4), "grpo": dict(max_steps=100, lr=5e-4)}


def add_objective_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", choices=OBJECTIVES, default="sft",
                   help="sft: learn the answers; dpo: prefer the chosen completion to the rejected one; grpo: raise "
                        "the reward of sampled completions [sft]")
    p.add_argument("--reward", metavar="PATH.py:FUNCTION",
                   help="grpo: the reward, function(prompt, completion, **row) -> float [the embedded diamonds: the "
                        "price error's]")
    p.add_argument("--beta", type=float, help="dpo: how near the policy stays to the reference [0.1]; grpo: the KL "
                                              "weight [0.0]")
    p.add_argument("--sft-weight", type=float, default=0.0,
                   help="dpo: weight of the chosen completions' negative log-likelihood added to the loss [0]")
    p.add_argument("--group-size", type=int, default=4, help="grpo: completions sampled per prompt [4]")
    p.add_argument("--max-new-tokens", type=int,
                   help="grpo: new tokens at most per completion [the embedded diamonds: the longest answer's; else 32]")
    p.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature [1.0]")


def load_reward(spec: str) -> Callable:
    """'path.py:function' -> the function (ValueError or FileNotFoundError naming the flag)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--reward {spec}: expected PATH.py:FUNCTION")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--reward {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec}: {path} has no function {name!r}")
    return function


def make_objective(args: argparse.Namespace) -> Objective:
    """The --objective flags as the loop's Objective."""
    if args.objective == "dpo":
        return DPO(beta=0.1 if args.beta is None else args.beta, sft_weight=args.sft_weight)
    if args.objective == "grpo":
        if args.data is not None and args.reward is None:
            raise ValueError("--objective grpo --data FILE needs --reward PATH.py:FUNCTION, the reward of a completion")
        reward = load_reward(args.reward) if args.reward else price_reward
        return GRPO(rewards=reward, group_size=args.group_size, max_new_tokens=args.max_new_tokens or 32,
                    temperature=args.temperature, beta=0.0 if args.beta is None else args.beta)
    return SFT()


def user_rows(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """--data and --val read as the objective's rows: preference pairs, or prompt rows."""
    out = []
    for path in (args.data, args.val):
        if not path:
            out.append([])
        elif args.objective == "dpo":
            out.append(load_preference_jsonl(path, tokenizer, args.max_len))
        else:
            out.append(load_prompt_jsonl(path, tokenizer, args.max_len, args.max_new_tokens or 32))
        if path:
            print(f"{path}: {len(out[-1]):,} {'pairs' if args.objective == 'dpo' else 'prompts'}")
    return out[0], out[1]


def diamond_rows(args: argparse.Namespace, chats) -> tuple[list, list, object]:
    """The embedded diamonds as the objective's rows: (train rows, validation rows, the split), split as for sft."""
    split = split_items(chats, args.seed, args.test_size, args.val_size, args.train_size)
    make = diamond_chat_pairs if args.objective == "dpo" else diamond_chat_rows
    print(f"diamonds as a chat (seed {args.seed}): {len(split.train):,} train, {len(split.val):,} validation, "
          f"{len(split.test):,} held out, as {'pairs' if args.objective == 'dpo' else 'prompts'}")
    return make(split.train, args.seed), make(split.val, args.seed), split
