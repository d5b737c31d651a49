"""export_merged: the adapter folded into the original full-precision weights, as a plain HF folder.

QLoRA trains A and B against an NF4 copy of W0. Merging into that copy would bake NF4's rounding
into the result (the trap PEFT warns about), so the checkpoint is read again, tensor by tensor, and
each adapted weight becomes W0 + scaling · B A in full precision. The folder that comes out is an
ordinary model: transformers, vLLM and llama.cpp's converter load it with no adapter code at all.

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

import torch
from safetensors.torch import save_file

from .dora import MAGNITUDE, merge_into
from .io import PEFT_PREFIX, read_adapter

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


def export_merged(
    checkpoint: str,
    adapter_dir: str,
    out_dir: str,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> str:
    """Merge the adapter in `adapter_dir` into the weights of `checkpoint` and write an HF folder.

    checkpoint: an HF folder or a .gguf file (GGUF tensors come dequantized, in HF layout).
    dtype: of the written weights; None keeps each tensor's stored dtype (the delta is added in fp32).
    The folder is built under a temporary name beside `out_dir` and renamed at the end, replacing
    any earlier export. Returns out_dir.
    """
    from model import load as model_load  # checkpoint reading only

    limit = parse_size(max_shard_size)
    config = model_load.read_config(checkpoint)
    hf_config = config.to_hf()  # before any work: a config that config.json cannot state fails here
    A, B, scaling, M = adapter_deltas(adapter_dir)
    if config.tie_word_embeddings and "lm_head.weight" in A:
        raise ValueError(f"{adapter_dir}: the adapter changes lm_head, which this model ties to the embedding; "
                         "a merged head would no longer be tied")

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file; expected a folder to write the merged model to")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".", suffix=".tmp", dir=parent)
    try:
        shards = _write_shards(model_load.iter_tensors(checkpoint), A, B, scaling, M, dtype, limit, tmp,
                               checkpoint)
        unused = sorted(set(A) - {n for shard in shards for n in shard})
        if unused:
            raise ValueError(f"{adapter_dir}: adapted weights {unused[:4]} are not in the checkpoint {checkpoint}")
        _write_index(shards, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        model_load.load_tokenizer(checkpoint).save_pretrained(tmp)
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def merged_weight(name: str, W: torch.Tensor, A: dict, B: dict, scaling: float, M: dict, checkpoint: str) -> torch.Tensor:
    """W0 + scaling · B A in fp32 where the adapter adapts `name` (DoRA: m/‖W0 + s·BA‖ ⊙ (W0 + s·BA));
    any other tensor as it was read."""
    if name not in A:
        return W
    delta = scaling * (B[name] @ A[name])                                   # (out, in)
    if tuple(W.shape) != tuple(delta.shape):
        raise ValueError(f"{checkpoint}: tensor {name!r} has shape {tuple(W.shape)} but the adapter's "
                         f"B @ A has shape {tuple(delta.shape)}")
    return merge_into(W, A[name], B[name], scaling, M[name])[0] if M else W.float() + delta


def _write_shards(tensors, A, B, scaling, M, dtype, limit, folder, checkpoint) -> list[dict[str, int]]:
    """Write merged tensors into shards of at most `limit` bytes; returns [{name: nbytes}] per shard.
    M: DoRA's magnitudes, {} for plain LoRA: the merged weight is then m/‖W0 + s·BA‖ ⊙ (W0 + s·BA)."""
    shards: list[dict[str, int]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, os.path.join(folder, f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append({n: t.numel() * t.element_size() for n, t in current.items()})
            current, size = {}, 0

    for name, W in tensors:
        out_dtype = dtype or W.dtype
        W = merged_weight(name, W, A, B, scaling, M, checkpoint).to(out_dtype).contiguous()
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
