"""Reading llama.cpp's GGUF files: metadata, tensors in HF names and layout, the embedded vocabulary.

A GGUF file holds one model: a header of metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...)
and the tensors, often quantized block-wise (Q4_0, Q4_1, Q8_0, K-quants). The `gguf` package
dequantizes each tensor to numpy; here we rename it to the HF checkpoint's name and undo the row
permutation llama.cpp's converter applies to the query and key projections.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"

# llama.cpp block tensor name -> HF module path inside `model.layers.N`
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",      # qwen3, gemma3
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",       # phi3
}
# Where an architecture's names differ: Gemma's four norms per block, Phi-3's fused gate and up.
_ARCH_BLOCK_NAMES = {
    "gemma2": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}
_ARCH_BLOCK_NAMES["gemma3"] = _ARCH_BLOCK_NAMES["gemma2"]
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that only carry RoPE frequencies: the model recomputes them from the config.
ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")
# Arrays too large to turn into Python lists just to read the shape of the model.
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def is_gguf(path: str) -> bool:
    """True when `path` is a file starting with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str):
    """A memory-mapped `gguf.GGUFReader` of the file (`model.checkpoint.Checkpoint` opens it once)."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (it does not start with the magic bytes {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on damaged files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metadata of an opened file (`open_gguf`) as plain Python values; the big tokenizer arrays
    only when named in `arrays`.

    Also sets `_has_output_tensor`, which `LlamaConfig.from_gguf` reads to tell a tied head from an
    untied one (a tied model has no `output.weight` tensor), `_bias_tensors` (the block tensors with a
    bias, e.g. ["attn_k", "attn_q", "attn_v"]), and `_rope_freqs` when the file has one.
    """
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in _BIG_ARRAYS and key not in arrays:
            if key == "tokenizer.ggml.tokens":  # its length is the vocabulary size
                fields["_n_tokens"] = len(field.data)
            continue
        fields[key] = field.contents()
    for tensor, key in (("rope_freqs", "_rope_freqs"), ("rope_factors_long", "_rope_factors_long"),
                        ("rope_factors_short", "_rope_factors_short")):
        factors = _rope_factors(reader, tensor)
        if factors is not None:
            fields[key] = factors.tolist()
    arch = fields.get("general.architecture")
    if fields.get(f"{arch}.vocab_size") is None and "_n_tokens" in fields:
        fields[f"{arch}.vocab_size"] = fields["_n_tokens"]
    names = {t.name for t in reader.tensors}
    fields["_has_output_tensor"] = "output.weight" in names
    # which projections carry a bias, as the tensors of the first block say (a llama with attention_bias)
    fields["_bias_tensors"] = sorted(n.split(".")[2] for n in names if n.startswith("blk.0.") and n.endswith(".bias"))
    return fields


def _to_torch(t) -> torch.Tensor:
    """A GGUF tensor's values as a flat fp32 torch tensor (dequantized; copied off the read-only map)."""
    from gguf.quants import dequantize

    # a plain ndarray over the map: the quantizers slice it row by row, and numpy.memmap's slices are slow
    a = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy()).reshape(-1)


def _rope_factors(reader, name: str = "rope_freqs") -> torch.Tensor | None:
    """The (head_dim/2,) `rope_freqs` tensor of a GGUF file (or Phi-3's `rope_factors_long`/`_short`), or None.

    llama.cpp stores Llama-3.1's frequency scaling this way instead of in the metadata: each inverse
    frequency of RoPE is divided by its factor (1 for short wavelengths, `factor` for long ones).
    """
    for t in reader.tensors:
        if t.name == f"{name}.weight":
            return _to_torch(t)
    return None


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for RoPE frequency tensors."""
    base, _, kind = gguf_name.rpartition(".")
    if base in ROPE_TENSORS:
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{kind}"
    return gguf_name  # unknown: the loader reports it by its own name


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's query/key row order.

    llama.cpp's RoPE rotates adjacent pairs (x_0, x_1), HF's rotates halves (x_i, x_{i+hs/2}), so its
    converter interleaves the two halves of each head's rows: rows (h, 2, hs/2) are stored as
    (h, hs/2, 2). Swapping the two axes back restores the HF layout. (out,) biases work the same way.
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, n_heads: int, n_kv_heads: int, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor in HF layout) for every tensor of an opened GGUF file, one at a time.

    arch: the GGUF architecture. llama.cpp's converter stores Gemma's norm weights as 1 + w (its
    runtime has no offset); HF's w is that minus one.
    """
    permuted = arch in ("llama", "mistral")  # their converter permutes q/k; the others keep HF order
    gemma = arch in ("gemma2", "gemma3")
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        # GGUF lists dimensions innermost first; numpy data already has HF's (out, in) order
        shape = tuple(int(d) for d in reversed(t.shape))
        w = _to_torch(t).reshape(shape)
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, n_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, n_kv_heads)
        elif gemma and name.endswith("norm.weight"):
            w = w - 1.0
        yield name, w


