"""export_gguf, export_gguf_adapter: the fine-tuned model as one file for llama.cpp, Ollama, LM Studio.

export_gguf: the adapter merged into the checkpoint's original weights (W0 + scaling · B A in fp32, as
export_merged does: never the NF4 copy the adapter trained against), in llama.cpp's names and
layouts, with the architecture's metadata and the tokenizer (model/gguf_write.py, gguf_write_vocab.py).
Types: f32, f16, bf16 (round to nearest even), q8_0 and q4_0 (blocks of 32 weights sharing one scale).

export_gguf_adapter: the adapter alone as llama.cpp's LoRA GGUF, for `llama-cli -m base.gguf --lora`:

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = scaling · r
    blk.N.attn_q.weight.lora_a  (r, in)    A as PEFT stores it
    blk.N.attn_q.weight.lora_b  (out, r)   B, its rows permuted as the weight's are (q and k of llama)

llama.cpp scales B A by alpha / r with r read from the tensors, so alpha = scaling · r states plain
LoRA (alpha) and rsLoRA (alpha · √r) alike.

Both stream through the `gguf` package's GGUFWriter: the layout (names, shapes, types) comes from the
checkpoint's headers first, so the file's size is known and the free disk space checked before a
tensor is read; then each tensor is read, merged, converted and written in turn. The file is built
under a temporary name beside out_path and renamed when complete: a failure leaves no file behind
(folders made for out_path stay).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .export import adapter_deltas, merged_weight

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # the out_types model/gguf_write.py's OUT_TYPES maps


def export_gguf(checkpoint: str, adapter_dir: str, out_path: str, out_type: str = "f16") -> str:
    """Merge the adapter into `checkpoint` (an HF folder or a .gguf file) and write one GGUF file.

    out_type: of the 2-D weights ("f32", "f16", "bf16", "q8_0", "q4_0"); norms, biases and RoPE
    factors stay f32, and a weight whose rows do not fill whole blocks of 32 falls back to f16, as in
    llama.cpp's converter. A GGUF checkpoint's tokenizer metadata is carried over unchanged.
    Returns out_path.
    """
    from model import gguf_write, gguf_write_vocab, load as model_load

    if out_type not in GGUF_TYPES:
        raise ValueError(f"out_type={out_type!r}: expected one of {GGUF_TYPES}")
    config = model_load.read_config(checkpoint)
    metadata = gguf_write.architecture_metadata(config, out_type)  # what GGUF cannot state fails here
    A, B, scaling, M = adapter_deltas(adapter_dir)
    tied = config.tie_word_embeddings
    if tied and "lm_head.weight" in A:
        raise ValueError(f"{adapter_dir}: the adapter changes lm_head, which this model ties to the embedding; "
                         "a merged head would no longer be tied")
    tok = model_load.load_tokenizer(checkpoint)
    metadata += gguf_write_vocab.tokenizer_metadata(checkpoint, tok, config.vocab_size)
    metadata += [("general.type", "model", "STRING"), ("general.name", _model_name(checkpoint), "STRING")]

    arch = gguf_write.gguf_arch(config)
    extra = gguf_write.rope_tensors(config)
    shapes = [(n, s) for n, s in model_load.tensor_shapes(checkpoint) if not (tied and n == "lm_head.weight")]
    unused = sorted(set(A) - {n for n, _ in shapes})
    if unused:
        raise ValueError(f"{adapter_dir}: adapted weights {unused[:4]} are not in the checkpoint {checkpoint}")
    layout = [(name, tuple(t.shape), "F32") for name, t in extra]
    for name, shape in shapes:
        gname = gguf_write.gguf_tensor_name(name, arch)
        layout.append((gname, shape, gguf_write.tensor_type(gname, shape, out_type)))

    def arrays() -> Iterator[np.ndarray]:
        for _, t in extra:
            yield gguf_write.encode(t, "F32")
        tensors = ((n, W) for n, W in model_load.iter_tensors(checkpoint) if not (tied and n == "lm_head.weight"))
        for (name, _), (read, W), (_, _, kind) in zip(shapes, tensors, layout[len(extra):]):
            assert read == name, f"{checkpoint}: tensor {read!r} read where its header listed {name!r}"
            W = merged_weight(name, W, A, B, scaling, M, checkpoint)
            yield gguf_write.encode(gguf_write.to_gguf_layout(name, W, config), kind)

    return write_gguf(out_path, arch, metadata, layout, arrays())


def export_gguf_adapter(checkpoint: str, adapter_dir: str, out_path: str) -> str:
    """Write the adapter in `adapter_dir` as llama.cpp's LoRA GGUF for the base model `checkpoint`
    (whose GGUF, e.g. the embedded default itself, llama.cpp runs it over). Tensors in f32. Returns out_path."""
    from model import gguf_write, load as model_load

    config = model_load.read_config(checkpoint)
    gguf_write.check_exportable(config)
    A, B, scaling, M = adapter_deltas(adapter_dir)
    if M:
        raise ValueError(f"{adapter_dir}: a DoRA adapter has no form in llama.cpp's LoRA GGUF (its update is not "
                         "B A alone); export the merged model with export_gguf instead")
    arch = gguf_write.gguf_arch(config)
    base = {n: s for n, s in model_load.tensor_shapes(checkpoint)
            if not (config.tie_word_embeddings and n == "lm_head.weight")}
    unknown = sorted(set(A) - set(base))
    if unknown:
        raise ValueError(f"{adapter_dir}: adapted weights {unknown[:4]} are not tensors of llama.cpp's {arch} model "
                         f"(the checkpoint {checkpoint} has none such, or ties them to another)")
    layout, pairs = [], []
    for name in (n for n in base if n in A):  # the checkpoint's order
        if base[name] != (B[name].shape[0], A[name].shape[1]):
            raise ValueError(f"{adapter_dir}: {name}: B A has shape {(B[name].shape[0], A[name].shape[1])}, "
                             f"the checkpoint's weight {base[name]}")
        gname = gguf_write.gguf_tensor_name(name, arch)
        r = A[name].shape[0]
        layout += [(gname + ".lora_a", tuple(A[name].shape), "F32"), (gname + ".lora_b", tuple(B[name].shape), "F32")]
        pairs += [A[name], gguf_write.to_gguf_layout(name, B[name], config)]
    if not pairs:
        raise ValueError(f"{adapter_dir}: the adapter adapts no weight")
    metadata = [("general.type", "adapter", "STRING"), ("general.name", _model_name(adapter_dir), "STRING"),
                ("adapter.type", "lora", "STRING"), ("adapter.lora.alpha", scaling * r, "FLOAT32")]
    return write_gguf(out_path, arch, metadata, layout, (gguf_write.encode(t, "F32") for t in pairs))


def _model_name(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "model"


def write_gguf(out_path: str, arch: str, metadata: list[tuple[str, Any, str]],
               layout: list[tuple[str, tuple[int, ...], str]], arrays: Iterable[np.ndarray]) -> str:
    """Write a GGUF file: metadata [(key, value, GGUF value type; a list is an array of it)], tensor
    layout [(name, shape, GGML type)] and then each tensor's bytes from `arrays`, in layout order.

    The file is written to a temporary name in out_path's folder and renamed when complete. Its size is
    known before any tensor is written; with too little free space, or when the disk fills up anyway,
    OSError(ENOSPC) names out_path and the bytes needed, and nothing is left behind.
    """
    import gguf

    from model.gguf_write import tensor_nbytes

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
