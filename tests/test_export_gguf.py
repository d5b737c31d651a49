"""GGUF export against its references: our loader and transformers' GGUF loader read every family's
export to the logits of the merged full-precision model; llama.cpp itself loads each export, splits
text into the same tokens and computes the same logits; llama.cpp's LoRA path moves its logits as our
adapter moves ours; a write that fails midway leaves nothing under the final name."""
import copy
import errno
import json
import os

import numpy as np
import pytest
import torch

from conftest import tiny_hf_config
from lora import (GGUF_TYPES, K_QUANTS, LoRAConfig, apply_lora, export_gguf, export_gguf_adapter, merge_lora,
                  save_adapter)
from model import load_pretrained
from model.gguf_write import OUT_TYPES
from model.gguf_vocab import _LLAMA3_SPLIT
from test_families import FAMILIES, hf_model, targets_of
from test_model import STRINGS, sp_model_file  # noqa: F401  (a fixture: a trained sentencepiece model)

import transformers  # noqa: E402  (test extra: the reference)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding: `make test` builds it")

V = 320  # 256 bytes + merges + 4 special tokens < V: the last ids are llama.cpp's [PAD<id>] rows
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
EXPORT_FAMILIES = {  # one of each family llama.cpp runs, each with what its GGUF must state
    "llama": tiny_hf_config(vocab_size=V, attention_bias=True, rope_scaling=LLAMA3),  # q/k permuted, biases, rope_freqs
    "mistral": tiny_hf_config(model_type="mistral", vocab_size=V, head_dim=32),      # written as llama
    "qwen2": tiny_hf_config(model_type="qwen2", vocab_size=V, tie_word_embeddings=True),
    "qwen3": tiny_hf_config(model_type="qwen3", vocab_size=V, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gemma2": {**FAMILIES["gemma2_gqa_tied"], "query_pre_attn_scalar": 16},            # sentencepiece vocabulary
    "gemma3": {**FAMILIES["gemma3_gqa_linear_rope"], "vocab_size": V},
    "phi3": {**FAMILIES["phi3_gqa_longrope_partial"], "vocab_size": V},
}
# max |logits - merged model's| / max |logits| allowed per type: f32 exact but for the order of sums;
# f16 and bf16 one rounding of each weight (2^-11, 2^-8 relative); q8_0, q4_0 their block quantization
LIMITS = {"f32": 1e-6, "f16": 5e-3, "bf16": 4e-2, "q8_0": 0.15, "q4_0": 1.0}
PROMPTS = [[1, 40, 71, 99, 200, 35, 17, 250, 8, 64, 120, 33], [1, 5, 9, 300 % 256], [1, 77, 78, 79, 80, 81, 82, 83, 84]]


def byte_level_tokenizer(folder, add_bos: bool = True, special: list[str] = SPECIAL, template: str = TEMPLATE,
                         eos: str = SPECIAL[3]) -> None:
    """A byte-level BPE tokenizer.json as Llama 3's is built (its split regex, merges learned from a
    corpus), four special tokens, BOS put in front by the post-processor, and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V - 16, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([s for s in STRINGS if s.strip()] * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{special[0]} $A", special_tokens=[(special[0], 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": special[0], "eos_token": eos, "chat_template": template}))


def random_adapter(model, d, folder, rslora=False) -> str:
    """An adapter on every projection with B drawn at random (a trained one's B is not zero either)."""
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=tuple(targets_of(d)), use_rslora=rslora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, str(folder))
    return str(folder)


def logits_of(model, prompts=PROMPTS) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([p]))[0].float().numpy() for p in prompts]


def relative_error(a: list, b: list) -> float:
    """max |a - b| over every prompt and position, over the largest |b|."""
    return max(np.abs(x - y).max() for x, y in zip(a, b)) / max(np.abs(y).max() for y in b)


def llama_cpp_logits(path: str, prompts=PROMPTS, lora: str | None = None) -> list[np.ndarray]:
    # the KV cache in f32 (llama.cpp keeps it in f16 unless told): the comparison is of the weights alone
    llm = llama_cpp.Llama(model_path=path, lora_path=lora, logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)]))
    llm.close()
    return out


def family_checkpoint(name: str, folder, sp_model_file: str) -> dict:
    """Write a tiny random model of EXPORT_FAMILIES[name] as an HF folder (weights, tokenizer, chat
    template) into `folder`; returns its config dict."""
    d = dict(EXPORT_FAMILIES[name])
    if name == "gemma2":  # Gemma's own tokenizer.model: sentencepiece, exported as llama.cpp's "llama" vocabulary
        import sentencepiece

        d["vocab_size"] = sentencepiece.SentencePieceProcessor(model_file=sp_model_file).GetPieceSize() + 8
        (folder / "tokenizer.model").write_bytes(open(sp_model_file, "rb").read())
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    else:
        byte_level_tokenizer(folder)
    hf = hf_model(d)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("bias"):  # transformers starts biases at zero: make their layout show
                p.normal_(0, 0.5)
    hf.save_pretrained(str(folder))
    return d


