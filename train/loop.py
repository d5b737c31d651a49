"""The training loop: the course's four steps, repeated over mini-batches and epochs.

    for each optimizer step:
        (GRPO: 0. sampling step: G completions of each prompt from the model as it is, and their rewards)
        for each of grad_accum micro-batches:
            1. forward pass   the tokens through the network (the same thing as inference)
            2. loss           cross-entropy of each answer token's prediction: how wrong was it
                              (DPO: the preference loss of each pair; GRPO: the clipped policy gradient)
            3. backward pass  the gradient of the loss for every LoRA parameter
        4. optimizer step     AdamW nudges each LoRA weight against its gradient; the lr follows the cosine

`training_step` is exactly that; `train` around it tokenizes, orders the data, evaluates, logs,
checkpoints and resumes, in named steps (`_prepare`, `_restore`, `_one_step`, `_evaluate`, `_save`).
What differs between supervised, preference and reward tuning lives in an `Objective` (train/objective.py).
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import (DistContext, all_gather_object, all_reduce_sum, setup_distributed, sync_gradients,
                          teardown_distributed)
from .fsdp import OPTIMIZER_DIR, gathered_trainable, load_optimizer, save_optimizer, wrap_model
from .log import RunLogger, default_run_name
from .loss import unwrap
from .objective import SFT, Objective
from .optim import make_optimizer
from .plan import DataPlan
from .precision import NO_SCALING, LossScaler
from .schedule import cosine_with_warmup
from .signals import StopSignals, TrainingInterrupted
from .validation import autocast_context, pad_id_of


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
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)      # DPO's rewards, GRPO's...
    val_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def training_step(loss_module: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
                  optimizer: torch.optim.Optimizer, scheduler, params: list[nn.Parameter],
                  n_items: int, ctx: DistContext, max_grad_norm: float | None,
                  autocast, step: int, scaler: LossScaler = NO_SCALING) -> tuple[float, float, float]:
    """One optimizer step over the micro-batches of this rank; returns (loss, grad_norm, lr).

    Each micro-batch is the keyword arguments of `loss_module`: input_ids and labels (B, T), and
    position_ids when packed (SFT); the loss module returns its loss summed over what the step's loss
    is a mean over, `n_items` of them in the whole step: answer tokens (SFT, GRPO's completion
    tokens) or pairs (DPO). k accumulated micro-batches, on any number of ranks, give the gradient of
    one batch k times larger. fp16 (`scaler`) multiplies the loss by S and divides the gradients back
    (train/precision.py); otherwise the scaler does nothing.
    """
    lr = optimizer.param_groups[0]["lr"]
    # The step's loss is the mean over the answer tokens (DPO: pairs) of the whole step (all micro-batches,
    # all ranks), so each micro-batch's summed loss is divided by that count, not by its own. Two
    # micro-batches of token losses (2, 1, 3) and (1, 1, 1, 1, 1) sum to 6 and 5: 6/8 + 5/8 = 1.375,
    # the mean of the 8 token losses (and, as gradients add up in .grad, its gradient); (6/3 + 5/5) / 2
    # = 1.5 would weigh each token of the short micro-batch 5/3 times more. DDP and FSDP average the
    # ranks' gradients (a sum / world_size): × world_size makes that the sum over all rows.
    scale = ctx.world_size / n_items
    loss_sum = torch.zeros((), device=ctx.device)
    for i, batch in enumerate(micro_batches):
        with sync_gradients(loss_module, now=i == len(micro_batches) - 1):  # all-reduce on the last one only
            with autocast():
                # 1. forward pass and 2. loss, in one call so DDP sees its own forward: the decoder
                #    turns the tokens into hidden states, the head runs at answer positions only, and
                #    the cross-entropy against each next token is summed (right padding needs no mask;
                #    packed rows' position ids mark where each example starts). DPO: each pair's loss
                #    from the log-probabilities of its chosen and rejected rows (train/dpo.py); GRPO:
                #    each sampled token's clipped policy-gradient loss (train/grpo.py)
                loss = loss_module(**batch)
            # 3. backward pass: the gradients accumulate in each LoRA parameter's .grad. For a plain
            #    (un-adapted) head, LinearCrossEntropy already made the head's gradient, softmax − onehot,
            #    during step 2; here autograd only scales it and carries it back through the layers
            (scaler.scale(loss) * scale).backward()  # fp16: times the loss scale S as well
        loss_sum += loss.detach()
    mean_loss = all_reduce_sum(loss_sum, ctx).item() / n_items
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, tokenizer, train_items: Sequence, val_items: Sequence | None, config: TrainConfig,
          resume: bool = False, objective: Objective | None = None) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of `model` on (prompt, answer) pairs, or on `Example`s
    already tokenized (`train.chat_example`: labels on the assistant turns).

    `objective`: `SFT()` (None, the default), `DPO(...)` (the items are preference rows, train/dpo.py) or
    `GRPO(rewards=...)` (the items are prompt rows, train/grpo.py): the same loop, another step 2.

    The model arrives with LoRA applied (only its parameters require grad). Under torchrun the same
    call trains with DistributedDataParallel, or with `parallel="fsdp"` sharded by FSDP2 (train/fsdp.py;
    the model then stays sharded: the gathered adapter is in the last checkpoint). `resume=True`
    continues from the newest complete `<out_dir>/checkpoint-<step>/` that passes its manifest.

    SIGTERM or SIGINT during the run: the step in flight finishes, a checkpoint is written (with
    out_dir), and `TrainingInterrupted` is raised (train/signals.py).
    """
    ctx = setup_distributed(config.device)
    try:
        return _train(model, tokenizer, train_items, val_items, config, resume, ctx, objective or SFT())
    finally:
        teardown_distributed(ctx)


