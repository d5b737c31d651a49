"""Preemption: SIGTERM or SIGINT asks the run to stop at the next step boundary, not at once.

Colab, spot instances and schedulers send SIGTERM shortly before they take the machine away; a
user presses Ctrl-C (SIGINT). Either way the optimizer step in flight finishes, a checkpoint is
written, the logs are closed, and `train` raises `TrainingInterrupted`, which carries the shell's
exit status for a signal (128 + its number: 143 for SIGTERM, 130 for SIGINT) and the checkpoint
to resume from.

    with StopSignals() as stop:          # installs the handlers, restores the old ones on exit
                                         # (or stop = StopSignals().install() ... stop.restore())
        for step in ...:
            training_step(...)
            if stop.agreed(ctx):         # every rank stops after the same step
                save(); break

The handler only records the signal; nothing is interrupted mid-write. A second signal while the
checkpoint is being written is recorded the same way and ignored, so it cannot cut the save short.
"""
from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from .distributed import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped by a signal after a whole step; `checkpoint` holds the state to resume from.

    `exit_code` is what a command line should exit with (128 + signum); `checkpoint` is None when
    the run had no out_dir to write one to.
    """

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: str | None):
        self.signum, self.step, self.total_steps, self.checkpoint = signum, step, total_steps, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (TrainConfig.out_dir is not set)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {total_steps}: {where}")


def _say(text: str) -> None:
    # os.write, not print: the handler may interrupt a print to stderr (the progress bar), and
    # re-entering a buffered stream raises RuntimeError
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopSignals:
    """A context manager that turns SIGTERM/SIGINT into a request read once per step."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(f"\n{name}: finishing this step, then saving a checkpoint\n")
        else:  # during the save: noted and ignored, the save completes
            _say(f"{name} again: still saving, stopping when done\n")

    def install(self) -> "StopSignals":
        """Route the signals to this object; returns self."""
        # Python runs handlers in the main thread only; elsewhere (a notebook's worker thread) no-op
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers found at install(); a signal received stays recorded in `signum`."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def agreed(self, ctx: DistContext) -> int:
        """The signal that stops the run after this step (0: keep going), the same on every rank.

        Under torchrun a signal may reach the ranks a step apart; a MAX all-reduce of the signal
        number makes them all stop after the same step, so the collective checkpoint lines up.
        """
        signum = self.signum or 0
        if ctx.enabled:
            t = torch.tensor([signum], dtype=torch.int64, device=ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
            self.signum = self.signum or (signum or None)
        return signum
