"""Tokenizer: text <-> token ids, from any of the three places checkpoints keep their vocabulary.

- `tokenizer.model`: a sentencepiece model (Llama 2, Mistral), run by `sentencepiece` itself;
- `tokenizer.json`: an HF `tokenizers` pipeline (Llama 3, Qwen2, SmolLM2), run by `tokenizers`;
- a GGUF file's `tokenizer.ggml.*` metadata: for byte-level BPE vocabularies (`tokenizer.ggml.model`
  "gpt2", as SmolLM2's and Qwen's) we rebuild the `tokenizers` pipeline from the tokens and merges;
  for sentencepiece ones ("llama": Gemma's, Phi-3's) the sentencepiece model from pieces and scores.

`encode` never adds special tokens on its own: `bos=True` asks for the BOS id in front.
"""
from __future__ import annotations

import json
import os
from typing import Any

GGUF_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` names that differ from GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}


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


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids over a `tokenizers.Tokenizer` or a `sentencepiece.SentencePieceProcessor`.

    Attributes: bos_id, eos_id, pad_id (eos when the files name no pad), vocab_size.
    """

    def __init__(self, backend: Any = None, sp: Any = None, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, special: dict[str, str | None] | None = None):
        assert (backend is None) != (sp is None), "exactly one of backend and sp"
        self.backend, self.sp = backend, sp
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.special = special or {}  # bos/eos/pad/unk token strings, for save_pretrained

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """From an HF folder: `tokenizer.json` if present, else sentencepiece `tokenizer.model`."""
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return cls.from_tokenizer_json(folder)
        if os.path.isfile(os.path.join(folder, "tokenizer.model")):
            return cls.from_sentencepiece(os.path.join(folder, "tokenizer.model"))
        raise FileNotFoundError(f"{folder}: no tokenizer.json nor tokenizer.model in this folder")

    @classmethod
    def from_tokenizer_json(cls, folder: str) -> "Tokenizer":
        """`tokenizer.json`, with special tokens named by `tokenizer_config.json` (else `config.json`'s ids)."""
        from tokenizers import Tokenizer as Backend

        file = os.path.join(folder, "tokenizer.json")
        try:
            backend = Backend.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({e})") from e
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(folder, "config.json"))
        special = {k: _token_content(cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}

        def token_id(kind: str) -> int | None:
            if special[kind] is not None:
                return backend.token_to_id(special[kind])
            value = model_cfg.get(f"{kind}_token_id")
            return value[0] if isinstance(value, list) else value

        return cls(backend=backend, bos_id=token_id("bos"), eos_id=token_id("eos"), pad_id=token_id("pad"),
                   special=special)

    @classmethod
    def from_sentencepiece(cls, file: str, proto: bytes | None = None) -> "Tokenizer":
        """A sentencepiece `tokenizer.model` (or its serialized `proto`, read from `file`), run by
        sentencepiece itself (byte fallback included)."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto) if proto is not None else sp.Load(file)
        except Exception as e:
            raise ValueError(f"{file}: not a sentencepiece model ({e})") from e

        def valid(i: int) -> int | None:
            return i if i >= 0 else None

        ids = {"bos": valid(sp.bos_id()), "eos": valid(sp.eos_id()), "pad": valid(sp.pad_id()),
               "unk": valid(sp.unk_id())}
        special = {k: sp.IdToPiece(i) if i is not None else None for k, i in ids.items()}
        return cls(sp=sp, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], special=special)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """The vocabulary a GGUF file embeds: byte-level BPE ("gpt2") or sentencepiece ("llama")."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        from .gguf import gguf_metadata, spm_model_proto

        arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
        meta = gguf_metadata(path, arrays=arrays)
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls.from_sentencepiece(path, proto=spm_model_proto(meta))
        if kind != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; expected byte-level BPE ('gpt2') "
                             "or sentencepiece ('llama')")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        spell = bytes_to_unicode()
        alphabet = set(spell.values())
        # Every regular token is already written in the byte alphabet; respell any that is not.
        vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
        split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is None:  # GPT-2's own split regex, inside ByteLevel
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, ...) must match whole, never be cut into bytes.
        types = meta.get("tokenizer.ggml.token_type") or []
        control = [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL and set(t) <= alphabet]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])

        def get(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        ids = {"bos": get("bos_token_id"), "eos": get("eos_token_id"), "pad": get("padding_token_id"),
               "unk": get("unknown_token_id")}
        special = {k: tokens[i] if i is not None else None for k, i in ids.items()}
        return cls(backend=backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], special=special)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp is not None else self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Text -> ids, with the BOS id in front when `bos` (and the vocabulary has one)."""
        if self.sp is not None:
            ids = self.sp.EncodeAsIds(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids (a list or a 1-D tensor) -> text."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.sp is not None:
            if skip_special_tokens:
                ids = [i for i in ids if not (self.sp.IsControl(i) or self.sp.IsUnknown(i))]
            return self.sp.DecodeIds(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, folder: str) -> None:
        """Write files that `transformers.AutoTokenizer.from_pretrained(folder)` loads to the same ids.

        tokenizers pipelines: `tokenizer.json` + `tokenizer_config.json`. sentencepiece: the
        `tokenizer.model` itself + a `tokenizer_config.json` naming Llama's tokenizer class.
        """
        os.makedirs(folder, exist_ok=True)
        config: dict[str, Any] = {f"{k}_token": v for k, v in self.special.items() if v is not None}
        if self.sp is not None:
            with open(os.path.join(folder, "tokenizer.model"), "wb") as f:  # the file read, or one built from GGUF
                f.write(self.sp.serialized_model_proto())
            config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=False)
        else:
            tmp = os.path.join(folder, "tokenizer.json.tmp")
            self.backend.save(tmp)
            os.replace(tmp, os.path.join(folder, "tokenizer.json"))
            config.update(tokenizer_class="PreTrainedTokenizerFast")
        if "pad_token" not in config and self.pad_id is not None:
            config["pad_token"] = self._piece(self.pad_id)
        tmp = os.path.join(folder, "tokenizer_config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        os.replace(tmp, os.path.join(folder, "tokenizer_config.json"))

    def _piece(self, i: int) -> str:
        return self.sp.IdToPiece(i) if self.sp is not None else self.backend.id_to_token(i)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = "sentencepiece" if self.sp is not None else "tokenizers"
        return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


def _read_json(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