# ---------------------------------------------------------------------------- key-values alone
# GGUF value types: (struct format, numpy dtype) of each fixed-size one; 8 is a string, 9 an array
_SCALARS = {0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "u2"), 3: ("h", "i2"), 4: ("I", "u4"), 5: ("i", "i4"),
            6: ("f", "f4"), 7: ("?", "?"), 10: ("Q", "u8"), 11: ("q", "i8"), 12: ("d", "f8")}
_STRING, _ARRAY = 8, 9


def read_gguf_kv(path: str) -> dict[str, Any]:
    """The key-value metadata of a GGUF file as plain Python values, read straight from its bytes.

    Layout (GGUF v2/v3): b"GGUF", version u32, tensor count u64, key-value count u64, then each pair:
    key (u64 length + UTF-8), value type u32, value. A string is u64 length + bytes; an array is item
    type u32, count u64, items. Numeric arrays are read by numpy in one go. The same values as the
    `gguf` package's reader gives, without the numpy view it builds for every element: Llama 3's
    128,256 tokens and 280,147 merges take a fraction of a second instead of many.
    """
    import mmap
    import struct

    if not is_gguf(path):
        raise (ValueError if os.path.isfile(path) else FileNotFoundError)(
            f"{path}: not a GGUF file (expected the magic bytes {GGUF_MAGIC!r} at its start)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        off = 4

        def take(fmt: str):
            nonlocal off
            values = struct.unpack_from(order + fmt, buf, off)
            off += struct.calcsize(order + fmt)
            return values[0] if len(values) == 1 else values

        def string() -> str:
            nonlocal off
            n = take("Q")
            off += n
            if off > len(buf):
                raise ValueError(f"a string of {n} bytes runs past the end of the file")
            return bytes(buf[off - n:off]).decode("utf-8")

        def value(kind: int):
            nonlocal off
            if kind == _STRING:
                return string()
            if kind in _SCALARS:
                return take(_SCALARS[kind][0])
            if kind != _ARRAY:
                raise ValueError(f"unknown value type {kind} at byte {off}")
            item, n = take("I"), take("Q")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item][1]).newbyteorder(order)
                items = np.frombuffer(buf, dtype, n, off).tolist()
                off += n * dtype.itemsize
                return items
            return [value(item) for _ in range(n)]

        try:
            order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # a big-endian file swaps all
            version, _, n_kv = take("IQQ")
            if version < 2:
                raise ValueError(f"version {version} is not supported (2 and 3 are)")
            return {string(): value(take("I")) for _ in range(n_kv)}
        except (struct.error, ValueError, OverflowError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{path}: damaged GGUF metadata ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------- sentencepiece vocabularies
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s travel as 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str (length-delimited), float (fixed 32), or int/bool (varint)."""
    import struct

    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def spm_model_proto(meta: dict[str, Any]) -> bytes:
    """A GGUF `llama` vocabulary (tokenizer.ggml.model "llama": Llama 2, Gemma, Phi-3) as a serialized
    sentencepiece ModelProto, so sentencepiece itself runs it.

    llama.cpp keeps each piece, its score and its type (1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte: sentencepiece's own numbering) and whether a space is put in front of the text;
    the model is sentencepiece's BPE (merges by score) with the identity normalizer.
    """
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # sentencepiece wants exactly one unknown piece, the unk id's: Phi-3's file also marks its
    # [PAD...] fillers unknown (they become unused: never produced) and its <unk> control
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is not None or 2 in types:
        unk = int(unk) if unk is not None else types.index(2)
        types = [2 if i == unk else (5 if ty == 2 else ty) for i, ty in enumerate(types)]
    pieces = b"".join(
        _field(1, _field(1, t) + _field(2, float(scores[i]) if i < len(scores) else 0.0) + _field(3, types[i]))
        for i, t in enumerate(tokens))

    def special(key: str) -> int:
        value = meta.get(f"tokenizer.ggml.{key}")
        return -1 if value is None else int(value)

    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(35, 6 in types) + _field(40, max(special("unknown_token_id"), 0))
               + _field(41, special("bos_token_id")) + _field(42, special("eos_token_id"))
               + _field(43, special("padding_token_id")))
    # sentencepiece finds its special ids by piece (default "<unk>", "<s>", "</s>", "<pad>"): name them
    for number, key in ((45, "unknown_token_id"), (46, "bos_token_id"), (47, "eos_token_id"), (48, "padding_token_id")):
        if 0 <= special(key) < len(tokens):
            trainer += _field(number, tokens[special(key)])
    normalizer = (_field(1, "identity") + _field(3, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
                  + _field(4, False) + _field(5, True))
    return pieces + _field(2, trainer) + _field(3, normalizer)
