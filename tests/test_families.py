"""The families beyond Llama (Mistral, Qwen3, Gemma 2, Gemma 3, Phi-3) against transformers and PEFT.

Each family is tried in two tiny random configurations, written by transformers' `save_pretrained`
and read back by our `load_pretrained`: logits on left- and right-padded batches, greedy generation
with and without the KV cache, PEFT adapters both ways, an NF4 base. Sliding windows of 4 tokens
are shorter than the test sequences, so a window that were ignored would show.
"""
import json
import os

import pytest
import torch

from conftest import tiny_hf_config
from lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter
from model import LlamaConfig, load_pretrained, pad_batch
from quant import Linear4bit

import transformers  # noqa: E402  (test extra: the reference for every logit here)

V = 128
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
            "long_factor": [2.0 + 0.5 * i for i in range(4)], "original_max_position_embeddings": 8}
FAMILIES = {
    # GQA, untied, head_dim (32) != hidden / heads (16)
    "qwen3_gqa_head_dim": tiny_hf_config(model_type="qwen3", head_dim=32),
    # tied, no GQA, a sliding window above max_window_layers
    "qwen3_tied_window": tiny_hf_config(model_type="qwen3", num_key_value_heads=4, tie_word_embeddings=True,
                                        use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "mistral_window": tiny_hf_config(model_type="mistral", sliding_window=4),
    # GQA, tied (Gemma's default), alternating windows, soft-caps tight enough to bite
    "gemma2_gqa_tied": tiny_hf_config(model_type="gemma2", tie_word_embeddings=True, head_dim=16, sliding_window=4,
                                      query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, num_hidden_layers=3),
    "gemma2_untied": tiny_hf_config(model_type="gemma2", num_key_value_heads=4, head_dim=16, sliding_window=3,
                                    query_pre_attn_scalar=16),
    # five-to-one local/global pattern made 1:1, local RoPE base, linear scaling on global layers
    "gemma3_gqa_linear_rope": tiny_hf_config(model_type="gemma3_text", head_dim=16, sliding_window=4,
                                             sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
                                             rope_scaling={"rope_type": "linear", "factor": 4.0},
                                             query_pre_attn_scalar=16, tie_word_embeddings=True, num_hidden_layers=3),
    "gemma3_untied_softcap": tiny_hf_config(model_type="gemma3_text", head_dim=16, sliding_window=4,
                                            num_key_value_heads=4, final_logit_softcapping=3.0,
                                            query_pre_attn_scalar=16, layer_types=["full_attention",
                                                                                   "sliding_attention"]),
    # GQA, longrope (long factors past 8 positions), partial rotary (Phi-4-mini)
    "phi3_gqa_longrope_partial": tiny_hf_config(model_type="phi3", pad_token_id=0, rope_scaling=LONGROPE, partial_rotary_factor=0.5,
                                                max_position_embeddings=64, original_max_position_embeddings=8),
    # YaRN, as Qwen2.5's and Qwen3's cards add it past 32k tokens (an original context of 8 positions here)
    "qwen2_yarn": tiny_hf_config(model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 8},
                                 max_position_embeddings=32),
    "phi3_tied_window": tiny_hf_config(model_type="phi3", pad_token_id=0, tie_word_embeddings=True, sliding_window=4,
                                       num_key_value_heads=4),
}
ATTN_MLP = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def targets_of(d):
    return ATTN_MLP.get(d["model_type"], DEFAULT_TARGETS)


def hf_model(d: dict, seed: int = 0):
    """transformers' model for a config dict, random weights, norms moved off their init, eager attention."""
    cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # Gemma's norms scale by 1 + w, the rest by w: move both off their init
                p.add_(0.3 * torch.randn_like(p))
            elif any(k in name for k in ("q_proj", "k_proj", "qkv_proj")):  # peaked attention, not near-uniform
                p.mul_(10.0)
    return hf


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A word-level tokenizer.json of V tokens, copied into each checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def save(hf, folder, tokenizer_files) -> str:
    hf.save_pretrained(str(folder))
    for f in os.listdir(tokenizer_files):
        (folder / f).write_bytes((tokenizer_files / f).read_bytes())
    return str(folder)


def batch(side: str, long: bool = False):
    seqs = [[5, 9, 17, 33, 4, 8, 60, 2, 11, 70, 71, 72], [7, 3, 21, 90], [44, 12, 13, 14, 15, 16, 100, 101]]
    if long:  # past phi3's original context of 8 positions ... and well past it
        seqs = [s * 2 for s in seqs]
    ids, mask = pad_batch(seqs, pad_id=0, side=side)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def reference_logits(hf, long: bool = False) -> list:
    """[(ids, mask, transformers' logits)] for a left- and a right-padded batch."""
    out = []
    for side in ("left", "right"):
        ids, mask, pos = batch(side, long)
        with torch.no_grad():
            out.append((ids, mask, hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits))
    return out