@pytest.fixture(scope="module", params=list(EXPORT_FAMILIES))
def family(request, tmp_path_factory, sp_model_file):
    """(name, config dict, the merged model's logits, {type: export path}) for one tiny random model."""
    name = request.param
    folder = tmp_path_factory.mktemp("export")  # general.name: llama.cpp wants Phi-3's own tokens where it says phi3
    d = family_checkpoint(name, folder, sp_model_file)
    model, _ = load_pretrained(str(folder))
    adapter = random_adapter(model, d, tmp_path_factory.mktemp("adapter"))
    merge_lora(model)
    ref = logits_of(model)
    exports = {t: export_gguf(str(folder), adapter, str(folder / f"{name}-{t}.gguf"), t) for t in OUT_TYPES}
    return name, d, ref, exports


def transformers_logits(path: str, name: str) -> list[np.ndarray]:
    """transformers' GGUF loader on an export. Its mapping of GGUF keys to a config lacks biases, RoPE
    scalings, Gemma's score scalar and caps and Phi-3's partial rotary, so it reads the tensors under the
    checkpoint's config.json; mistral's GGUF (a llama) it reads whole."""
    folder, file = os.path.split(path)
    config = None if name == "mistral" else transformers.AutoConfig.from_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, config=config,
                                                               dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return [theirs(torch.tensor([p])).logits[0].numpy() for p in PROMPTS]


def test_every_type_loads_to_the_merged_models_logits(family):
    name, d, ref, exports = family
    for t, path in exports.items():
        model, _ = load_pretrained(path)
        ours = logits_of(model)
        err, agree = relative_error(ours, ref), relative_error(transformers_logits(path, name), ours)
        print(f"\n{name} {t}: ours {err:.1e} of the largest logit; transformers' GGUF loader {agree:.1e} from ours")
        assert err <= LIMITS[t] and agree <= 1e-5, (name, t, err, agree)


def test_llama_cpp_computes_the_merged_models_logits(family):
    name, d, ref, exports = family
    # llama.cpp takes Phi-3's long RoPE factors whenever its context is longer than the original, HF
    # (and we) once a sequence is: compared on sequences past the original context, both take them
    keep = [i for i, p in enumerate(PROMPTS) if name != "phi3" or len(p) > d["original_max_position_embeddings"]]
    err = relative_error(llama_cpp_logits(exports["f32"], [PROMPTS[i] for i in keep]), [ref[i] for i in keep])
    print(f"\n{name} f32: llama.cpp {err:.1e} of the largest logit")
    assert err <= 1e-3, (name, err)


def test_llama_cpp_splits_text_as_we_do_and_keeps_the_chat_template(family):
    name, d, ref, exports = family
    _, tok = load_pretrained(exports["f32"])
    llm = llama_cpp.Llama(model_path=exports["f32"], vocab_only=True, verbose=False)
    texts = STRINGS + ["<|im_start|>user\nHi<|im_end|>\n"] * (name != "gemma2")
    for s in texts:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), (name, s)
    bos = llm.tokenize(b"Hello", add_bos=True, special=True)[0] == tok.bos_id
    assert bos, name  # both the byte-level BPE's post-processor and sentencepiece put BOS in front
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    llm.close()


# ------------------------------------------------------------------------------------------ the adapter
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(folder, its model, a zero adapter: B = 0, the base itself) of the tiny llama of EXPORT_FAMILIES."""
    folder = tmp_path_factory.mktemp("llama")
    byte_level_tokenizer(folder)
    hf_model(EXPORT_FAMILIES["llama"]).save_pretrained(str(folder))
    base, _ = load_pretrained(str(folder))
    zero = copy.deepcopy(base)
    apply_lora(zero, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",)))
    save_adapter(zero, str(folder / "zero"))
    return str(folder), base, str(folder / "zero")


def test_llama_cpp_lora_moves_the_base_as_our_adapter_does(tiny_llama, tmp_path):
    """llama's q/k rows are permuted in GGUF: B's rows must be too; rsLoRA's scale must survive alpha / r."""
    folder, base, zero = tiny_llama
    export_gguf(folder, zero, str(tmp_path / "base.gguf"), "f32")
    ours = copy.deepcopy(base)
    adapter = random_adapter(ours, EXPORT_FAMILIES["llama"], tmp_path / "adapter", rslora=True)
    export_gguf_adapter(folder, adapter, str(tmp_path / "adapter.gguf"))
    before, after = logits_of(base), logits_of(ours)
    theirs = llama_cpp_logits(str(tmp_path / "base.gguf"), lora=str(tmp_path / "adapter.gguf"))
    moved = max(np.abs(a - b).max() for a, b in zip(after, before))
    err = relative_error(theirs, after)
    print(f"\nllama.cpp base + LoRA GGUF: {err:.1e} of the largest logit (the adapter moves them by {moved:.2f})")
    assert err <= 1e-3 and moved > 0.5


