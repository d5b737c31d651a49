"""The training loop: the course's four steps, repeated over mini-batches and epochs.

    for each optimizer step:
        for each of grad_accum micro-batches:
            1. forward pass   the tokens through the network (the same thing as inference)
            2. loss           cross-entropy of each answer token's prediction: how wrong was it
            3. backward pass  the gradient of the loss for every LoRA parameter
        4. optimizer step     AdamW nudges each LoRA weight against its gradient; the lr follows the cosine

`training_step` is exactly that; `train` around it tokenizes, orders the data, evaluates, logs,
checkpoints and resumes.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import Example, as_examples, collate
from .distributed import (DistContext, all_gather_object, all_reduce_sum, setup_distributed, sync_gradients,
                          teardown_distributed)
from .fsdp import OPTIMIZER_DIR, even_eval_batches, gathered_trainable, load_optimizer, save_optimizer, wrap_model
from .log import RunLogger, default_run_name
from .loss import AnswerLossModule, answer_loss, answer_positions, unwrap
from .optim import make_optimizer
from .plan import DataPlan
from .precision import NO_SCALING, LossScaler
from .schedule import cosine_with_warmup
from .signals import StopSignals, TrainingInterrupted


@dataclass
class TrainResult:
    step: int                                          # optimizer steps done
    total_steps: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)   # (step, mean answer-token loss)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    out_dir: str | None = None
    run_dir: str | None = None                         # the TensorBoard folder
    skipped_items: int = 0                             # training items with no answer token to learn
    skipped_steps: int = 0                             # fp16: steps skipped because a gradient overflowed


def training_step(loss_module: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
                  optimizer: torch.optim.Optimizer, scheduler, params: list[nn.Parameter],
                  n_answer_tokens: int, ctx: DistContext, max_grad_norm: float | None,
                  autocast, step: int, scaler: LossScaler = NO_SCALING) -> tuple[float, float, float]:
    """One optimizer step over the micro-batches of this rank; returns (loss, grad_norm, lr).

    Each micro-batch holds input_ids and labels (B, T), and position_ids when packed. k accumulated
    micro-batches, on any number of ranks, give the gradient of one batch k times larger. fp16
    (`scaler`) multiplies the loss by S and divides the gradients back (train/precision.py);
    otherwise the scaler does nothing.
    """
    lr = optimizer.param_groups[0]["lr"]
    # The step's loss is the mean over the answer tokens of the whole step (all micro-batches, all
    # ranks), so each micro-batch's summed loss is divided by that count, not by its own. Two
    # micro-batches of token losses (2, 1, 3) and (1, 1, 1, 1, 1) sum to 6 and 5: 6/8 + 5/8 = 1.375,
    # the mean of the 8 token losses (and, as gradients add up in .grad, its gradient); (6/3 + 5/5) / 2
    # = 1.5 would weigh each token of the short micro-batch 5/3 times more. DDP and FSDP average the
    # ranks' gradients (a sum / world_size): × world_size makes that the sum over all rows.
    scale = ctx.world_size / n_answer_tokens
    loss_sum = torch.zeros((), device=ctx.device)
    for i, batch in enumerate(micro_batches):
        with sync_gradients(loss_module, now=i == len(micro_batches) - 1):  # all-reduce on the last one only
            with autocast():
                # 1. forward pass and 2. loss, in one call so DDP sees its own forward: the decoder
                #    turns the tokens into hidden states, the head runs at answer positions only, and
                #    the cross-entropy against each next token is summed (right padding needs no mask;
                #    packed rows' position ids mark where each example starts)
                loss = loss_module(batch["input_ids"], batch["labels"], position_ids=batch.get("position_ids"))
            # 3. backward pass: the gradients accumulate in each LoRA parameter's .grad. For a plain
            #    (un-adapted) head, LinearCrossEntropy already made the head's gradient, softmax − onehot,
            #    during step 2; here autograd only scales it and carries it back through the layers
            (scaler.scale(loss) * scale).backward()  # fp16: times the loss scale S as well
        loss_sum += loss.detach()
    mean_loss = all_reduce_sum(loss_sum, ctx).item() / n_answer_tokens
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"non-finite training loss ({mean_loss}) at step {step}; stopping before the update, "
                                 "so the last checkpoint saved stays the last good one")
    # 4. optimizer step: clip the gradient norm, AdamW update (train/optim.py), then the next learning rate
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    scaler.step(optimizer)  # fp16: skipped (and counted) when a gradient overflowed
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, float(grad_norm), lr


@torch.no_grad()
def _loss_totals(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device, autocast) -> tuple[float, int]:
    """(summed answer-token loss, number of answer tokens) over the batches, the model in eval mode."""
    model = unwrap(model)  # the model, or the AnswerLossModule around it (FSDP runs the pair as one)
    loss_sum = model if isinstance(model, AnswerLossModule) else (
        lambda i, l, position_ids: answer_loss(model, i, l, reduction="sum", position_ids=position_ids))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            position_ids = batch["position_ids"].to(device) if "position_ids" in batch else None
            with autocast():
                total += loss_sum(input_ids, labels, position_ids=position_ids).item()
            count += int(answer_positions(labels, position_ids).sum())
    finally:
        model.train(was_training)
    return total, count


def evaluate(model: nn.Module, batches_or_items, tokenizer=None, batch_size: int = 8, max_len: int | None = None,
             device: str | torch.device | None = None, autocast_dtype: torch.dtype | None = None,
             add_eos: bool = True) -> float:
    """Mean cross-entropy per answer token over a validation set.

    `batches_or_items`: (prompt, answer) string pairs (then `tokenizer` is required) or `Example`s
    (e.g. `chat_example`'s), or batch dicts with input_ids and labels (B, T) as `collate` makes them
    (and position_ids, packed rows as `collate_packed` makes them).
    """
    data = list(batches_or_items)
    if not data:
        raise ValueError("evaluate got no data: pass (prompt, answer) pairs or collated batches")
    device = device if device is not None else next(unwrap(model).parameters()).device
    if isinstance(data[0], dict):
        batches = data
    else:
        if tokenizer is None and not all(isinstance(x, Example) for x in data):
            raise ValueError("evaluate needs a tokenizer to turn (prompt, answer) pairs into token ids")
        examples, _ = as_examples(tokenizer, data, max_len, add_eos)
        batches = _eval_batches(examples, batch_size, _pad_id(tokenizer))
    total, count = _loss_totals(model, batches, device, _autocast(device, autocast_dtype))
    if count == 0:
        raise ValueError("evaluate: no answer tokens in the data")
    return total / count


def _eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths together: little padding
    return [collate(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def _pad_id(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value >= 0:
            return value
    return 0  # never attended by a real token nor labelled: any id will do


def _autocast(device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, tokenizer, train_items: Sequence[tuple[str, str] | Example],
          val_items: Sequence[tuple[str, str] | Example] | None, config: TrainConfig, resume: bool = False) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of `model` on (prompt, answer) pairs, or on `Example`s
    already tokenized (`train.chat_example`: labels on the assistant turns).

    The model arrives with LoRA applied (only its parameters require grad). Under torchrun the same
    call trains with DistributedDataParallel, or with `parallel="fsdp"` sharded by FSDP2 (train/fsdp.py;
    the model then stays sharded: the gathered adapter is in the last checkpoint). `resume=True`
    continues from the newest complete `<out_dir>/checkpoint-<step>/` that passes its manifest.

    SIGTERM or SIGINT during the run: the step in flight finishes, a checkpoint is written (with
    out_dir), and `TrainingInterrupted` is raised (train/signals.py).
    """
    ctx = setup_distributed(config.device)
    try:
        return _train(model, tokenizer, train_items, val_items, config, resume, ctx)
    finally:
        teardown_distributed(ctx)


def _train(model, tokenizer, train_items, val_items, config: TrainConfig, resume: bool, ctx: DistContext) -> TrainResult:
    train_items = list(train_items)
    if not train_items:
        raise ValueError("train_items is empty: pass a list of (prompt, answer) string pairs or Examples")
    if resume and config.out_dir is None:
        raise ValueError("resume=True needs config.out_dir, the folder holding checkpoint-<step>/")
    _seed_everything(config.seed)
    examples, skipped = as_examples(tokenizer, train_items, config.max_len, config.add_eos)
    if not examples:
        raise ValueError(f"none of the {len(train_items)} training items has an answer token to train on")
    val_examples = as_examples(tokenizer, val_items, config.max_len, config.add_eos)[0] if val_items else []
    pad_id = _pad_id(tokenizer)
    plan = DataPlan(examples, config, ctx.world_size, pad_id)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    warmup = config.warmup_for(total_steps)

    model.to(ctx.device)
    if config.grad_checkpointing:
        model.set_gradient_checkpointing(config.grad_checkpointing)
    if config.compile:  # fused norms, RoPE and SwiGLU; the first steps pay for compiling
        unwrap(model).compile_layers()
    model.train()

    state = None
    if resume:
        path = latest_checkpoint(config.out_dir)  # the newest that passes its manifest
        if path is None:
            raise ValueError(f"resume=True but {config.out_dir} holds no complete checkpoint-<step>/ folder")
        state = load_checkpoint(path, model, verify=False)
        if state["total_steps"] != total_steps:
            warnings.warn(f"{path} was saved by a run of {state['total_steps']} steps; this one has {total_steps}")

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: apply LoRA first (lora.apply_lora)")
    loss_module = wrap_model(AnswerLossModule(model), ctx, config.parallel)  # DDP, or FSDP's shards
    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    min_ratio = config.min_lr_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, 1.0, min_ratio))
    scaler = LossScaler(config.autocast_dtype == torch.float16, ctx.device, config.fp16_init_scale,
                        config.fp16_growth_interval)
    step, train_losses, val_losses = 0, [], []
    run_name = config.run_name or default_run_name()
    if state is not None:
        load_optimizer(loss_module, optimizer, state, path, config.parallel)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        train_losses = [tuple(x) for x in state["train_losses"]]
        val_losses = [tuple(x) for x in state["val_losses"]]
        run_name = config.run_name or state["run_name"]
        scaler.load_state_dict(state.get("loss_scaler", {}))
        rngs = state["rng"]  # one per rank: each process continues its own dropout stream
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])

    autocast = _autocast(ctx.device, config.autocast_dtype)
    val_shard = val_examples[ctx.rank::ctx.world_size]
    logger = RunLogger(config.out_dir, run_name, total_steps, step, config.summary(), config.progress, ctx.is_main)

    def run_eval() -> None:
        batches = _eval_batches(val_shard, config.batch_size, pad_id)
        if config.parallel == "fsdp":  # every forward is a collective: the same count on every rank
            batches = even_eval_batches(batches, ctx, collate(val_examples[:1], pad_id))
        total, count = _loss_totals(loss_module, batches, ctx.device, autocast) if batches else (0.0, 0)
        if config.parallel == "fsdp":  # the root stays gathered after a forward without backward: free it
            loss_module.reshard()
        t = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device), ctx)
        val_losses.append((step, t[0].item() / max(t[1].item(), 1.0)))
        logger.log_eval(step, val_losses[-1][1])

    def save() -> str:
        path = os.path.join(config.out_dir, f"checkpoint-{step}")
        if checkpoint == path:  # this step is saved already (a signal right after save_every)
            return path
        rngs = all_gather_object(rng_state(), ctx)
        sharded, move_in = config.parallel == "fsdp", {}
        if sharded:  # every rank writes its optimizer shard; rank 0 moves the folder into the checkpoint
            move_in[OPTIMIZER_DIR] = os.path.join(config.out_dir, f".{OPTIMIZER_DIR}-{step}.tmp")
            save_optimizer(loss_module, optimizer, move_in[OPTIMIZER_DIR], ctx)
        with gathered_trainable(model) if sharded else nullcontext():  # the full adapter, once, PEFT's layout
            if ctx.is_main:
                epoch, k = divmod(step, plan.steps_per_epoch)
                save_checkpoint(config.out_dir, step, unwrap(model), {
                    "step": step, "epoch": epoch, "step_in_epoch": k, "total_steps": total_steps, "warmup_steps": warmup,
                    **({} if sharded else {"optimizer": optimizer.state_dict()}), "scheduler": scheduler.state_dict(),
                    "rng": rngs, "train_losses": [list(x) for x in train_losses], "val_losses": [list(x) for x in val_losses],
                    "run_name": run_name, "world_size": ctx.world_size, "parallel": config.parallel,
                    "loss_scaler": scaler.state_dict(),
                }, config.keep_last, move_in)
                logger.flush()
        all_reduce_sum(torch.zeros((), device=ctx.device), ctx)  # a barrier: no rank exits before the save is done
        return path

    stop, stopped, checkpoint = StopSignals().install(), 0, None  # SIGTERM/SIGINT: finish the step, save, stop
    try:
        while step < total_steps:
            micro_rows = plan.step_batches(step)  # micro-batches -> rows -> example indices
            step_examples = [examples[i] for mb in micro_rows for row in mb for i in row]
            n_answer_tokens = sum(e.n_answer_tokens for e in step_examples)
            n_tokens = sum(len(e.input_ids) for e in step_examples)
            micro_batches = [{k: v.to(ctx.device, non_blocking=True) for k, v in plan.collate(mb[ctx.rank::ctx.world_size]).items()}
                             for mb in micro_rows]  # each rank its share of the rows
            t0 = time.perf_counter()
            loss, grad_norm, lr = training_step(loss_module, micro_batches, optimizer, scheduler, params,
                                                n_answer_tokens, ctx, config.max_grad_norm, autocast, step + 1, scaler)
            step += 1
            train_losses.append((step, loss))
            logger.log_step(step, loss, lr, grad_norm, n_tokens / (time.perf_counter() - t0),
                            write=step % config.log_every == 0 or step == total_steps)
            if val_examples and (
                    (config.eval_every and step % config.eval_every == 0) or step == total_steps):
                run_eval()
            last = step == total_steps and (config.save_every or config.parallel == "fsdp")  # FSDP: the adapter
            if last or (config.save_every and step % config.save_every == 0):
                checkpoint = save()
            stopped = stop.agreed(ctx)  # a signal: every rank stops after this same step
            if stopped:
                checkpoint = save() if config.out_dir else None
                break
    finally:
        logger.close({"hparam/final_eval_loss": val_losses[-1][1]} if val_losses and step == total_steps else None)
        stop.restore()
    if stopped:  # also after the last step: the caller asked to stop, and may resume to finish its work
        raise TrainingInterrupted(stopped, step, total_steps, checkpoint)
    return TrainResult(step, total_steps, train_losses, val_losses, config.out_dir, logger.run_dir, skipped,
                       scaler.skipped)