def logits_diff(ours, hf, long: bool = False) -> float:
    """max |our logits - the reference's| over the real tokens; hf: a model or its reference_logits."""
    worst = 0.0
    for ids, mask, ref in hf if isinstance(hf, list) else reference_logits(hf, long):
        with torch.no_grad():
            a = ours(ids, attention_mask=mask)
        worst = max(worst, (a[mask.bool()] - ref[mask.bool()]).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_transformers_on_padded_batches(name, tmp_path, tokenizer_files):
    d = FAMILIES[name]
    hf = hf_model(d)
    model, _ = load_pretrained(save(hf, tmp_path, tokenizer_files))
    assert set(model.state_dict()) == set(hf.state_dict())
    worst = logits_diff(model, hf, long=d["model_type"] == "phi3")
    print(f"\n{name}: max |logits - transformers| = {worst:.2e}")
    assert worst <= 1e-4
    if model.config.sliding_window:  # the window matters at this length: without it the logits move
        model.config.sliding_window = None
        assert logits_diff(model, hf) > 1e-3


SWITCHES = {
    "norm offset": lambda m: setattr(m.model.norm, "offset", 0.0),
    "GeGLU": lambda m: setattr(m.model.layers[0].mlp, "act", "silu"),
    "sandwich norms": lambda m: setattr(m.model.layers[0], "sandwich", False),
    "query_pre_attn_scalar": lambda m: setattr(m.model.layers[0].self_attn, "scale", None),
    "attention soft-cap": lambda m: setattr(m.model.layers[0].self_attn, "softcap", None),
    "final soft-cap": lambda m: setattr(m.lm_head, "cap", 1e9),
    "embedding scale": lambda m: setattr(m.config, "embed_scale", 1.0),
}


def test_family_switches_each_change_the_logits(tmp_path, tokenizer_files):
    """Every switch Gemma 2 sets is live: turning one off moves the logits away from transformers'."""
    hf = hf_model(FAMILIES["gemma2_gqa_tied"])
    folder, ref = save(hf, tmp_path, tokenizer_files), reference_logits(hf)
    for name, off in SWITCHES.items():
        model, _ = load_pretrained(folder)
        off(model)
        assert logits_diff(model, ref) > 1e-3, name


def test_to_hf_round_trips_every_family():
    for name, d in FAMILIES.items():
        config = LlamaConfig.from_hf(d)
        again = LlamaConfig.from_hf(json.loads(json.dumps(config.to_hf())))
        assert again == config, name
        hf_cfg = transformers.AutoConfig.for_model(**config.to_hf())
        assert type(hf_cfg).__name__.lower().startswith(d["model_type"].split("_")[0]), name


@pytest.mark.parametrize("name", ["gemma2_gqa_tied", "mistral_window"])
def test_training_loss_sees_the_soft_cap_and_the_window(name, tmp_path, tokenizer_files):
    """The training loss (model.model + lm_head, chunked) equals cross-entropy of transformers' logits."""
    from train import answer_loss

    hf = hf_model(FAMILIES[name])
    model, _ = load_pretrained(save(hf, tmp_path, tokenizer_files))
    ids, mask, pos = batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    ours = answer_loss(model, ids, labels, mask)
    ours.backward()
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    print(f"\n{name}: training loss {ours.item():.6f}, from transformers' logits {want.item():.6f}")
    assert abs(ours.item() - want.item()) <= 1e-5


# ------------------------------------------------------------------------------------------ packed rows
DOCUMENTS = (1024, 1000, 900, 800, 777, 700, 650, 555, 512, 420, 333, 300, 202, 19)  # 8,192 tokens, each past
                                                                                      # every window and longrope's 8


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_packed_row_of_8192_tokens_gives_each_document_its_logits_alone(name, tmp_path, tokenizer_files):
    """Fourteen documents in one row (position ids restarting at 0) through the per-document kernel of each family's
    attention (windows, soft-caps, GQA, partial and scaled RoPE): each document's logits are those it has alone."""
    model, _ = load_pretrained(save(hf_model(FAMILIES[name]), tmp_path, tokenizer_files))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, V, (n,), generator=g) for n in DOCUMENTS]
    position_ids = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
    worst, start = 0.0, 0
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=position_ids)[0]       # (8192, V)
        for d in docs:
            worst = max(worst, (packed[start:start + len(d)] - model(d[None])[0]).abs().max().item())
            start += len(d)
    print(f"\n{name}: max |packed - alone| = {worst:.1e} over {start:,} tokens")
    assert worst <= 1e-5


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", ["qwen3_tied_window", "mistral_window", "gemma2_gqa_tied", "gemma3_gqa_linear_rope",
                                  "phi3_gqa_longrope_partial"])
def test_greedy_generation_with_cache_equals_without(name, tmp_path, tokenizer_files):
    model, _ = load_pretrained(save(hf_model(FAMILIES[name]), tmp_path, tokenizer_files))
    ids, mask, _ = batch("left")
    with_cache = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_id=[], use_cache=True)
    without = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_id=[], use_cache=False)
    assert with_cache.shape == (3, ids.shape[1] + 8)
    assert torch.equal(with_cache, without)