@dataclass
class RunState:
    """What a run has done so far: written into each checkpoint, read back on resume."""

    step: int = 0                                      # optimizer steps done
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    val_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    run_name: str = ""
    checkpoint: str | None = None                      # the last checkpoint this run wrote


@dataclass
class Run:
    """What a run is made of, built once before its first step and never changed by a step."""

    model: nn.Module
    config: TrainConfig
    ctx: DistContext
    objective: Objective
    examples: list                                     # the objective's units: Examples, pairs or prompts
    val_examples: list
    skipped: int                                       # training items with no answer token
    plan: DataPlan
    total_steps: int
    warmup: int
    pad_id: int
    autocast: Callable
    loss_module: nn.Module | None = None               # what the step calls: the loss around the model
    params: list[nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    scaler: LossScaler = NO_SCALING
    logger: RunLogger | None = None


def _train(model, tokenizer, train_items, val_items, config: TrainConfig, resume: bool, ctx: DistContext,
           objective: Objective) -> TrainResult:
    run = _prepare(model, tokenizer, train_items, val_items, config, resume, ctx, objective)
    saved = _resume_point(run) if resume else None     # the adapter goes in before DDP/FSDP wraps the model
    _build_optimization(run)
    state = _restore(run, *saved) if saved else RunState(run_name=config.run_name or default_run_name())
    objective.begin(run, saved[1] if saved else None)  # DPO: the reference's log-probabilities, once
    run.logger = RunLogger(config.out_dir, state.run_name, run.total_steps, state.step,
                           {**config.summary(), **objective.summary()}, config.progress, ctx.is_main)
    stop, stopped = StopSignals().install(), 0  # SIGTERM/SIGINT: finish the step, save, stop
    try:
        while state.step < run.total_steps:
            _one_step(run, state)
            last = state.step == run.total_steps
            if run.val_examples and ((config.eval_every and state.step % config.eval_every == 0) or last):
                _evaluate(run, state)
            if (last and (config.save_every or config.parallel == "fsdp")) or (  # FSDP: the adapter
                    config.save_every and state.step % config.save_every == 0):
                state.checkpoint = _save(run, state)
            stopped = stop.agreed(ctx)  # a signal: every rank stops after this same step
            if stopped:
                state.checkpoint = _save(run, state) if config.out_dir else None
                break
    finally:
        done = state.val_losses and state.step == run.total_steps
        run.logger.close({"hparam/final_eval_loss": state.val_losses[-1][1]} if done else None)
        stop.restore()
    if stopped:  # also after the last step: the caller asked to stop, and may resume to finish its work
        raise TrainingInterrupted(stopped, state.step, run.total_steps, state.checkpoint)
    return TrainResult(state.step, run.total_steps, state.train_losses, state.val_losses, config.out_dir,
                       run.logger.run_dir, run.skipped, run.scaler.skipped, state.metrics, state.val_metrics)


def _prepare(model, tokenizer, train_items, val_items, config: TrainConfig, resume: bool, ctx: DistContext,
             objective: Objective) -> Run:
    """Check the inputs, tokenize, plan the steps, and put the model on its device in training mode."""
    train_items = list(train_items)
    if not train_items:
        raise ValueError(f"train_items is empty: pass a list of {objective.items}")
    if resume and config.out_dir is None:
        raise ValueError("resume=True needs config.out_dir, the folder holding checkpoint-<step>/")
    if objective.name != "sft" and (config.packing or config.parallel == "fsdp"):
        raise ValueError(f"objective {objective.name}: packing and parallel='fsdp' are for sft only; use "
                         "packing=False and parallel='ddp'")
    _seed_everything(config.seed)
    examples, skipped = objective.units(tokenizer, train_items, config, "train")
    if not examples:
        raise ValueError(f"none of the {len(train_items)} training items has an answer token to train on")
    val_examples = objective.units(tokenizer, val_items, config, "val")[0] if val_items else []
    pad_id = pad_id_of(tokenizer)
    plan = DataPlan(examples, config, ctx.world_size, pad_id)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    model.to(ctx.device)
    if config.grad_checkpointing:
        model.set_gradient_checkpointing(config.grad_checkpointing)
    if config.compile:  # fused norms, RoPE and SwiGLU; the first steps pay for compiling
        unwrap(model).compile_layers()
    model.train()
    return Run(model, config, ctx, objective, examples, val_examples, skipped, plan, total_steps,
               config.warmup_for(total_steps), pad_id, autocast_context(ctx.device, config.autocast_dtype))


def _resume_point(run: Run) -> tuple[str, dict]:
    """The newest checkpoint that passes its manifest: its adapter loaded into the model, its training state."""
    path = latest_checkpoint(run.config.out_dir)
    if path is None:
        raise ValueError(f"resume=True but {run.config.out_dir} holds no complete checkpoint-<step>/ folder")
    saved = load_checkpoint(path, run.model, verify=False)
    if saved["total_steps"] != run.total_steps:
        warnings.warn(f"{path} was saved by a run of {saved['total_steps']} steps; this one has {run.total_steps}")
    return path, saved


def _build_optimization(run: Run) -> None:
    """The loss module (DDP or FSDP around the model), AdamW over the trainable parameters, the cosine
    schedule as a multiplier of the base learning rate, and fp16's loss scaler."""
    config, ctx = run.config, run.ctx
    if not any(p.requires_grad for p in run.model.parameters()):
        raise ValueError("the model has no trainable parameters: apply LoRA first (lora.apply_lora)")
    run.loss_module = wrap_model(run.objective.loss_module(run.model), ctx, config.parallel)  # DDP, or FSDP's shards
    run.params = [p for p in run.loss_module.parameters() if p.requires_grad]
    run.optimizer = make_optimizer(run.params, config)
    total_steps, warmup, min_ratio = run.total_steps, run.warmup, config.min_lr_ratio
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, 1.0, min_ratio))
    run.scaler = LossScaler(config.autocast_dtype == torch.float16, ctx.device, config.fp16_init_scale,
                            config.fp16_growth_interval)


