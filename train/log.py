"""Watching a run: TensorBoard scalars under `<out_dir>/runs/<run name>/` and a console progress bar.

Tags: train/loss (mean cross-entropy per answer token of the step), train/lr, train/grad_norm
(before clipping), train/tokens_per_sec, eval/loss; an objective's metrics under train/<name> and
eval/<name> (DPO: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
logps/rejected, as TRL names them; GRPO: reward, reward_std, completions/mean_length, kl); the
hyperparameters as a text table at the start and through `add_hparams` at the end. Runs are named by their start date and time, as in
the course's charts, unless `run_name` is given.
"""
from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any

from tqdm.auto import tqdm


# the metrics the progress bar shows beside the loss, under short names
SHOWN = {"rewards/margins": "margin", "rewards/accuracies": "acc", "reward": "reward", "kl": "kl"}


def default_run_name() -> str:
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


class RunLogger:
    """TensorBoard writer + tqdm bar; a silent stand-in on ranks other than 0."""

    def __init__(self, out_dir: str | None, run_name: str, total_steps: int, start_step: int,
                 hparams: dict[str, Any], progress: bool = True, enabled: bool = True):
        self.writer = None
        self.run_dir = None
        self.hparams = hparams
        if enabled and out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = os.path.join(out_dir, "runs", run_name)
            self.writer = SummaryWriter(self.run_dir)
            table = "| hyperparameter | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in hparams.items())
            self.writer.add_text("hparams", table, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                        disable=not (enabled and progress), dynamic_ncols=True)

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_sec: float, write: bool,
                 metrics: dict[str, float] | None = None) -> None:
        shown = {SHOWN[k]: f"{v:.3f}" for k, v in (metrics or {}).items() if k in SHOWN}
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **shown, refresh=False)
        self.bar.update(1)
        if write and self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.writer.add_scalar("train/tokens_per_sec", tokens_per_sec, step)
            for name, value in (metrics or {}).items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def log_eval(self, step: int, loss: float | None, metrics: dict[str, float] | None = None) -> None:
        if not self.bar.disable:
            said = ([f"eval loss {loss:.4f}"] if loss is not None else []) + [
                f"{k} {v:.4f}" for k, v in (metrics or {}).items() if k in SHOWN]
            self.bar.write(f"step {step}: {', '.join(said)}", file=sys.stderr)
        if self.writer is not None:
            if loss is not None:
                self.writer.add_scalar("eval/loss", loss, step)
            for name, value in (metrics or {}).items():
                self.writer.add_scalar(f"eval/{name}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, final_metrics: dict[str, float] | None = None) -> None:
        self.bar.close()
        if self.writer is not None:
            if final_metrics:
                self.writer.add_hparams(self.hparams, final_metrics, run_name=".")
            self.writer.close()
