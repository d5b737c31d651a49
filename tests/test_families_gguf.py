"""GGUF files of the families (qwen3, gemma2, gemma3, phi3), written as llama.cpp's converter writes
them, read by our loader: the logits of the HF model they were written from, the tensors that
transformers' own GGUF loader reads, every family field back from the metadata."""
import json

import pytest
import torch

from conftest import tiny_hf_config
from model import LlamaConfig, Tokenizer, iter_tensors, load_pretrained
from test_families import FAMILIES, hf_model, logits_diff
from test_model import SP_COMPARABLE, STRINGS, sp_model_file  # noqa: F401  (a fixture: the trained sentencepiece model)

import transformers  # noqa: E402  (test extra: the reference)

# ------------------------------------------------------------------------------------------ GGUF
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "qkv_proj": "attn_qkv", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "gate_up_proj": "ffn_up",
              "down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
GEMMA_GGUF_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm"}


def write_family_gguf(hf, d: dict, path) -> str:
    """Write an HF model as llama.cpp's converter does for its architecture: metadata, names, Gemma's
    norms stored as 1 + w, Phi-3's longrope factors as tensors; F32 so the weights stay exact."""
    import gguf
    import numpy as np

    arch = {"gemma3_text": "gemma3"}.get(d["model_type"], d["model_type"])
    c = LlamaConfig.from_hf(d)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_freq_base(c.rope_theta)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        if c.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling["factor"])
    if arch == "phi3":
        w.add_rope_dimension_count(c.rotary_dim)
        if c.rope_scaling:
            from model.rope import longrope_attention_factor

            w.add_rope_scaling_orig_ctx_len(c.rope_scaling["original_max_position_embeddings"])
            w.add_rope_scaling_attn_factors(longrope_attention_factor(c.rope_scaling, c.max_position_embeddings))
            w.add_tensor("rope_factors_long.weight", np.array(c.rope_scaling["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(c.rope_scaling["short_factor"], dtype=np.float32))
    w.add_tokenizer_model("gpt2")
    tokens = [chr(33 + i) for i in range(c.vocab_size - 1)] + ['!"']
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(['! "'])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = {**GGUF_NAMES, **(GEMMA_GGUF_NAMES if arch.startswith("gemma") else {})}
    for name, t in hf.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.float().numpy()
        parts = name.split(".")
        if name.startswith("model.layers."):
            gname = f"blk.{parts[2]}.{names[parts[-2]]}.{parts[-1]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1.0  # llama.cpp's runtime has no (1 + w): its converter adds the one
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# transformers' GGUF loader ignores `attention.key_length` for qwen3, so a head_dim other than
# hidden / heads does not load there; the other three it reads.
TRANSFORMERS_READS_GGUF = ("gemma2_untied", "gemma3_gqa_linear_rope", "phi3_gqa_longrope_partial")


@pytest.mark.parametrize("name", ["qwen3_gqa_head_dim", "gemma2_untied", "gemma3_gqa_linear_rope",
                                  "phi3_gqa_longrope_partial"])
def test_gguf_of_each_family_loads_to_the_logits_of_its_hf_model(name, tmp_path):
    d = FAMILIES[name]
    hf = hf_model(d)
    path = write_family_gguf(hf, d, tmp_path / "tiny.gguf")
    model, tok = load_pretrained(path)
    assert_same_but_for_gguf(model.config, LlamaConfig.from_hf(d))
    worst = logits_diff(model, hf, long=d["model_type"] == "phi3")
    print(f"\n{name} GGUF: max |logits - transformers (the weights written)| = {worst:.2e}")
    assert worst <= 1e-4
    assert tok.encode('!"#') == [127, 2]
    if name in TRANSFORMERS_READS_GGUF:  # transformers' GGUF loader reads the same tensors under the same names
        ref, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32, output_loading_info=True)
        # its Gemma 2 mapping knows only a tied head: an untied `output.weight` is left out there
        assert info["missing_keys"] <= {"lm_head.weight"} and not info["unexpected_keys"], info
        ref = ref.state_dict()
        for tname, t in iter_tensors(path):
            if tname not in info["missing_keys"]:
                assert torch.equal(t, ref[tname]), tname


def assert_same_but_for_gguf(ours: LlamaConfig, theirs: LlamaConfig) -> None:
    """Every family field read back from GGUF metadata; GGUF keeps no pad id, no config.json extras,
    eps as fp32, and longrope's attention factor explicitly."""
    skip = ("bos_token_id", "eos_token_id", "pad_token_id", "extra", "rope_scaling", "rms_norm_eps")
    a = {k: v for k, v in vars(ours).items() if k not in skip}
    b = {k: v for k, v in vars(theirs).items() if k not in skip}
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert not diff, diff
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert (ours.rope_scaling is None) == (theirs.rope_scaling is None)


def test_gguf_sentencepiece_vocabulary_encodes_as_sentencepiece(sp_model_file, tmp_path):
    """A `llama` GGUF vocabulary (Gemma's, Phi-3's: pieces, scores, types) runs as the sentencepiece
    model it was written from, and saves as a tokenizer.model that transformers reads to the same ids."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_file)
    n = sp.GetPieceSize()
    kind = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "gemma2")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.IdToPiece(i) for i in range(n)])
    w.add_token_scores([sp.GetScore(i) for i in range(n)])
    w.add_token_types(kind)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf(str(tmp_path / "spm.gguf"))
    assert ours.sp is not None and (ours.bos_id, ours.eos_id) == (sp.bos_id(), sp.eos_id())
    for s in STRINGS:
        assert ours.encode(s) == sp.EncodeAsIds(s), s
        assert ours.decode(ours.encode(s)) == sp.DecodeIds(sp.EncodeAsIds(s)), s
    ours.save_pretrained(str(tmp_path / "saved"))
    (tmp_path / "saved" / "config.json").write_text(json.dumps(tiny_hf_config()))
    ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "saved"), legacy=False)
    for s in SP_COMPARABLE:
        assert ref.encode(s, add_special_tokens=False) == sp.EncodeAsIds(s), s
