"""export_merged: the adapter folded into the base weights, as a plain HF folder that answers as the
model that was trained.

QLoRA trains A and B against an NF4 copy of W0: the function it learned is
dequantize(quantize(W0)) x + s · B A x. Folded into the original W0 the adapter corrects rounding
errors that are no longer there, and the merged model answers differently (on the pricer's demo,
6.5 points fewer hits). So by default (`merge_into="trained"`) the checkpoint is read again, tensor by
tensor, each weight rebuilt as training held it (the NF4 codes recomputed from the checkpoint are the
bytes training used: lora/trained_on.py), and each adapted weight becomes that plus s · B A in fp32:
the very function that was trained and evaluated. `merge_into="original"` gives W0 + s · B A, for an
adapter meant for the full-precision base. Either way the folder is an ordinary model:
transformers, vLLM and llama.cpp's converter load it with no adapter code at all.

    out_dir/
      config.json                          LlamaConfig.to_hf()
      model-00001-of-0000N.safetensors ... shards of at most max_shard_size bytes
      model.safetensors.index.json         {"metadata": {"total_size"}, "weight_map": {name: shard}}
      tokenizer.json, tokenizer_config.json (or tokenizer.model)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors.torch import save_file

from model import Checkpoint, open_checkpoint

from .dora import MAGNITUDE, merge_into
from .io import PEFT_PREFIX, read_adapter
from .trained_on import TrainedWeights, check_checkpoint, read_trained_on

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in 1_000_000, "500MB", "5GB" or "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return n


def adapter_deltas(adapter_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, dict]:
    """{weight name: A}, {weight name: B}, the scaling and {weight name: DoRA magnitude} of an adapter."""
    config, sd = read_adapter(adapter_dir)
    A, B, M = {}, {}, {}
    for key, t in sd.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|" + MAGNITUDE + ")", key)
        if m is None or (m.group(2) == MAGNITUDE and not config.use_dora):
            dora = f" or '.{MAGNITUDE}'" if config.use_dora else ""
            raise ValueError(f"{adapter_dir}: unexpected adapter tensor {key!r} (expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight', '.lora_B.weight'{dora})")
        {"lora_A.weight": A, "lora_B.weight": B, MAGNITUDE: M}[m.group(2)][m.group(1) + ".weight"] = t.float()
    if config.use_dora and set(M) != set(A):
        raise ValueError(f"{adapter_dir}: a DoRA adapter needs {MAGNITUDE} beside every lora_A; "
                         f"missing for {sorted(set(A) - set(M))[:4]}")
    lonely = sorted(set(A) ^ set(B))
    if lonely:
        raise ValueError(f"{adapter_dir}: {lonely[0][:-len('.weight')]} has only one of lora_A and lora_B")
    for name in A:
        if A[name].shape[0] != config.r or B[name].shape[1] != config.r:
            raise ValueError(f"{adapter_dir}: {name}: lora_A {tuple(A[name].shape)} and lora_B "
                             f"{tuple(B[name].shape)} do not have rank r={config.r}")
    return A, B, config.scaling, M


@dataclass
class Merge:
    """An adapter to fold into a checkpoint's weights: what export_merged and export_gguf share.

    `tensors()` streams the checkpoint's weights with the adapter merged: each one first made the
    tensor training computed with (`merge_into="trained"`: the NF4 copy of W0, lora/trained_on.py;
    "original": W0 itself), then W + scaling · B A in fp32 where the adapter adapts it (DoRA:
    m/‖W + s·BA‖ ⊙ (W + s·BA)). A tied head is the embedding: it is neither adapted nor written.
    """

    checkpoint: Checkpoint
    adapter_dir: str
    A: dict[str, torch.Tensor]                   # {weight name: (r, in)}
    B: dict[str, torch.Tensor]                   # {weight name: (out, r)}
    scaling: float
    M: dict[str, torch.Tensor]                   # DoRA's {weight name: (out,)}, {} for plain LoRA
    as_trained: TrainedWeights

    @classmethod
    def open(cls, checkpoint: str | Checkpoint, adapter_dir: str, merge_into: str = "trained",
             allow_other_checkpoint: bool = False) -> "Merge":
        """Read the adapter and its record, and check both against the checkpoint before any work."""
        checkpoint = open_checkpoint(checkpoint)
        A, B, scaling, M = adapter_deltas(adapter_dir)
        if checkpoint.config.tie_word_embeddings and "lm_head.weight" in A:
            raise ValueError(f"{adapter_dir}: the adapter changes lm_head, which this model ties to the embedding; "
                             "a merged head would no longer be tied")
        record = read_trained_on(adapter_dir)  # None, with one warning, for an adapter saved without one
        if not allow_other_checkpoint:
            check_checkpoint(record, checkpoint, adapter_dir)
        as_trained = TrainedWeights(checkpoint.config, record and record["base"], merge_into)
        return cls(checkpoint, adapter_dir, A, B, scaling, M, as_trained)

    def _kept(self, name: str) -> bool:
        return not (self.checkpoint.config.tie_word_embeddings and name == "lm_head.weight")

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor `tensors` yields, from the headers; an adapted weight the
        checkpoint lacks is an error here, before anything is written."""
        shapes = [(n, s) for n, s in self.checkpoint.shapes() if self._kept(n)]
        unused = sorted(set(self.A) - {n for n, _ in shapes})
        if unused:
            raise ValueError(f"{self.adapter_dir}: adapted weights {unused[:4]} are not in the checkpoint "
                             f"{self.checkpoint.path}")
        return shapes

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
        """(name, merged tensor, the dtype the checkpoint stores it in), one at a time."""
        for name, W in self.checkpoint.tensors():
            if self._kept(name):
                yield name, self.merged(name, self.as_trained(name, W)), W.dtype

    def merged(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """W + scaling · B A in fp32 where the adapter adapts `name`; any other tensor as it is."""
        if name not in self.A:
            return W
        A, B = self.A[name], self.B[name]
        if tuple(W.shape) != (B.shape[0], A.shape[1]):
            raise ValueError(f"{self.checkpoint.path}: tensor {name!r} has shape {tuple(W.shape)} but the adapter's "
                             f"B @ A has shape {(B.shape[0], A.shape[1])}")
        if self.M:
            return merge_into(W, A, B, self.scaling, self.M[name])[0]
        return W.float() + self.scaling * (B @ A)                               # (out, in)


def export_merged(
    checkpoint: str | Checkpoint,
    adapter_dir: str,
    out_dir: str,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    merge_into: str = "trained",
    allow_other_checkpoint: bool = False,
) -> str:
    """Merge the adapter in `adapter_dir` into the weights of `checkpoint` and write an HF folder.

    checkpoint: an HF folder or a .gguf file (GGUF tensors come dequantized, in HF layout).
    merge_into: "trained" (default), the weights as training saw them (an NF4-trained adapter merges
    into dequantize(quantize(W0)): the folder answers as the model that was evaluated); "original",
    into W0 itself. A checkpoint whose fingerprint differs from the adapter's record is an error
    unless `allow_other_checkpoint`.
    dtype: of the written weights; None keeps each tensor's stored dtype (the merge is in fp32).
    The folder is built under a temporary name beside `out_dir` and renamed at the end, replacing
    any earlier export. Returns out_dir.
    """
    limit = parse_size(max_shard_size)
    merge = Merge.open(checkpoint, adapter_dir, merge_into, allow_other_checkpoint)
    hf_config = merge.checkpoint.config.to_hf()  # before any work: a config that config.json cannot state fails here
    merge.shapes()

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file; expected a folder to write the merged model to")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", suffix=".tmp", dir=parent)
    try:
        shards = _write_shards(merge.tensors(), dtype, limit, tmp)
        _write_index(shards, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        merge.checkpoint.tokenizer.save_pretrained(tmp)
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_shards(tensors, dtype, limit, folder) -> list[dict[str, int]]:
    """Write (name, merged tensor, stored dtype) into shards of at most `limit` bytes, each tensor in
    `dtype` (None: its stored dtype); returns [{name: nbytes}] per shard."""
    shards: list[dict[str, int]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, os.path.join(folder, f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append({n: t.numel() * t.element_size() for n, t in current.items()})
            current, size = {}, 0

    for name, W, stored in tensors:
        W = W.to(dtype or stored).contiguous()
        nbytes = W.numel() * W.element_size()
        if current and size + nbytes > limit:
            flush()
        current[name] = W
        size += nbytes
    flush()
    return shards


def _write_index(shards: list[dict[str, int]], folder: str) -> None:
    """Rename the shards to HF's `model-0000i-of-0000N.safetensors` and write the index."""
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, f"shard-{i:05d}.safetensors"), os.path.join(folder, final))
        for name, nbytes in shard.items():
            weight_map[name] = final
            total += nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _replace_folder(tmp: str, out_dir: str) -> None:
    """Put the finished folder at out_dir; an earlier export there is removed only afterwards."""
    if os.path.lexists(out_dir):
        old = tmp + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
