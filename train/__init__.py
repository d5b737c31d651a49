"""train: the explicit four-step loop (forward, loss, backward, AdamW step) with what a real run needs.

    from train import TrainConfig, train, evaluate, cosine_with_warmup, answer_loss
    result = train(model, tok, train_items, val_items, TrainConfig(epochs=1, out_dir="out", save_every=500))
    data = load_chat_jsonl("chats.jsonl", tok, max_len=1024)   # your own data: Examples, labels on the assistant
    train(model, tok, data.examples, None, TrainConfig(...))
"""
from .chat import assistant_spans, chat_example, check_conversation
from .checkpoint import (
    CheckpointSpaceError, latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint,
    verify_checkpoint,
)
from .config import OPTIMIZERS, TrainConfig
from .data import IGNORE_INDEX, Example, LengthBucketSampler, as_examples, build_examples, collate, epoch_batches
from .jsonl import ChatData, load_chat_jsonl, read_jsonl_conversations, to_conversation
from .loop import TrainResult, train, training_step
from .validation import evaluate
from .loss import answer_loss
from .optim import AdamW, make_optimizer
from .precision import LossScaler
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
]
