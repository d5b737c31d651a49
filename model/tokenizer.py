"""Tokenizer: text <-> token ids, from any of the three places checkpoints keep their vocabulary.

- `tokenizer.model`: a sentencepiece model (Llama 2, Mistral), run by `sentencepiece` itself;
- `tokenizer.json`: an HF `tokenizers` pipeline (Llama 3, Qwen2, SmolLM2), run by `tokenizers`;
- a GGUF file's `tokenizer.ggml.*` metadata: for byte-level BPE vocabularies (`tokenizer.ggml.model`
  "gpt2", as SmolLM2's and Qwen's) we rebuild the `tokenizers` pipeline from the tokens and merges
  (model/gguf_vocab.py); for sentencepiece ones ("llama": Gemma's, Phi-3's) the sentencepiece model
  from pieces and scores (model/gguf.py `spm_model_proto`).

`encode` never adds special tokens on its own: `bos=True` asks for the BOS id in front. Special
tokens written in the text (`<|im_start|>`, `<|eot_id|>`, `<s>`) become their ids, as in transformers.

`chat_template` is the model's own Jinja template (`chat_template.jinja`, `tokenizer_config.json` or the
GGUF key `tokenizer.chat_template`; None when it has none): `apply_chat_template(messages)` gives the
ids transformers' `apply_chat_template(messages, tokenize=True)` gives (model/chat_template.py).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from .chat_template import read_chat_template, render_chat


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids over a `tokenizers.Tokenizer` or a `sentencepiece.SentencePieceProcessor`.

    Attributes: bos_id, eos_id, pad_id (eos when the files name no pad), vocab_size, chat_template
    (the model's Jinja template or None; assign a string, e.g. `model.CHATML`, to set one), source
    (the folder or file it was read from, named in errors).
    """

    def __init__(self, backend: Any = None, sp: Any = None, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, special: dict[str, str | None] | None = None,
                 chat_template: str | None = None, source: str | None = None, added_tokens: Sequence[str] = ()):
        assert (backend is None) != (sp is None), "exactly one of backend and sp"
        self.backend, self.sp = backend, sp
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.special = special or {}  # bos/eos/pad/unk token strings, for save_pretrained and templates
        self.chat_template, self.source = chat_template, source
        # sentencepiece never matches its control pieces (<s>, <|end|>) in text: we split them out
        # first, as transformers' added tokens do (longest first); each piece between is encoded alone
        if sp is not None:
            added = {sp.IdToPiece(i) for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)}
            added = sorted(added | set(added_tokens), key=len, reverse=True)
            self._added = {t: sp.PieceToId(t) for t in added}
            self._added_ids = set(self._added.values())
            self._split = re.compile("|".join(map(re.escape, added))) if added else None

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
                   special=special, chat_template=read_chat_template(folder), source=folder)

    @classmethod
    def from_sentencepiece(cls, file: str, proto: bytes | None = None, added_tokens: Sequence[str] = (),
                           chat_template: str | None = None) -> "Tokenizer":
        """A sentencepiece `tokenizer.model` (or its serialized `proto`, read from `file`), run by
        sentencepiece itself (byte fallback included). A `tokenizer.model` takes the chat template
        of its folder (`chat_template.jinja` or `tokenizer_config.json`), if it has one."""
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
        source = file
        if proto is None:  # a file: its folder is the checkpoint, and may hold the chat template
            source = os.path.dirname(file) or "."
            chat_template = read_chat_template(source) if chat_template is None else chat_template
        return cls(sp=sp, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], special=special,
                   chat_template=chat_template, source=source, added_tokens=added_tokens)

    @classmethod
    def from_gguf(cls, path: str, meta: dict | None = None) -> "Tokenizer":
        """The vocabulary a GGUF file embeds: byte-level BPE ("gpt2") or sentencepiece ("llama").
        meta: the file's key-values when already read (`Checkpoint.key_values`)."""
        from .gguf import read_gguf_kv, spm_model_proto
        from .gguf_vocab import GGUF_USER_DEFINED, bpe_backend

        meta = read_gguf_kv(path) if meta is None else meta
        kind = meta.get("tokenizer.ggml.model")
        template = meta.get("tokenizer.chat_template")
        if kind == "llama":
            types = meta.get("tokenizer.ggml.token_type") or []
            user_defined = [t for t, ty in zip(meta["tokenizer.ggml.tokens"], types) if ty == GGUF_USER_DEFINED]
            return cls.from_sentencepiece(path, proto=spm_model_proto(meta), added_tokens=user_defined,
                                          chat_template=template)
        if kind != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; expected byte-level BPE ('gpt2') "
                             "or sentencepiece ('llama')")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        backend = bpe_backend(meta)
        def get(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None else None

        ids = {"bos": get("bos_token_id"), "eos": get("eos_token_id"), "pad": get("padding_token_id"),
               "unk": get("unknown_token_id")}
        special = {k: tokens[i] if i is not None else None for k, i in ids.items()}
        return cls(backend=backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], special=special,
                   chat_template=template, source=path)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp is not None else self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Text -> ids, with the BOS id in front when `bos` (and the vocabulary has one)."""
        if self.sp is not None:
            ids = [i for i, _ in self._sp_encode(text)] if self._split else self.sp.EncodeAsIds(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `encode(text)` and, for each, the (start, end) character span of `text` it came
        from. A token that is only part of a character (byte fallback, byte-level BPE) spans the whole
        character (sentencepiece gives the character to the last of its byte tokens, the others span
        nothing); sentencepiece's "▁" put in front of a piece spans nothing (start == end)."""
        if self.sp is None:
            enc = self.backend.encode(text, add_special_tokens=False)
            return enc.ids, [tuple(o) for o in enc.offsets]
        pairs = self._sp_encode(text)
        return [i for i, _ in pairs], [span for _, span in pairs]

    def _sp_encode(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """sentencepiece with added tokens split out first: (id, character span) pairs."""
        out, start = [], 0
        for m in (self._split.finditer(text) if self._split else ()):
            out += self._sp_piece(text, start, m.start())
            out.append((self._added[m.group()], m.span()))
            start = m.end()
        return out + self._sp_piece(text, start, len(text))

    def _sp_piece(self, text: str, start: int, end: int) -> list[tuple[int, tuple[int, int]]]:
        if start == end:
            return []
        enc = self.sp.encode(text[start:end], return_type="offset_mapping")  # character offsets
        return [(i, (start + lo, start + hi)) for i, (lo, hi) in zip(enc["ids"], enc["offsets"])]

    # ------------------------------------------------------------------ chat
    def template_tokens(self) -> dict[str, str]:
        """The special-token strings a chat template may use: bos_token, eos_token, unk_token, pad_token."""
        return {f"{k}_token": v for k, v in self.special.items() if v is not None}

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    chat_template: str | None = None, **template_kwargs) -> str:
        """The conversation as text, written by the model's chat template (or `chat_template`)."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            where = self.source or "this tokenizer"
            raise ValueError(
                f"{where}: the model has no chat template (no chat_template.jinja, no 'chat_template' in "
                "tokenizer_config.json, no tokenizer.chat_template in a GGUF). Give it one: "
                "tok.chat_template = open('template.jinja').read(), or tok.chat_template = model.CHATML "
                "for ChatML, or pass chat_template=... here")
        return render_chat(template, messages, add_generation_prompt, self.template_tokens(), **template_kwargs)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None, **template_kwargs) -> list[int]:
        """The conversation's token ids: `render_chat`, then `encode` without adding BOS (the template
        writes it where the model wants it): transformers' `apply_chat_template(messages, tokenize=True)`."""
        return self.encode(self.render_chat(messages, add_generation_prompt, chat_template, **template_kwargs))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids (a list or a 1-D tensor) -> text."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.sp is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # as encode cut the text at added tokens, each run between them is decoded alone
        pieces, run = [], []
        for i in ids + [None]:
            if i is None or i in self._added_ids:
                pieces.append(self.sp.DecodeIds(run))
                run = []
                if i is not None and not (skip_special_tokens and (self.sp.IsControl(i) or self.sp.IsUnknown(i))):
                    pieces.append(self.sp.IdToPiece(i))
            else:
                run.append(i)
        return "".join(pieces)

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens' strings (<|im_start|>, <|eot_id|>, </s>...) that text may hold: the control
        tokens (which `decode(..., skip_special_tokens=True)` leaves out) and the named bos/eos/pad/unk."""
        if self.sp is not None:
            control = {t for t, i in self._added.items() if self.sp.IsControl(i)}
            matched = set(self._added)
        else:
            added = self.backend.get_added_tokens_decoder().values()
            control, matched = {t.content for t in added if t.special}, {t.content for t in added}
        return sorted(control | (matched & {v for v in self.special.values() if v}))

    def save_pretrained(self, folder: str) -> None:
        """Write files that `transformers.AutoTokenizer.from_pretrained(folder)` loads to the same ids.

        tokenizers pipelines: `tokenizer.json` + `tokenizer_config.json`. sentencepiece: the
        `tokenizer.model` itself + a `tokenizer_config.json` naming Llama's tokenizer class. The chat
        template, if any, goes into `tokenizer_config.json` ("chat_template"), where every version reads it.
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
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
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
