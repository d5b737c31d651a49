"""The tokenizer as GGUF metadata: what llama.cpp needs to turn text into the same ids as ours.

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokenizer.ggml.pre          the split before BPE, by llama.cpp's name for it ("llama-bpe", "qwen2", ...)
    tokenizer.ggml.tokens       every token in id order, padded to the embedding's rows with "[PAD<id>]"
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "a b" in priority order (gpt2);  tokenizer.ggml.scores (llama)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_space_prefix
    tokenizer.chat_template     the Jinja chat template

Three sources: a GGUF checkpoint's own keys, carried over byte for byte; an HF folder's
`tokenizer.model` (sentencepiece: llama.cpp's converter prefers it where it exists); its
`tokenizer.json` (byte-level BPE). Metadata entries are (key, value, GGUF type); a list value is an
array of that type.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .checkpoint import Checkpoint
from .gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT
from .tokenizer import Tokenizer, _read_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# tokenizer.json pre-tokenizer steps -> llama.cpp's name of the same split rules
PRE_TOKENIZERS = {
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",      # Llama 3
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",           # Qwen2, Qwen3
    (("Digits", True), ("ByteLevel", True)): "smollm",                  # SmolLM, SmolLM2
    (("ByteLevel", True),): "gpt-2",
}

Entry = tuple[str, Any, str]


def tokenizer_metadata(checkpoint: Checkpoint) -> list[Entry]:
    """[(key, value, GGUF type)] of the tokenizer of an opened checkpoint (a .gguf file or an HF folder)."""
    if checkpoint.kind == "gguf":
        return _carried(checkpoint)
    tok, vocab_size, checkpoint = checkpoint.tokenizer, checkpoint.config.vocab_size, checkpoint.path
    sp_file = os.path.join(checkpoint, "tokenizer.model")
    config = _read_json(os.path.join(checkpoint, "tokenizer_config.json"))
    spec = json.loads(tok.backend.to_str()) if tok.backend is not None else {}
    if os.path.isfile(sp_file):
        entries = _sentencepiece(Tokenizer.from_sentencepiece(sp_file).sp, spec, vocab_size)
    elif spec.get("model", {}).get("type") == "BPE" and not spec["model"].get("byte_fallback"):
        entries = _byte_level_bpe(spec, vocab_size, checkpoint)
    else:
        kind = spec.get("model", {}).get("type")
        raise ValueError(f"{checkpoint}: a {kind} tokenizer without tokenizer.model has no GGUF form llama.cpp reads "
                         "(expected byte-level BPE in tokenizer.json, or a sentencepiece tokenizer.model)")
    unk = tok.special.get("unk")
    unk_id = None if unk is None else tok.sp.PieceToId(unk) if tok.sp is not None else tok.backend.token_to_id(unk)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unknown": unk_id, "padding": tok.pad_id}
    entries += [(f"tokenizer.ggml.{k}_token_id", i, "UINT32") for k, i in ids.items() if i is not None]
    entries.append(("tokenizer.ggml.add_bos_token", _adds_bos(config, spec, tok, sentencepiece=os.path.isfile(sp_file)),
                    "BOOL"))
    if tok.chat_template:
        entries.append(("tokenizer.chat_template", tok.chat_template, "STRING"))
    return entries


def _carried(checkpoint: Checkpoint) -> list[Entry]:
    """Every `tokenizer.*` key of a GGUF file, with its own type; strings as raw bytes, unchanged."""
    import gguf

    out = []
    for key, field in checkpoint.gguf_reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = gguf.GGUFValueType(field.types[-1])
        if kind == gguf.GGUFValueType.STRING:
            values = [bytes(field.parts[i]) for i in field.data]
            value = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
        else:
            value = field.contents()
        out.append((key, value, kind.name))
    return out


def _pre_tokenizer(spec: dict[str, Any] | None) -> tuple:
    """A tokenizer.json pre-tokenizer as the tuple of its steps, the key of PRE_TOKENIZERS."""
    if not spec:
        return ()
    steps = spec["pretokenizers"] if spec["type"] == "Sequence" else [spec]
    out = []
    for s in steps:
        if s["type"] == "Split":
            out.append(("Split", s["pattern"].get("Regex", s["pattern"].get("String"))))
        elif s["type"] == "ByteLevel":
            out.append(("ByteLevel", s.get("use_regex", True)))
        elif s["type"] == "Digits":
            out.append(("Digits", s.get("individual_digits", False)))
        else:
            out.append((s["type"],))
    return tuple(out)


def _padded(tokens: dict[int, str], types: dict[int, int], vocab_size: int, source: str) -> tuple[list, list]:
    """Tokens and types in id order, each id without a token named "[PAD<id>]" and marked unused."""
    if tokens and max(tokens) >= vocab_size:
        raise ValueError(f"{source}: token id {max(tokens)} is past the model's vocab_size {vocab_size}")
    return ([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
            [types.get(i, UNUSED) if i in tokens else UNUSED for i in range(vocab_size)])


def _byte_level_bpe(spec: dict[str, Any], vocab_size: int, source: str) -> list[Entry]:
    """tokenizer.json's byte-level BPE: tokens already in GPT-2's byte alphabet, merges, split rules."""
    signature = _pre_tokenizer(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise ValueError(f"{source}: tokenizer.json's pre-tokenizer {signature} is not one llama.cpp names; "
                         f"known: {sorted(PRE_TOKENIZERS.values())}")
    tokens = {i: t for t, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    # merges come as "a b" or as [a, b]; a space inside a part is spelled as GPT-2's alphabet spells it
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "Ġ") for p in m) for m in spec["model"]["merges"]]
    tokens_list, types_list = _padded(tokens, types, vocab_size, source)
    return [("tokenizer.ggml.model", "gpt2", "STRING"), ("tokenizer.ggml.pre", pre, "STRING"),
            ("tokenizer.ggml.tokens", tokens_list, "STRING"), ("tokenizer.ggml.token_type", types_list, "INT32"),
            ("tokenizer.ggml.merges", merges, "STRING")]


def _sentencepiece(sp, spec: dict[str, Any], vocab_size: int) -> list[Entry]:
    """A sentencepiece model's pieces, scores and types, plus tokenizer.json's added tokens past them."""
    n = sp.GetPieceSize()
    tokens = {i: sp.IdToPiece(i) for i in range(n)}
    scores = {i: sp.GetScore(i) for i in range(n)}
    types = {i: UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
             else BYTE if sp.IsByte(i) else NORMAL for i in range(n)}
    for added in spec.get("added_tokens", []):
        if added["id"] >= n or added["content"] != tokens.get(added["id"]):  # e.g. Phi-3's <|user|>
            tokens[added["id"]], scores[added["id"]] = added["content"], -1000.0
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    tokens_list, types_list = _padded(tokens, types, vocab_size, "tokenizer.model")
    return [("tokenizer.ggml.model", "llama", "STRING"), ("tokenizer.ggml.pre", "default", "STRING"),
            ("tokenizer.ggml.tokens", tokens_list, "STRING"),
            ("tokenizer.ggml.scores", [float(scores.get(i, -10000.0)) for i in range(vocab_size)], "FLOAT32"),
            ("tokenizer.ggml.token_type", types_list, "INT32"),
            # sentencepiece's dummy prefix: "a" becomes "▁a" when it puts a space in front
            ("tokenizer.ggml.add_space_prefix", sp.EncodeAsPieces("a")[0].startswith("\u2581"), "BOOL")]


def _adds_bos(config: dict[str, Any], spec: dict[str, Any], tok: Tokenizer, sentencepiece: bool) -> bool:
    """Whether the tokenizer puts BOS in front: tokenizer_config.json's add_bos_token, else a post-processor
    template that starts with the BOS token, else sentencepiece's default (yes) or BPE's (no)."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    post = spec.get("post_processor") or {}
    for step in post.get("processors", [post]):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            return first is not None and first == tok.special.get("bos")
    return sentencepiece

