"""export_gguf, export_gguf_adapter: the fine-tuned model as one file for llama.cpp, Ollama, LM Studio.

export_gguf: the adapter merged as export_merged merges it (by default into the weights training saw:
the NF4 copy of W0 for a QLoRA adapter, lora/trained_on.py), in llama.cpp's names and layouts, with
the architecture's metadata and the tokenizer (model/gguf_write.py, gguf_write_vocab.py), whose
end-of-turn token is the one the chat template closes a turn with, so llama.cpp stops where the
model stops. Types written here: f32, f16, bf16 (round to nearest even), q8_0 and q4_0 (blocks of 32
weights sharing one scale). The k-quants people run (q4_k_m, q5_k_m, q6_k) are llama.cpp's own
quantizer's work: the f16 file goes through `llama_model_quantize` (llama-cpp-python) when it is
installed; otherwise `LlamaQuantizerMissing` says which `llama-quantize` command to run.

export_gguf_adapter: the adapter alone as llama.cpp's LoRA GGUF, for `llama-cli -m base.gguf --lora`:

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = scaling · r
    blk.N.attn_q.weight.lora_a  (r, in)    A as PEFT stores it
    blk.N.attn_q.weight.lora_b  (out, r)   B, its rows permuted as the weight's are (q and k of llama)

llama.cpp scales B A by alpha / r with r read from the tensors, so alpha = scaling · r states plain
LoRA (alpha) and rsLoRA (alpha · √r) alike. It adds B A to the base file's weights as they are, not
to an NF4 copy: the merged export is the one that answers as the trained model.

Both stream through the `gguf` package's GGUFWriter (`model.gguf_write.write_gguf`): the layout
(names, shapes, types) comes from the checkpoint's headers first, so the file's size is known and the
free disk space checked before a tensor is read; then each tensor is read, merged, converted and
written in turn. The file is built under a temporary name beside out_path and renamed when complete:
a failure leaves no file behind (folders made for out_path stay).
"""
from __future__ import annotations

import ctypes
import os
import shlex
import tempfile
from typing import Iterator

import numpy as np

from model import Checkpoint, end_of_turn_ids, open_checkpoint
from model import gguf_write, gguf_write_vocab
from model.gguf_write import OUT_TYPES, write_gguf

from .export import Merge

# llama.cpp's own quantizer's types: out_type -> its LLAMA_FTYPE number and llama-quantize's name
K_QUANTS = {"q4_k_m": (15, "Q4_K_M"), "q5_k_m": (17, "Q5_K_M"), "q6_k": (18, "Q6_K")}
GGUF_TYPES = (*OUT_TYPES, *K_QUANTS)


class LlamaQuantizerMissing(RuntimeError):
    """A k-quant was asked for without llama-cpp-python; `command` is the llama-quantize line to run on
    the f16 file, `f16_path`."""

    def __init__(self, f16_path: str, out_path: str, out_type: str):
        self.f16_path, self.out_path = f16_path, out_path
        self.command = f"llama-quantize {shlex.quote(f16_path)} {shlex.quote(out_path)} {K_QUANTS[out_type][1]}"
        super().__init__(f"{out_type} comes from llama.cpp's quantizer, and llama-cpp-python is not installed: "
                         f"run  {self.command}")


def export_gguf(checkpoint: str | Checkpoint, adapter_dir: str, out_path: str, out_type: str = "f16",
                merge_into: str = "trained", allow_other_checkpoint: bool = False) -> str:
    """Merge the adapter into `checkpoint` (an HF folder or a .gguf file) and write one GGUF file.

    out_type: of the 2-D weights: "f32", "f16", "bf16", "q8_0", "q4_0" written here (norms, biases and
    RoPE factors stay f32, and a weight whose rows do not fill whole blocks of 32 falls back to f16, as
    in llama.cpp's converter), or "q4_k_m", "q5_k_m", "q6_k" by llama.cpp's quantizer from the f16
    file. merge_into, allow_other_checkpoint: as `export_merged`. A GGUF checkpoint's tokenizer
    metadata is carried over, its end-of-turn id set from the chat template. Returns out_path.
    """
    if out_type not in GGUF_TYPES:
        raise ValueError(f"out_type={out_type!r}: expected one of {GGUF_TYPES}")
    if out_type in K_QUANTS:
        return _llama_quantized(checkpoint, adapter_dir, out_path, out_type, merge_into, allow_other_checkpoint)
    merge = Merge.open(checkpoint, adapter_dir, merge_into, allow_other_checkpoint)
    ckpt, config = merge.checkpoint, merge.checkpoint.config
    metadata = gguf_write.architecture_metadata(config, out_type)  # what GGUF cannot state fails here
    metadata += turn_end_metadata(ckpt, gguf_write_vocab.tokenizer_metadata(ckpt))
    metadata += [("general.type", "model", "STRING"), ("general.name", _model_name(ckpt.path), "STRING")]

    arch = gguf_write.gguf_arch(config)
    extra = gguf_write.rope_tensors(config)
    shapes = merge.shapes()
    layout = [(name, tuple(t.shape), "F32") for name, t in extra]
    for name, shape in shapes:
        gname = gguf_write.gguf_tensor_name(name, arch)
        layout.append((gname, shape, gguf_write.tensor_type(gname, shape, out_type)))

    def arrays() -> Iterator[np.ndarray]:
        for _, t in extra:
            yield gguf_write.encode(t, "F32")
        for (name, _), (read, W, _), (_, _, kind) in zip(shapes, merge.tensors(), layout[len(extra):]):
            assert read == name, f"{ckpt.path}: tensor {read!r} read where its header listed {name!r}"
            yield gguf_write.encode(gguf_write.to_gguf_layout(name, W, config), kind)

    return write_gguf(out_path, arch, metadata, layout, arrays())


