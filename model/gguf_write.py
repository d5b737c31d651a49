"""Writing llama.cpp's GGUF: each family's metadata and tensor layout, the inverse of model/gguf.py.

llama.cpp's converter decides, per architecture, which keys a file carries and how each tensor is
stored, and its runtime reads exactly those. Here the same facts are data:

    model_type     GGUF arch  tensors                                     keys beyond the shape
    llama          llama      q/k rows permuted for llama.cpp's RoPE       rope.scaling (linear); Llama 3.1's
    mistral        llama      (the converter writes Mistral as llama)      scaling as a `rope_freqs` tensor
    qwen2, qwen3   qwen2/3    HF order; q/k/v biases; per-head q/k norms   rope.scaling (linear)
    gemma2         gemma2     norms as 1 + w; the head is the embedding   soft-caps, sliding window and pattern
    gemma3_text    gemma3     norms as 1 + w                               window, pattern, local RoPE base, final soft-cap
    phi3           phi3       fused attn_qkv, ffn_up = gate ‖ up           longrope factors as tensors, sliding window

What a GGUF file cannot state is refused with a ValueError naming it, rather than written to a file
whose outputs would differ; a sliding window llama.cpp's architecture lacks is dropped with a warning,
as llama.cpp's converter drops it.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .config import LlamaConfig
from .gguf import _ARCH_BLOCK_NAMES, _BLOCK_NAMES, _TOP_NAMES
from .rope import longrope_attention_factor, plain_inv_freq

# HF model_type -> the architecture name llama.cpp's converter writes
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3"}
PERMUTED = ("llama",)             # q/k rows stored in llama.cpp's RoPE order (model/gguf.py undoes it)
NORM_PLUS_ONE = ("gemma2", "gemma3")
# out_type -> (tensor type of the 2-D weights, general.file_type): llama.cpp's LLAMA_FTYPE numbers
OUT_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}


def gguf_arch(config: LlamaConfig) -> str:
    return GGUF_ARCH[config.model_type]


def gguf_tensor_name(hf_name: str, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`: model/gguf.py's table read backwards."""
    module, _, kind = hf_name.rpartition(".")
    top = {hf: g for g, hf in _TOP_NAMES.items()}
    if module in top:
        return f"{top[module]}.{kind}"
    block = {hf: g for g, hf in {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}.items()}
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in block:
        return f"blk.{parts[2]}.{block[parts[3]]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no name in llama.cpp's {arch} architecture")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's query/key row order -> llama.cpp's: each head's rows (2, hs/2) stored as (hs/2, 2).

    HF's RoPE rotates the pairs (x_i, x_{i+hs/2}), llama.cpp's the adjacent (x_{2i}, x_{2i+1}); with the
    rows interleaved so, both rotate the same numbers. Inverse of `model.gguf.unpermute_rows`.
    """
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_layout(hf_name: str, w: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """A tensor (or a LoRA B, whose rows are the weight's rows) in the layout llama.cpp reads."""
    arch = gguf_arch(config)
    if arch in PERMUTED and ".self_attn.q_proj." in hf_name:
        return permute_rows(w, config.num_attention_heads)
    if arch in PERMUTED and ".self_attn.k_proj." in hf_name:
        return permute_rows(w, config.num_key_value_heads)
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        return w.float() + 1.0  # llama.cpp's RMSNorm has no offset: it scales by the stored weight
    return w


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> str:
    """The GGML type a tensor is stored in: norms, biases and vectors F32 (as llama.cpp's converter
    keeps them); weights `out_type`, or F16 where a row does not fill whole quantization blocks."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32"
    kind = OUT_TYPES[out_type][0]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    return kind if shape[-1] % block == 0 else "F16"


def tensor_nbytes(shape: tuple[int, ...], kind: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encode(w: torch.Tensor, kind: str) -> np.ndarray:
    """fp32 values -> the bytes of GGML type `kind` (F16/BF16 round to nearest even; Q8_0, Q4_0 by the
    `gguf` package's quantizers, the ones llama.cpp's converter uses)."""
    from gguf.quants import quantize
    import gguf

    return quantize(np.ascontiguousarray(w.detach().float().cpu().numpy()), gguf.GGMLQuantizationType[kind])


# ---------------------------------------------------------------------------- metadata
_U32, _F32, _BOOL = "UINT32", "FLOAT32", "BOOL"


def _shape_keys(c: LlamaConfig) -> dict[str, tuple[Any, str]]:
    return {
        "context_length": (c.max_position_embeddings, _U32), "embedding_length": (c.hidden_size, _U32),
        "block_count": (c.num_hidden_layers, _U32), "feed_forward_length": (c.intermediate_size, _U32),
        "attention.head_count": (c.num_attention_heads, _U32), "attention.head_count_kv": (c.num_key_value_heads, _U32),
        "attention.key_length": (c.head_dim, _U32), "attention.value_length": (c.head_dim, _U32),
        "attention.layer_norm_rms_epsilon": (c.rms_norm_eps, _F32), "rope.freq_base": (c.rope_theta, _F32),
        "rope.dimension_count": (c.rotary_dim, _U32), "vocab_size": (c.vocab_size, _U32),
    }


def _family_keys(c: LlamaConfig, arch: str) -> dict[str, tuple[Any, str]]:
    """The keys of the family switches, each as llama.cpp's runtime reads it for `arch`."""
    keys: dict[str, tuple[Any, str]] = {}
    kind = (c.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        keys.update({"rope.scaling.type": ("linear", "STRING"), "rope.scaling.factor": (c.rope_scaling["factor"], _F32)})
    if arch in NORM_PLUS_ONE:
        pattern = [c.is_sliding(i) for i in range(c.num_hidden_layers)]
        keys.update({"attention.sliding_window": (c.sliding_window or 0, _U32),
                     "attention.sliding_window_pattern": (pattern, _BOOL),
                     "final_logit_softcapping": (c.final_logit_softcapping, _F32)})
    if arch == "gemma2":
        keys["attn_logit_softcapping"] = (c.attn_logit_softcapping, _F32)
    if arch == "gemma3":
        keys["rope.freq_base_swa"] = (c.rope_local_theta, _F32)
    if arch == "phi3":
        keys["attention.sliding_window"] = (c.sliding_window or 0, _U32)  # 0: none (Phi-4)
        if kind == "longrope":
            s = c.rope_scaling
            keys.update({"rope.scaling.original_context_length": (s["original_max_position_embeddings"], _U32),
                         "rope.scaling.attn_factor": (longrope_attention_factor(s, c.max_position_embeddings), _F32)})
    return {k: v for k, v in keys.items() if v[0] is not None}


def check_exportable(c: LlamaConfig) -> None:
    """Raise ValueError for what llama.cpp's architecture cannot state; warn where it drops a window."""
    arch = gguf_arch(c)
    kind = (c.rope_scaling or {}).get("rope_type")
    allowed = {"llama": ("linear", "llama3"), "qwen2": ("linear",), "qwen3": ("linear",), "gemma2": (),
               "gemma3": ("linear",), "phi3": ("longrope",)}[arch]
    if kind is not None and kind not in allowed:
        raise ValueError(f"{c.model_type}: RoPE scaling {kind!r} has no GGUF form in llama.cpp's {arch} architecture")
    if (c.o_bias or c.mlp_bias) and arch != "llama":  # q, k, v biases every architecture reads
        raise ValueError(f"{c.model_type}: biases on {'o_proj' if c.o_bias else 'the MLP'} "
                         f"are not read by llama.cpp's {arch} architecture")
    if arch in NORM_PLUS_ONE:
        # llama.cpp scales Gemma's scores by head_dim^-1/2 (hidden/heads for the 27B models), no key for it
        big = (arch, c.num_hidden_layers) in (("gemma2", 46), ("gemma3", 62))
        expected = c.hidden_size // c.num_attention_heads if big else c.head_dim
        if c.query_pre_attn_scalar != expected:
            raise ValueError(f"{c.model_type}: query_pre_attn_scalar={c.query_pre_attn_scalar}, but llama.cpp scales "
                             f"this model's attention scores by {expected}^-1/2 and GGUF has no key to say otherwise")
    if arch == "gemma2" and not c.tie_word_embeddings:
        raise ValueError("gemma2: an untied lm_head is not read by llama.cpp, whose Gemma 2 multiplies by the embedding")
    if arch == "gemma2" and not c.sliding_window:
        raise ValueError("gemma2: llama.cpp's Gemma 2 always slides its local layers; this model has no sliding_window")
    if arch in ("llama", "qwen2", "qwen3") and c.sliding_window and c.sliding_window < c.max_position_embeddings:
        warnings.warn(f"llama.cpp's {arch} architecture has no sliding window: past {c.sliding_window} tokens "
                      f"the GGUF's outputs differ from this {c.model_type} model's", stacklevel=3)


def architecture_metadata(c: LlamaConfig, out_type: str) -> list[tuple[str, Any, str]]:
    """[(key, value, GGUF value type)] of the architecture: the shape, the family switches, the file type."""
    check_exportable(c)
    arch = gguf_arch(c)
    keys = {**_shape_keys(c), **_family_keys(c, arch)}
    out = [(f"{arch}.{k}", v, t) for k, (v, t) in keys.items()]
    return out + [("general.file_type", OUT_TYPES[out_type][1], _U32), ("general.quantization_version", 2, _U32)]


def rope_tensors(c: LlamaConfig) -> list[tuple[str, torch.Tensor]]:
    """The RoPE frequency tensors llama.cpp reads instead of keys: Llama 3.1's `rope_freqs` (the divisor
    of each inverse frequency) and Phi-3's longrope `rope_factors_long` / `_short`."""
    kind = (c.rope_scaling or {}).get("rope_type")
    if c.rope_freq_factors is not None:  # read from a GGUF file: write them back as they were
        return [("rope_freqs.weight", torch.tensor(c.rope_freq_factors, dtype=torch.float32))]
    if kind == "llama3":
        return [("rope_freqs.weight", plain_inv_freq(c.rope_theta, c.rotary_dim) / c.rope_inv_freq())]
    if kind == "longrope":
        return [(f"rope_factors_{k}.weight", torch.tensor(c.rope_scaling[f"{k}_factor"], dtype=torch.float32))
                for k in ("long", "short")]
    return []


def write_gguf(out_path: str, arch: str, metadata: list[tuple[str, Any, str]],
               layout: list[tuple[str, tuple[int, ...], str]], arrays: Iterable[np.ndarray]) -> str:
    """Write a GGUF file: metadata [(key, value, GGUF value type; a list is an array of it)], tensor
    layout [(name, shape, GGML type)] and then each tensor's bytes from `arrays`, in layout order.

    The file is written to a temporary name in out_path's folder and renamed when complete. Its size is
    known before any tensor is written; with too little free space, or when the disk fills up anyway,
    OSError(ENOSPC) names out_path and the bytes needed, and nothing is left behind.
    """
    import gguf

    out_path = os.path.abspath(os.fspath(out_path))
    if os.path.isdir(out_path):
        raise ValueError(f"out_path {out_path!r} is a folder; expected the path of the .gguf file to write")
    folder = os.path.dirname(out_path)
    os.makedirs(folder, exist_ok=True)
    writer = gguf.GGUFWriter(None, arch)
    for key, value, kind in metadata:
        vtype = gguf.GGUFValueType[kind]
        if isinstance(value, list):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    sizes = []
    for name, shape, kind in layout:
        sizes.append(tensor_nbytes(shape, kind))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), sizes[-1], raw_dtype=gguf.GGMLQuantizationType[kind])
    data_bytes = sum(writer.ggml_pad(n, writer.data_alignment) for n in sizes)

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    needed = data_bytes
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        needed = writer.fout[0].tell() + writer.data_alignment + data_bytes
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"{out_path}: not enough disk space: the GGUF needs {needed:,} bytes, "
                                        f"{free:,} are free in {folder}")
        count = 0
        for (name, shape, kind), n, a in zip(layout, sizes, arrays):
            if a.nbytes != n:
                raise ValueError(f"tensor {name!r}: {a.nbytes} bytes of {kind} data, its layout says {n}")
            writer.write_tensor_data(a)
            count += 1
        if count != len(layout):
            raise ValueError(f"{count} tensors written, the layout lists {len(layout)}")
        writer.close()
        _chmod_as_new_file(tmp)
        os.replace(tmp, out_path)
    except OSError as e:
        if e.errno == errno.ENOSPC and str(out_path) not in str(e):
            raise OSError(errno.ENOSPC, f"{out_path}: the disk filled up while writing: the GGUF needs "
                                        f"{needed:,} bytes in {folder}") from e
        raise
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _chmod_as_new_file(path: str) -> None:
    """mkstemp makes the file private (0600); give it the mode any new file of this user would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