def test_exports_refuse_what_llama_cpp_cannot_state(tiny_llama, tmp_path):
    folder, base, _ = tiny_llama
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj",), use_dora=True))
    save_adapter(model, str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf_adapter(folder, str(tmp_path / "dora"), str(tmp_path / "x.gguf"))
    # each type the API offers is written here (its GGML type and file type) or by llama.cpp's quantizer
    assert GGUF_TYPES == (*OUT_TYPES, *K_QUANTS)
    with pytest.raises(ValueError, match="out_type"):
        export_gguf(folder, str(tmp_path / "dora"), str(tmp_path / "x.gguf"), "q5_k")
    untied = tmp_path / "gemma2"
    byte_level_tokenizer(untied.mkdir() or untied)
    hf_model({**EXPORT_FAMILIES["gemma2"], "vocab_size": V, "tie_word_embeddings": False}).save_pretrained(str(untied))
    with pytest.raises(ValueError, match="untied lm_head"):
        export_gguf(str(untied), str(tmp_path / "dora"), str(tmp_path / "x.gguf"), allow_other_checkpoint=True)
    assert not os.path.exists(tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory, smollm2_gguf, smollm2):
    """The embedded SmolLM2-135M-Instruct with a random adapter: its logits, the adapter, the exports."""
    folder = tmp_path_factory.mktemp("smollm2")
    model = copy.deepcopy(smollm2[0])
    adapter = random_adapter(model, {"model_type": "llama"}, folder / "adapter")
    prompts = [smollm2[1].encode(s) for s in ("The capital of France is", "How much does this cost?\n\nPrice is $")]
    exports = {t: export_gguf(smollm2_gguf, adapter, str(folder / f"smollm2-{t}.gguf"), t) for t in ("f32", "q8_0")}
    return logits_of(model, prompts), logits_of(smollm2[0], prompts), prompts, adapter, exports


def test_smollm2_export_runs_in_llama_cpp(smollm2_export, smollm2):
    ref, _, prompts, _, exports = smollm2_export
    for t, limit in (("f32", 1e-3), ("q8_0", 0.1)):
        err = relative_error(llama_cpp_logits(exports[t], prompts), ref)
        print(f"\nSmolLM2 {t}: llama.cpp {err:.1e} of the largest logit")
        assert err <= limit, (t, err)
    llm = llama_cpp.Llama(model_path=exports["q8_0"], vocab_only=True, verbose=False)
    for s in STRINGS:  # the GGUF's own tokenizer metadata, carried over
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == smollm2[1].encode(s), s
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    llm.close()


def test_smollm2_adapter_runs_over_the_embedded_base_in_llama_cpp(smollm2_export, smollm2_gguf, tmp_path):
    """llama.cpp runs the Q4_1 base with quantized activations, so base and adapted logits both carry
    its rounding; the adapter's move is compared as a whole (cosine) and position by position."""
    after, before, prompts, adapter, _ = smollm2_export
    export_gguf_adapter(smollm2_gguf, adapter, str(tmp_path / "adapter.gguf"))
    base = llama_cpp_logits(smollm2_gguf, prompts)
    lora = llama_cpp_logits(smollm2_gguf, prompts, lora=str(tmp_path / "adapter.gguf"))
    ours = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    theirs = np.concatenate([(a - b).ravel() for a, b in zip(lora, base)])
    cosine = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
    same_top = np.mean([(x.argmax(-1) == y.argmax(-1)).mean() for x, y in zip(lora, after)])
    print(f"\nSmolLM2 adapter GGUF over the Q4_1 base: cosine of the moves {cosine:.3f}, same top token {same_top:.0%}")
    assert cosine > 0.8 and same_top >= 0.75


# ------------------------------------------------------------------------------------------ the file
def test_a_write_that_fails_midway_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    import model.gguf_write as gguf_write

    folder, _, zero = tiny_llama
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an earlier export")
    real, calls = gguf_write.encode, []

    def disk_fills_up(w, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(w, kind)

    monkeypatch.setattr(gguf_write, "encode", disk_fills_up)
    with pytest.raises(OSError, match=r"model\.gguf: the disk filled up .* needs [\d,]+ bytes") as e:
        export_gguf(folder, zero, str(out), "f32")
    assert e.value.errno == errno.ENOSPC and len(calls) == 5
    assert out.read_bytes() == b"an earlier export" and os.listdir(tmp_path) == ["model.gguf"]
    monkeypatch.setattr(gguf_write, "encode", real)
    export_gguf(folder, zero, str(out), "f32")  # and the next export replaces the earlier one whole
    assert load_pretrained(str(out))[0].config.num_hidden_layers == 2 and os.listdir(tmp_path) == ["model.gguf"]


def test_too_little_free_space_is_refused_before_writing(tiny_llama, tmp_path, monkeypatch):
    from collections import namedtuple

    import model.gguf_write

    folder, _, zero = tiny_llama
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(model.gguf_write.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    expected = r"tiny\.gguf: not enough disk space: the GGUF needs [\d,]+ bytes, 1,000 are free"
    with pytest.raises(OSError, match=expected):
        export_gguf(folder, zero, str(tmp_path / "tiny.gguf"), "q8_0")
    assert os.listdir(tmp_path) == []