def turn_end_metadata(checkpoint: Checkpoint, entries: list) -> list:
    """The tokenizer's entries with `tokenizer.ggml.eot_token_id` set to the token the chat template
    closes an assistant's turn with, where that is not EOS already (Llama 3's <|eot_id|>, Gemma's
    <end_of_turn>): llama.cpp and Ollama end a reply at EOS and EOT, and at no other token they are not told of."""
    tok = checkpoint.tokenizer
    ends = [i for i in end_of_turn_ids(tok) if i != tok.eos_id]
    entries = [e for e in entries if not (ends and e[0] == "tokenizer.ggml.eot_token_id")]
    return entries + ([("tokenizer.ggml.eot_token_id", ends[0], "UINT32")] if ends else [])


def _llama_quantized(checkpoint, adapter_dir: str, out_path: str, out_type: str, merge_into: str,
                     allow_other_checkpoint: bool) -> str:
    """The f16 export, quantized by llama.cpp's own quantizer (`llama_model_quantize`) to out_path."""
    out_path = os.path.abspath(out_path)
    try:
        import llama_cpp  # optional: the k-quants' block layouts and importance heuristics are llama.cpp's
    except ImportError:
        f16 = os.path.splitext(out_path)[0] + ".f16.gguf"
        export_gguf(checkpoint, adapter_dir, f16, "f16", merge_into, allow_other_checkpoint)
        raise LlamaQuantizerMissing(f16, out_path, out_type) from None
    folder = os.path.dirname(out_path)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".quantize-") as tmp:
        f16, quantized = os.path.join(tmp, "f16.gguf"), os.path.join(tmp, "out.gguf")
        export_gguf(checkpoint, adapter_dir, f16, "f16", merge_into, allow_other_checkpoint)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = K_QUANTS[out_type][0]
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(f16.encode(), quantized.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed to write {out_type} from {f16}")
        os.replace(quantized, out_path)
    return out_path


def export_gguf_adapter(checkpoint: str | Checkpoint, adapter_dir: str, out_path: str,
                        allow_other_checkpoint: bool = False) -> str:
    """Write the adapter in `adapter_dir` as llama.cpp's LoRA GGUF for the base model `checkpoint`
    (whose GGUF, e.g. the embedded default itself, llama.cpp runs it over). Tensors in f32. Returns out_path."""
    merge = Merge.open(checkpoint, adapter_dir, "original", allow_other_checkpoint)
    config = merge.checkpoint.config
    gguf_write.check_exportable(config)
    if merge.M:
        raise ValueError(f"{adapter_dir}: a DoRA adapter has no form in llama.cpp's LoRA GGUF (its update is not "
                         "B A alone); export the merged model with export_gguf instead")
    arch = gguf_write.gguf_arch(config)
    layout, pairs = [], []
    for name, shape in merge.shapes():  # the checkpoint's order
        if name not in merge.A:
            continue
        A, B = merge.A[name], merge.B[name]
        if shape != (B.shape[0], A.shape[1]):
            raise ValueError(f"{adapter_dir}: {name}: B A has shape {(B.shape[0], A.shape[1])}, the checkpoint's weight {shape}")
        gname = gguf_write.gguf_tensor_name(name, arch)
        layout += [(gname + ".lora_a", tuple(A.shape), "F32"), (gname + ".lora_b", tuple(B.shape), "F32")]
        pairs += [A, gguf_write.to_gguf_layout(name, B, config)]
    if not pairs:
        raise ValueError(f"{adapter_dir}: the adapter adapts no weight")
    r = pairs[0].shape[0]
    metadata = [("general.type", "adapter", "STRING"), ("general.name", _model_name(adapter_dir), "STRING"),
                ("adapter.type", "lora", "STRING"), ("adapter.lora.alpha", merge.scaling * r, "FLOAT32")]
    return write_gguf(out_path, arch, metadata, layout, (gguf_write.encode(t, "F32") for t in pairs))


def _model_name(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "model"
