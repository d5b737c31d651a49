"""Checkpoints: `<out_dir>/checkpoint-<step>/` = the adapter (PEFT layout) + `training_state.pt`.

training_state.pt holds what a run needs to continue as if never stopped: the optimizer's moments,
the scheduler, the step and data position, the random-number states (Python, NumPy, torch, CUDA;
one set per process)
and the losses logged so far. It holds tensors and plain containers only, so it loads with
`torch.load(weights_only=True)`.

A checkpoint proves itself: `manifest.json`, written last, records the size and SHA-256 of every
other file in the folder. The folder is written as `checkpoint-<step>.tmp/` and renamed when
complete, so a run killed while saving leaves a `.tmp` folder that resuming ignores. A file cut
short or changed later (a full disk, a bad copy) fails its manifest: resuming then falls back to
the newest checkpoint that passes, with a warning naming both, and never loads a broken one.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
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
    """(step, path) of the checkpoint folders in out_dir that hold a manifest, oldest first.

    `.tmp` folders are skipped; the files are not checked here (see `verify_checkpoint`).
    """
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(folder: str) -> list[str]:
    """Every file below `folder`, as sorted '/'-joined paths relative to it."""
    found = []
    for root, _, names in os.walk(folder):
        rel = os.path.relpath(root, folder)
        found += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in names]
    return sorted(found)


def verify_checkpoint(path: str, checksums: bool = True) -> str | None:
    """None when every file of checkpoint folder `path` matches its manifest, else why not.

    `checksums=False` compares sizes only: enough to tell a save cut short, and cheap.
    """
    manifest_path = os.path.join(path, MANIFEST_FILE)
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"{MANIFEST_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name, entry in sorted(files.items()):
        file = os.path.join(path, name)
        try:
            size, digest = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST_FILE} entry for {name} is malformed"
        if os.path.isabs(name) or ".." in name.split("/") or not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, the manifest says {size}"
        if checksums and _sha256(file) != digest:
            return f"{name} fails its SHA-256 checksum"
    return None


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest checkpoint in out_dir whose files pass their manifest (None if none does).

    A newer folder that fails is skipped with a warning naming it, why, and the one used instead.
    """
    failed = []
    for _, path in reversed(list_checkpoints(out_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            if failed:
                warnings.warn(f"{failed[0][0]} fails its manifest ({failed[0][1]}); "
                              f"falling back to {path}, the newest complete checkpoint")
            return path
        failed.append((path, reason))
    if failed:
        warnings.warn(f"no checkpoint in {out_dir} passes its manifest: " +
                      "; ".join(f"{p}: {r}" for p, r in failed))
    return None


class CheckpointSpaceError(OSError):
    """The disk cannot hold the next checkpoint; the previous ones are left as they were."""


def _write_bytes(path: str, data: bytes) -> None:
    """Write and flush `data` to disk: a checkpoint must survive the machine stopping right after."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, as an OSError from Python or as text from a writer in another language (safetensors)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e) \
        or "os error 28" in str(e)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (a lower bound of its size on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _no_space(out_dir: str, step: int, needed: int, free: int | None) -> CheckpointSpaceError:
    previous = latest_checkpoint(out_dir)
    kept = f"; {previous} is intact" if previous else ""
    have = f", {free:,} are free" if free is not None else ""
    return CheckpointSpaceError(errno.ENOSPC, f"no space left in {out_dir} for checkpoint-{step}: it needs about "
                                              f"{needed:,} bytes{have}{kept}; free some space and resume")


def save_checkpoint(out_dir: str, step: int, model: nn.Module, state: dict[str, Any], keep_last: int | None = None,
                    move_in: dict[str, str] | None = None) -> str:
    """Write `<out_dir>/checkpoint-<step>/` through a temporary folder; prune beyond `keep_last`.

    The training state is serialised in memory first, so its size is known before anything is
    written: when the disk has less room than the adapter and state need, nothing is written and
    CheckpointSpaceError names the folder and the bytes. A disk that fills during the save (the
    estimate was short, another process wrote) removes the partial folder and raises the same.

    `move_in` {name: path}: folders already written elsewhere (FSDP's sharded optimizer state)
    that are moved into the checkpoint under `name` before its manifest is made.
    """
    from lora import lora_state_dict, save_adapter

    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getvalue()
    needed = len(blob) + _tensor_bytes(lora_state_dict(model)) + (1 << 16)  # + JSON files and headers
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space(out_dir, step, needed, free)
    try:
        save_adapter(model, tmp)
        for name, src in (move_in or {}).items():
            os.replace(src, os.path.join(tmp, name))
        _write_bytes(os.path.join(tmp, STATE_FILE), blob)
        files = {name: {"size": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
                 for name in _files_under(tmp)}
        manifest = json.dumps({"step": step, "files": files}, indent=2, sort_keys=True) + "\n"
        _write_bytes(os.path.join(tmp, MANIFEST_FILE), manifest.encode())  # last: its presence means complete
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise _no_space(out_dir, step, needed, None) from e
        raise
    old = final + ".old"
    if os.path.exists(final):  # the same step saved again (a resumed run): swap it whole
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(out_dir, keep_last)
    return final


def prune_checkpoints(out_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints that pass their manifest's sizes.

    Only folders older than the oldest one kept are deleted, so the newest good checkpoint is
    never removed, however many broken ones lie around it. Returns the deleted paths.
    """
    found = list_checkpoints(out_dir)
    good = [step for step, path in found if verify_checkpoint(path, checksums=False) is None]
    if len(good) <= keep_last:
        return []
    oldest_kept = good[-keep_last]
    deleted = [path for step, path in found if step < oldest_kept]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def load_checkpoint(path: str, model: nn.Module, verify: bool = True) -> dict[str, Any]:
    """Load the adapter of checkpoint folder `path` into `model` in place; return its training state.

    The files are checked against the manifest first (`verify=False` skips that when the caller
    just did): a broken checkpoint raises ValueError and leaves the model untouched.
    """
    from lora import load_adapter

    reason = verify_checkpoint(path) if verify else None
    if reason is not None:
        raise ValueError(f"{path} is not a complete checkpoint: {reason}")
    load_adapter(model, path)
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
