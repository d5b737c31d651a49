"""Checkpoints: `<out_dir>/checkpoint-<step>/` = the adapter (PEFT layout) + `training_state.pt`.

training_state.pt holds what a run needs to continue as if never stopped: the optimizer's moments,
the scheduler, the step and data position, the random-number states (Python, NumPy, torch, CUDA;
one set per process)
and the losses logged so far. It holds tensors and plain containers only, so it loads with
`torch.load(weights_only=True)`.

A checkpoint is written to `checkpoint-<step>.tmp/` and renamed when complete: a run killed while
saving leaves a `.tmp` folder that resuming ignores, never a half-written checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "training_state.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """The states of every random-number generator a step may draw from (dropout, shuffling)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in out_dir, oldest first; `.tmp` folders are skipped."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str, step: int, model: nn.Module, state: dict[str, Any], keep_last: int | None = None,
                    move_in: dict[str, str] | None = None) -> str:
    """Write `<out_dir>/checkpoint-<step>/` through a temporary folder; prune beyond `keep_last`.

    `move_in` {name: path}: folders already written elsewhere (FSDP's sharded optimizer state)
    that are moved into the checkpoint under `name` before it is completed.
    """
    from lora import save_adapter

    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter(model, tmp)
    for name, src in (move_in or {}).items():
        os.replace(src, os.path.join(tmp, name))
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last is not None:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def load_checkpoint(path: str, model: nn.Module) -> dict[str, Any]:
    """Load the adapter of checkpoint folder `path` into `model` in place; return its training state."""
    from lora import load_adapter

    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing")
    load_adapter(model, path)
    return torch.load(state_file, map_location="cpu", weights_only=True)
