"""An opened checkpoint: one object for an HF folder or a GGUF file, read once and passed down.

    ckpt = open_checkpoint(path)         # checks the path; nothing else is read yet
    ckpt.config                          # LlamaConfig from config.json or the GGUF metadata, read once
    ckpt.tokenizer                       # the Tokenizer, built once
    ckpt.shapes()                        # [(HF name, shape)] from the headers alone, in file order
    for name, t in ckpt.tensors(): ...   # every weight, one at a time, under HF names and in HF layout
    ckpt.fingerprint                     # {"bytes", "sha256"}: tells another file from this one, cheaply

The loader (`load_pretrained`) and the exports (`lora.export_merged`, `lora.export_gguf`) take the
path or this object; each asks it for what it needs, and the file is parsed once: the way from the
file to the model, or to the written GGUF, reads in one direction.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Iterator

import torch

from .config import LlamaConfig
from .gguf import gguf_metadata, hf_name, is_gguf, iter_gguf_tensors, open_gguf, read_gguf_kv
from .tokenizer import Tokenizer

# The fingerprint reads this much of each weight file's start and end: the header (names, shapes,
# offsets) and the first and last tensors' bytes. Another file of the same size that differs only in
# its middle would pass, which is the price of reading 17 MiB of an 8B checkpoint instead of 16 GB.
FINGERPRINT_HEAD = 16 * 2**20
FINGERPRINT_TAIL = 2**20


class Checkpoint:
    """A checkpoint on disk: `path` an HF folder (config.json + safetensors) or a .gguf file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such checkpoint (expected an HF folder or a .gguf file)")
        if os.path.isfile(self.path):
            if not (self.path.endswith(".gguf") or is_gguf(self.path)):
                raise ValueError(f"{self.path}: not a checkpoint (expected an HF folder with config.json or a .gguf file)")
            self.kind = "gguf"
        elif not os.path.isfile(os.path.join(self.path, "config.json")):
            raise FileNotFoundError(f"{self.path}: no config.json in this folder (expected an HF checkpoint folder)")
        else:
            self.kind = "hf"

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, kind={self.kind!r})"

    # ------------------------------------------------------------------ what it says about itself
    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """GGUF: the key-values (big tokenizer arrays left out); HF: config.json as a dict."""
        if self.kind == "gguf":
            return gguf_metadata(self.gguf_reader)
        file = os.path.join(self.path, "config.json")
        try:
            with open(file) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e

    @functools.cached_property
    def config(self) -> LlamaConfig:
        if self.kind == "gguf":
            return LlamaConfig.from_gguf(self.metadata, source=self.path)
        return LlamaConfig.from_hf(self.metadata, source=os.path.join(self.path, "config.json"))

    @functools.cached_property
    def key_values(self) -> dict[str, Any]:
        """GGUF only: every key-value, the tokenizer's arrays included (read straight from the bytes)."""
        return read_gguf_kv(self.path)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        if self.kind == "gguf":
            return Tokenizer.from_gguf(self.path, self.key_values)
        return Tokenizer.from_folder(self.path)

    @functools.cached_property
    def gguf_reader(self):
        """GGUF only: the memory-mapped `gguf.GGUFReader`, opened once."""
        return open_gguf(self.path)

    @property
    def gguf_arch(self) -> str | None:
        return self.metadata["general.architecture"] if self.kind == "gguf" else None

    def weight_files(self) -> list[str]:
        """The files holding the weights: the .gguf itself, or an HF folder's safetensors shards."""
        return [self.path] if self.kind == "gguf" else _safetensors_files(self.path)

    # ------------------------------------------------------------------ tensors
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of each tensor `tensors` yields, in the same order, from the headers alone:
        a writer can lay out a file before the first tensor is read."""
        if self.kind == "gguf":
            named = ((hf_name(t.name, self.gguf_arch), t.shape) for t in self.gguf_reader.tensors)
            return [(n, tuple(int(d) for d in reversed(shape))) for n, shape in named if n is not None]
        from safetensors import safe_open

        out = []
        for file in self.weight_files():
            try:
                with safe_open(file, framework="pt") as f:
                    out += [(n, tuple(f.get_slice(n).get_shape())) for n in f.keys() if not _skipped(n)]
            except Exception as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
        return out

    def tensors_with_source(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(HF name, tensor, file it came from), one tensor at a time."""
        if self.kind == "gguf":
            c = self.config
            for name, t in iter_gguf_tensors(self.gguf_reader, c.num_attention_heads, c.num_key_value_heads, self.gguf_arch):
                yield name, t, self.path
            return
        from safetensors import safe_open

        for file in self.weight_files():
            try:
                f = safe_open(file, framework="pt")
            except Exception as e:  # a SafetensorError for truncated or corrupt headers
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
            with f:
                for name in f.keys():
                    if _skipped(name):
                        continue
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from e
                    yield name, t, file

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every weight. HF folders give the stored dtype; GGUF tensors come
        dequantized to fp32, the query/key row permutation undone."""
        for name, t, _ in self.tensors_with_source():
            yield name, t

    # ------------------------------------------------------------------ identity
    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """{"bytes": total size, "sha256": of each file's name, size, first 16 MiB and last 1 MiB}.

        Cheap on any size (17 MiB read per file) and enough to tell another checkpoint from this one:
        a different model changes its header (names, shapes, offsets) or its first and last tensors.
        config.json is hashed whole. A copy of the same file elsewhere has the same fingerprint.
        """
        files = self.weight_files() if self.kind == "gguf" else [os.path.join(self.path, "config.json"),
                                                                 *self.weight_files()]
        h, total = hashlib.sha256(), 0
        for file in files:
            size = os.path.getsize(file)
            total += size
            h.update(f"{os.path.basename(file)}\0{size}\0".encode())
            with open(file, "rb") as f:
                h.update(f.read(FINGERPRINT_HEAD))
                if size > FINGERPRINT_HEAD:
                    f.seek(max(FINGERPRINT_HEAD, size - FINGERPRINT_TAIL))
                    h.update(f.read())
        return {"bytes": total, "sha256": h.hexdigest()}


def open_checkpoint(path: "str | os.PathLike | Checkpoint") -> Checkpoint:
    """A Checkpoint for `path`; a Checkpoint given is returned as it is (already opened)."""
    return path if isinstance(path, Checkpoint) else Checkpoint(path)


def _skipped(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # a buffer some checkpoints carry; computed from the config


def _safetensors_files(folder: str) -> list[str]:
    """The weight files of an HF folder: the shards an index names, or `model.safetensors`."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected JSON with a 'weight_map')") from e
        files = list(dict.fromkeys(weight_map.values()))  # unique, in order
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index}: names shard {name!r}, which is not in {folder}")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{folder}: no model.safetensors nor model.safetensors.index.json")
    return [single]
