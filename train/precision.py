"""fp16 training with dynamic loss scaling, for GPUs without bf16 (T4, V100).

fp16 stores 10 mantissa bits (11 significant bits with the implicit leading 1) and 5 exponent
bits; bf16 stores 7 mantissa bits (8 significant) and fp32's 8 exponent bits. fp16 is the more
precise of the two, but its range is short: the smallest normal number is 6.1e-5, so small gradients
flush to zero in the backward pass. Loss scaling multiplies the loss by S (2^16 to start) before
backward, so every gradient is S times larger and stays representable, then divides the fp32
gradients of the LoRA parameters by S before clipping and the AdamW step:

    (S · loss).backward();  g = grad / S;  if any g is inf or NaN: skip the step, S ← S / 2
                                           else: AdamW step; every growth_interval clean steps S ← 2 S

A skipped step changes no weight and no AdamW moment; the data and the learning-rate schedule
move on. `torch.amp.GradScaler` does the bookkeeping (also on the CPU); its state goes into the
checkpoint, so a resumed run continues with the same S. bf16 has fp32's exponent range and needs
none of this: the scaler is then switched off and every call below is the identity.
"""
from __future__ import annotations

from typing import Any

import torch


class LossScaler:
    """GradScaler when `enabled` (fp16 autocast), else a pass-through; counts skipped steps."""

    def __init__(self, enabled: bool, device: str = "cpu", init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled = enabled
        self.skipped = 0  # optimizer steps skipped because a gradient overflowed
        self.scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale,
                                           growth_interval=growth_interval, enabled=enabled)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S · loss, to call backward on."""
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by S in place (before clipping, which must see true gradients)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless a gradient overflowed; update S. Returns whether the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= before  # S backs off exactly when the step was skipped
        self.skipped += not taken
        return taken

    @property
    def scale_value(self) -> float:
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))


NO_SCALING = LossScaler(enabled=False)
