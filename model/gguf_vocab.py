"""A GGUF file's byte-level BPE vocabulary ("gpt2": Llama 3's, Qwen's, SmolLM2's) as a `tokenizers` pipeline.

llama.cpp keeps the tokens, the merges, each token's type and the name of the pre-tokenizer
(`tokenizer.ggml.pre`); the pipeline is rebuilt from them: the pre-tokenizer's split regex, GPT-2's
byte alphabet, BPE over the merges, and the control tokens matched whole before anything else.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

GGUF_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>
GGUF_USER_DEFINED = 4  # added tokens matched whole in text but not special, such as <think>

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` names that differ from GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # as Llama 3's, but digits one by one
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe")
GGUF_PRE_SPLITS = {**{pre: _LLAMA3_SPLIT for pre in LLAMA3_PRES}, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each of the 256 bytes spelled as one printable character.

    Printable bytes stand for themselves; the others (space, control bytes) are moved to code points
    from 256 up, so a space is written `Ġ` and a newline `Ċ` in the vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_backend(meta: dict[str, Any]) -> "tokenizers.Tokenizer":
    """A `tokenizers.Tokenizer` from GGUF metadata (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    # Every regular token is already written in the byte alphabet; respell any that is not.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre")
    # Llama 3 takes a word that is itself a token whole, before any merge (llama.cpp and its
    # tokenizer.json agree: " Việt" is one token, though the merges would reach it another way)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, ignore_merges=pre in LLAMA3_PRES))
    split = GGUF_PRE_SPLITS.get(pre)
    if split is None:  # GPT-2's own split regex, inside ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole, never be cut into bytes; so must
    # user-defined ones (<think>), which are not special (decode keeps them)
    control = [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED and set(t) <= alphabet]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend
