"""What an adapter was trained on: the base checkpoint, how its weights were held, the data split.

An adapter is a correction to one particular set of base weights. QLoRA trains it against the NF4
copy of W0, so the function it learned is

    h = dequantize(quantize(W0)) x + s · B A x

and merged into the original W0 it computes something else (the pricer's demo lost 6.5 points of
hits that way). The fix is the QLoRA author's: merge into the weights training saw. `save_adapter`
writes this record beside PEFT's two files (PEFT ignores files it does not know), and the exports
read it back to rebuild those weights: the NF4 codes recomputed from the checkpoint are the very bytes
training used, since the quantizer is deterministic.

    adapter_dir/trained_on.json
    {"checkpoint": {"path": "/models/smollm2.gguf", "bytes": 138..., "sha256": "9f2c..."},
     "base": {"quant": "nf4", "blocksize": 64, "double_quant": true, "dtype": "float32",
              "compute_dtype": "float32", "unquantized": ["lm_head"]},
     "split": {"seed": 0, "test_size": 200, "val_size": 64, "train_size": 4000}}   # scripts' data, optional
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from quant import Linear4bit

TRAINED_ON = "trained_on.json"
MERGE_INTO = ("trained", "original")


def describe_base(model: nn.Module) -> dict[str, Any]:
    """How the base weights of `model` are held: quantization, block size, dtypes, plain linears."""
    quantized, plain = [], []
    for name, m in model.named_modules():
        name = name.removesuffix(".base_layer")  # a LoRALinear wraps the layer training saw
        if isinstance(m, Linear4bit):
            quantized.append(m)
        elif isinstance(m, nn.Linear) and not name.rpartition(".")[2].startswith("lora_"):
            plain.append(name)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)  # the decoder's; any module's first else
    dtype = embed.weight.dtype if embed is not None else next(model.parameters()).dtype
    if not quantized:
        return {"quant": "none", "dtype": _name(dtype)}
    kinds = {(m.quant_type, m.blocksize, m.double_quant, m.weight_dtype, m.compute_dtype) for m in quantized}
    if len(kinds) > 1:
        raise ValueError(f"the model's 4-bit layers are held in {len(kinds)} different ways {sorted(map(str, kinds))}; "
                         "an adapter records one")
    quant, blocksize, double_quant, weight_dtype, compute_dtype = kinds.pop()
    return {"quant": quant, "blocksize": blocksize, "double_quant": double_quant, "dtype": _name(weight_dtype),
            "compute_dtype": _name(compute_dtype), "unquantized": sorted(plain)}


def trained_on(model: nn.Module, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of `model`'s base (and, from a script, the data split) that save_adapter writes."""
    checkpoint = getattr(model, "checkpoint", None)  # set by model.load_pretrained
    record: dict[str, Any] = {"checkpoint": None if checkpoint is None else
                              {"path": os.path.abspath(checkpoint.path), **checkpoint.fingerprint},
                              "base": describe_base(model)}
    if split is not None:
        record["split"] = dict(split)
    return record


def read_trained_on(adapter_dir: str, warn: bool = True) -> dict[str, Any] | None:
    """The adapter's record, or None (with one warning line) for an adapter saved without one."""
    path = os.path.join(adapter_dir, TRAINED_ON)
    if not os.path.isfile(path):
        if warn:
            warnings.warn(f"{adapter_dir} has no {TRAINED_ON} (saved before adapters recorded their base): "
                          "treating it as trained on the original weights", stacklevel=2)
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("base"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'base' object (quant, dtype, ...)")
    quant = record["base"].get("quant")
    if quant not in ("none", "nf4", "fp4"):
        raise ValueError(f"{path}: base.quant is {quant!r}; expected 'none', 'nf4' or 'fp4'")
    return record


def check_checkpoint(record: dict[str, Any] | None, checkpoint, adapter_dir: str) -> None:
    """Raise ValueError when `checkpoint` (an opened model.Checkpoint) is not the file the adapter was
    trained on, naming both; nothing to check without a record of it."""
    recorded = (record or {}).get("checkpoint")
    if not recorded:
        return
    found = checkpoint.fingerprint
    if found["sha256"] != recorded.get("sha256"):
        raise ValueError(
            f"{checkpoint.path} is not the checkpoint {adapter_dir} was trained on: it recorded {recorded.get('path')} "
            f"({recorded.get('bytes'):,} bytes, sha256 {str(recorded.get('sha256'))[:12]}...), this file has "
            f"{found['bytes']:,} bytes, sha256 {found['sha256'][:12]}...; pass the recorded checkpoint, or "
            "allow_other_checkpoint=True (--allow-other-checkpoint) to merge into this one anyway")


def recorded_checkpoint(adapter_dir: str) -> str | None:
    """The base checkpoint an adapter names, when that path exists on this machine: the recorded one,
    else PEFT's `base_model_name_or_path`."""
    from .io import read_adapter_config

    record = read_trained_on(adapter_dir, warn=False) or {}
    path = (record.get("checkpoint") or {}).get("path")
    if isinstance(path, str) and os.path.exists(path):
        return path
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{adapter_dir}/adapter_config.json: base_model_name_or_path must be a string, got {base!r}")
    return base if base and os.path.exists(base) else None


class TrainedWeights:
    """Turns each checkpoint tensor into the tensor training computed with, in fp32.

    merge_into="trained": every tensor cast to the dtype the base was loaded in, and every quantized
    linear's weight W0 replaced by dequantize(quantize(W0)) in the compute dtype, the layer's bias cast
    to it (as Linear4bit's forward does); "original": the tensors as they are, W0 itself.
    """

    def __init__(self, config, base: dict[str, Any] | None, merge_into: str = "trained"):
        if merge_into not in MERGE_INTO:
            raise ValueError(f"merge_into={merge_into!r}: expected one of {MERGE_INTO}")
        self.base = base if merge_into == "trained" else None
        self.quantized: set[str] = set()
        if self.base is not None and self.base["quant"] != "none":
            from model import Llama

            with torch.device("meta"):
                skeleton = Llama(config)
            plain = set(self.base.get("unquantized", ["lm_head"]))
            self.quantized = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in plain}

    def __call__(self, name: str, W: torch.Tensor) -> torch.Tensor:
        if self.base is None:
            return W
        base = self.base
        W = W.to(getattr(torch, base["dtype"]))
        module, _, kind = name.rpartition(".")
        if module not in self.quantized:
            return W
        compute = getattr(torch, base["compute_dtype"])
        if kind != "weight":
            return W.to(compute)
        layer = Linear4bit.from_weight(W, quant_type=base["quant"], double_quant=base["double_quant"],
                                       compute_dtype=compute, blocksize=base["blocksize"])
        return layer.dequantize()                                               # (out, in), compute dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
