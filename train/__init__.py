"""train: the explicit four-step loop (forward, loss, backward, AdamW step) with what a real run needs.

    from train import TrainConfig, train, evaluate, cosine_with_warmup, answer_loss
    result = train(model, tok, train_items, val_items, TrainConfig(epochs=1, out_dir="out", save_every=500))
    data = load_chat_jsonl("chats.jsonl", tok, max_len=1024)   # your own data: Examples, labels on the assistant
    train(model, tok, data.examples, None, TrainConfig(...))
    train(model, tok, load_preference_jsonl("pairs.jsonl", tok), None, TrainConfig(...), objective=DPO(beta=0.1))
    train(model, tok, [{"prompt": "...", "price": 12}], None, TrainConfig(...), objective=GRPO(rewards=[reward]))
"""
from .chat import assistant_spans, chat_example, check_conversation
from .checkpoint import (
    CheckpointSpaceError, latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint,
    verify_checkpoint,
)
from .config import OPTIMIZERS, TrainConfig
from .data import IGNORE_INDEX, Example, LengthBucketSampler, as_examples, build_examples, collate, epoch_batches
from .dpo import DPO, PreferenceLoss, dpo_loss
from .grpo import GRPO, PolicyGradientLoss, grpo_advantages, grpo_loss
from .jsonl import ChatData, load_chat_jsonl, read_jsonl_conversations, to_conversation
from .loop import TrainResult, train, training_step
from .validation import evaluate
from .logps import sequence_logps, token_logps
from .loss import answer_loss
from .objective import SFT, Objective
from .optim import AdamW, make_optimizer
from .precision import LossScaler
from .preference import PreferencePair, load_preference_jsonl, preference_batch, preference_pairs
from .rollout import PromptRow, RewardError, load_prompt_jsonl, prompt_rows
from .schedule import cosine_with_warmup
from .signals import StopSignals, TrainingInterrupted
from .sharded_load import load_sharded

__all__ = [
    "TrainConfig", "OPTIMIZERS", "train", "evaluate", "TrainResult", "training_step", "cosine_with_warmup", "answer_loss",
    "AdamW", "make_optimizer",
    "build_examples", "as_examples", "collate", "epoch_batches", "LengthBucketSampler", "Example", "IGNORE_INDEX",
    "chat_example", "assistant_spans", "check_conversation", "load_chat_jsonl", "read_jsonl_conversations",
    "to_conversation", "ChatData",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "verify_checkpoint",
    "prune_checkpoints", "CheckpointSpaceError", "TrainingInterrupted", "StopSignals", "LossScaler", "load_sharded",
    "Objective", "SFT", "DPO", "GRPO", "dpo_loss", "grpo_advantages", "grpo_loss", "PreferenceLoss",
    "PolicyGradientLoss", "token_logps", "sequence_logps", "PreferencePair", "preference_pairs", "preference_batch",
    "load_preference_jsonl", "PromptRow", "prompt_rows", "load_prompt_jsonl", "RewardError",
]