# ------------------------------------------------------------------------------------------ adapters
def nf4_reference(model, hf):
    """transformers' model holding our NF4 base's dequantized weights (bitsandbytes' bytes, tests in test_quant)."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            sd[name + ".weight"] = m.dequantize().float()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    return hf


@pytest.mark.parametrize("name, quant", [("qwen3_gqa_head_dim", "nf4"), ("gemma2_gqa_tied", None),
                                         ("gemma3_gqa_linear_rope", None), ("phi3_gqa_longrope_partial", "nf4")])
def test_peft_adapter_loads_into_ours_and_ours_into_peft(name, quant, tmp_path, tokenizer_files):
    from peft import LoraConfig, get_peft_model

    d = FAMILIES[name]
    hf = hf_model(d)
    ours, _ = load_pretrained(save(hf, tmp_path, tokenizer_files),
                              **(dict(quant="nf4", compute_dtype=torch.float32) if quant else {}))
    if quant:  # PEFT's base: transformers' model holding the NF4 weights ours computes with
        hf = nf4_reference(ours, hf)
    torch.manual_seed(3)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets_of(d), init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    names = load_adapter(ours, str(tmp_path / "theirs"))
    assert len(names) == len(targets_of(d)) * d["num_hidden_layers"]
    into_ours = logits_diff(ours, peft_model)

    with torch.no_grad():  # ours changes its adapter, saves it, PEFT loads that file beside its own
        for m in lora_modules(ours).values():
            m.lora_B.weight.normal_(std=0.1)
    save_adapter(ours, str(tmp_path / "ours"))
    peft_model.load_adapter(str(tmp_path / "ours"), adapter_name="ours")
    peft_model.set_adapter("ours")
    into_peft = logits_diff(ours, peft_model)
    with peft_model.disable_adapter():
        plain = logits_diff(ours, peft_model)
    print(f"\n{name} {quant or 'fp32'}: PEFT adapter in ours {into_ours:.2e}, ours in PEFT {into_peft:.2e}")
    assert into_ours <= 1e-4 and into_peft <= 1e-4
    assert plain > 1e-3  # the adapter really changes the logits


@pytest.mark.parametrize("name", ["qwen3_tied_window", "gemma2_gqa_tied", "gemma3_gqa_linear_rope",
                                  "phi3_gqa_longrope_partial"])
def test_export_merged_of_each_family_loads_in_transformers(name, tmp_path, tokenizer_files):
    """config.json written by to_hf and the merged weights give transformers our adapted logits."""
    from lora import export_merged

    d = FAMILIES[name]
    (tmp_path / "base").mkdir()
    folder = save(hf_model(d), tmp_path / "base", tokenizer_files)
    model, _ = load_pretrained(folder)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=tuple(targets_of(d)), dropout=0.0, seed=0))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.1)
    save_adapter(model, str(tmp_path / "adapter"))
    out = export_merged(folder, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(merged).__name__ == type(hf_model(d)).__name__
    diff = logits_diff(model, merged, long=d["model_type"] == "phi3")
    print(f"\n{name}: export_merged in transformers vs ours + adapter {diff:.2e}")
    assert diff <= 1e-4


# ------------------------------------------------------------------------------------------ the pricer
def test_pricer_trains_a_phi3_checkpoint_with_dora_on_every_projection(tmp_path):
    """examples/train_pricer.py --model takes any family: 'all' is Phi-3's fused qkv_proj and gate_up_proj."""
    from safetensors.torch import load_file
    from test_pricer import run_script, write_csv, write_tiny_checkpoint

    folder = write_tiny_checkpoint(str(tmp_path / "phi3"))  # the pricer's digit-level tokenizer
    for f in ("config.json", "model.safetensors"):
        os.remove(os.path.join(folder, f))
    hf_model(dict(FAMILIES["phi3_tied_window"], pad_token_id=3)).save_pretrained(folder)
    data = tmp_path / "items.csv"
    write_csv(data, ["text", "price"], [[f"Diamond: 0.{i} carat", 100 + 37 * i] for i in range(12)])
    out = tmp_path / "run"
    log = run_script("train_pricer.py", "--model", folder, "--data", str(data), "--out", str(out), "--max-steps", "1",
                     "--batch-size", "4", "--train-size", "4", "--val-size", "4", "--test-size", "4", "--r", "4",
                     "--layers", "all", "--dora", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert "| after training |" in log
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 3 * 4 * 2  # A, B and the magnitude of four projections in two layers


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("override, words", [
    (dict(model_type="gemma3"), "model_type 'gemma3' is not supported"),
    (dict(model_type="gemma2", hidden_activation="gelu"), "hidden activation 'gelu'"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "longrope scaling lacks"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic'"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma2", sliding_window=4, layer_types=["sliding_attention"]), "layer_types must list 2"),
])
def test_unsupported_keys_are_refused_by_name(override, words):
    with pytest.raises(ValueError, match=words):
        LlamaConfig.from_hf(tiny_hf_config(**override), source="x/config.json")