def _restore(run: Run, path: str, saved: dict) -> RunState:
    """Optimizer moments, schedule, loss scale and random-number states as the checkpoint left them."""
    load_optimizer(run.loss_module, run.optimizer, saved, path, run.config.parallel)
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved.get("loss_scaler", {}))
    rngs = saved["rng"]  # one per rank: each process continues its own dropout stream
    set_rng_state(rngs[run.ctx.rank] if len(rngs) == run.ctx.world_size else rngs[0])
    return RunState(saved["step"], [tuple(x) for x in saved["train_losses"]], [tuple(x) for x in saved["val_losses"]],
                    [tuple(x) for x in saved.get("metrics", [])], [tuple(x) for x in saved.get("val_metrics", [])],
                    run.config.run_name or saved["run_name"])


def _one_step(run: Run, state: RunState) -> None:
    """The rows of this step (`DataPlan`) as the objective's micro-batches on the device (GRPO: sampled
    here), through `training_step`; logged."""
    micro_rows = run.plan.step_batches(state.step)  # micro-batches -> rows -> unit indices
    micro_batches, n_items, n_tokens = run.objective.batches(run, micro_rows, state.step)
    t0 = time.perf_counter()
    loss, grad_norm, lr = training_step(run.loss_module, micro_batches, run.optimizer, run.scheduler, run.params,
                                        n_items, run.ctx, run.config.max_grad_norm, run.autocast, state.step + 1,
                                        run.scaler)
    state.step += 1
    state.train_losses.append((state.step, loss))
    metrics = run.objective.metrics(run)
    if metrics:
        state.metrics.append((state.step, metrics))
    run.logger.log_step(state.step, loss, lr, grad_norm, n_tokens / (time.perf_counter() - t0),
                        write=state.step % run.config.log_every == 0 or state.step == run.total_steps, metrics=metrics)


def _evaluate(run: Run, state: RunState) -> None:
    """The objective's validation loss and metrics over every rank's share of the validation data, logged."""
    loss, metrics = run.objective.validate(run)
    if loss is not None:
        state.val_losses.append((state.step, loss))
    if metrics:
        state.val_metrics.append((state.step, metrics))
    run.logger.log_eval(state.step, loss, metrics)


def _save(run: Run, state: RunState) -> str:
    """checkpoint-<step>/: the adapter (gathered once, PEFT's layout), the optimizer, the schedule, every
    rank's random-number states and the losses so far; returns its path."""
    config, ctx, step = run.config, run.ctx, state.step
    path = os.path.join(config.out_dir, f"checkpoint-{step}")
    if state.checkpoint == path:  # this step is saved already (a signal right after save_every)
        return path
    rngs = all_gather_object(rng_state(), ctx)
    sharded, move_in = config.parallel == "fsdp", {}
    if sharded:  # every rank writes its optimizer shard; rank 0 moves the folder into the checkpoint
        move_in[OPTIMIZER_DIR] = os.path.join(config.out_dir, f".{OPTIMIZER_DIR}-{step}.tmp")
        save_optimizer(run.loss_module, run.optimizer, move_in[OPTIMIZER_DIR], ctx)
    with gathered_trainable(run.model) if sharded else nullcontext():  # the full adapter, once, PEFT's layout
        if ctx.is_main:
            epoch, k = divmod(step, run.plan.steps_per_epoch)
            save_checkpoint(config.out_dir, step, unwrap(run.model), {
                "step": step, "epoch": epoch, "step_in_epoch": k, "total_steps": run.total_steps,
                "warmup_steps": run.warmup, **({} if sharded else {"optimizer": run.optimizer.state_dict()}),
                "scheduler": run.scheduler.state_dict(), "rng": rngs, "train_losses": [list(x) for x in state.train_losses],
                "val_losses": [list(x) for x in state.val_losses], "run_name": state.run_name,
                "world_size": ctx.world_size, "parallel": config.parallel, "loss_scaler": run.scaler.state_dict(),
                "metrics": [list(x) for x in state.metrics], "val_metrics": [list(x) for x in state.val_metrics],
                **run.objective.state_dict(),
            }, config.keep_last, move_in)
            run.logger.flush()
    all_reduce_sum(torch.zeros((), device=ctx.device), ctx)  # a barrier: no rank exits before the save is done
    return path
