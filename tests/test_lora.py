"""lora/: LoRA by hand, checked against PEFT (outputs, counts, adapter files both ways) and transformers."""
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_hf_config
from lora import (
    LoRAConfig, LoRALinear, apply_lora, export_merged, load_adapter, load_lora_state_dict, lora_state_dict,
    merge_lora, save_adapter, trainable_parameters, unmerge_lora,
)
from lora.inject import ParameterCount, lora_modules
from model import Llama, LlamaConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTN + ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- helpers
def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config(**overrides)))
    with torch.no_grad():  # RMSNorm weights start at 1: move them so a wrong copy would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM holding the same weights (our state_dict keys equal HF's)."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_config()))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    return hf.eval()


def randomize_B(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: give every B a non-zero value so the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def tokens(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the module tree changed"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# ---------------------------------------------------------------------------- config
def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert LoRAConfig(r=8, alpha=16).scaling == 16 / 8
    assert LoRAConfig(r=16, alpha=16, use_rslora=True).scaling == 16 / math.sqrt(16)


@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), "r=0"), (dict(r=-4), "r=-4"), (dict(r=2.5), "r=2.5"), (dict(alpha=0), "alpha=0"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(target_modules=()), "target_modules"), (dict(layers=[-1]), "layers"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        LoRAConfig(**kwargs)


def test_config_round_trips_through_peft_config():
    from peft import LoraConfig

    ours = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj"), use_rslora=True, layers=(1,))
    d = ours.to_peft_dict("some/base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT must take every key as its own
        peft_config = LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert (peft_config.r, peft_config.lora_alpha, peft_config.use_rslora) == (4, 8, True)
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"} and peft_config.layers_to_transform == [1]
    back = LoRAConfig.from_peft_dict(json.loads(json.dumps(d)))
    assert (back.r, back.alpha, back.dropout, back.use_rslora, back.layers) == (4, 8, 0.1, True, (1,))
    assert set(back.target_modules) == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_equals_peft_linear(use_rslora):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True)
    ours = LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora)
    theirs = PeftLinear(nn.Linear(64, 48), "default", LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora),
                        r=4, lora_alpha=8)
    with torch.no_grad():
        theirs.base_layer.load_state_dict(base.state_dict())
        ours.lora_B.weight.normal_()  # B = 0 would hide every difference but the base's
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.scaling == theirs.scaling["default"]
    x = torch.randn(3, 5, 64)
    diff = max_diff(ours(x), theirs(x))
    print(f"LoRALinear vs PEFT Linear (rslora={use_rslora}): max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert max_diff(ours(x), base(x)) > 1e-2  # the update is really there


def test_lora_dropout_equals_peft_in_training_and_is_off_in_eval():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    ours = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    theirs = PeftLinear(nn.Linear(64, 48), "default", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5),
                        r=4, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        theirs.base_layer.load_state_dict(base.state_dict())
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 64)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    dropped = ours(x)
    torch.manual_seed(1)
    assert max_diff(dropped, theirs(x)) <= 1e-6  # one mask of the same seed, on the LoRA path only
    ours.eval(), theirs.eval()
    assert max_diff(ours(x), theirs(x)) <= 1e-6
    assert max_diff(dropped, ours(x)) > 1e-2  # in training the mask really changed the output


def test_lora_linear_init_kaiming_A_zero_B_and_seeded():
    base = nn.Linear(64, 32)
    a = LoRALinear(base, r=8, alpha=16, generator=torch.Generator().manual_seed(3))
    b = LoRALinear(base, r=8, alpha=16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.lora_A.weight, b.lora_A.weight)
    assert torch.count_nonzero(a.lora_B.weight) == 0
    # nn.Linear's default init is Kaiming-uniform(a=√5): U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(64)
    assert a.lora_A.weight.abs().max() <= bound and a.lora_A.weight.abs().max() > 0.9 * bound
    assert a.lora_A.weight.dtype == torch.float32 and a.lora_A.weight.shape == (8, 64)


def test_lora_path_runs_in_bf16_base_dtype_with_fp32_master_weights():
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    A, B = layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16()
    assert torch.equal(y, torch.addmm(base(x), x @ A.T, B.T, alpha=layer.scaling))  # every product in bf16
    ref = base(x).float() + layer.scaling * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert max_diff(y, ref) < 0.1  # and within bf16 rounding of the fp32 formula
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and base.weight.grad is None


# ---------------------------------------------------------------------------- apply_lora
def test_fresh_lora_leaves_logits_unchanged():
    model = tiny_model()
    ids = tokens()
    with torch.no_grad():
        before = model(ids)
        names = apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=ALL_LINEAR, seed=0))
        after = model(ids)
        hf = hf_twin(tiny_model())(ids).logits
    diff = max_diff(before, after)
    print(f"fresh LoRA: logits max abs diff {diff:.3g} (vs transformers {max_diff(after, hf):.3g})")
    assert len(names) == 2 * 7 and diff == 0.0
    assert max_diff(after, hf) < 1e-4


def test_only_A_and_B_receive_gradients():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, seed=0))
    randomize_B(model)  # with B = 0 the gradient of A would be zero, proving nothing
    model.train()
    model(tokens()).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert with_grad == trainable == lora_names and len(lora_names) == 2 * 4 * 2
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora_names)


def test_seed_gives_the_same_A_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = tiny_model(), tiny_model()
    torch.set_rng_state(state)
    apply_lora(a, LoRAConfig(seed=7))
    apply_lora(b, LoRAConfig(seed=7))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = lora_state_dict(a), lora_state_dict(b)
    assert sa.keys() == sb.keys() and len(sa) == 2 * 4 * 2
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("targets, layers", [
    (ATTN, None), (ALL_LINEAR, (1,)), (("model.layers.0.self_attn.q_proj", "down_proj"), None), (("lm_head",), None),
])
def test_trainable_parameters_equal_peft(targets, layers):
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, layers=layers))
    peft_model = get_peft_model(hf_twin(tiny_model()), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), layers_to_transform=list(layers) if layers else None,
        layers_pattern="layers" if layers else None))
    peft_names = sorted(n[len("base_model.model."):] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                        and isinstance(m.lora_A, nn.ModuleDict))
    ours = trainable_parameters(model)
    print(f"targets {targets} layers {layers}: ours {ours}, PEFT {peft_model.get_nb_trainable_parameters()}")
    assert sorted(names) == peft_names
    assert tuple(ours) == peft_model.get_nb_trainable_parameters()


def test_trainable_parameters_summary_line():
    assert str(ParameterCount(921_600, 135_436_608)) == "trainable 921,600 / 135,436,608 (0.68%)"
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=ATTN))
    c = model.config
    kv = c.num_key_value_heads * c.head_dim
    # closed form: r · (in + out) per adapted projection, for q, k, v and o of every layer
    per_layer = 4 * ((c.hidden_size + c.hidden_size) + 2 * (c.hidden_size + kv) + (c.hidden_size + c.hidden_size))
    trainable, total = trainable_parameters(model)
    assert trainable == per_layer * c.num_hidden_layers
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable_parameters(model).summary == f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def test_llama31_8b_r32_adapter_is_109_mb():
    hf = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
              max_position_embeddings=131072, rms_norm_eps=1e-5,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
    config = LlamaConfig.from_hf(hf)
    with torch.device("meta"):
        model = Llama(config)
    apply_lora(model, LoRAConfig(r=32, alpha=64, target_modules=ATTN))
    trainable, total = trainable_parameters(model)
    D, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    closed_form = config.num_hidden_layers * 32 * ((D + D) + (D + kv) + (D + kv) + (D + D))
    nbytes = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
    print(f"Llama-3.1-8B r=32 q,k,v,o: {trainable:,} LoRA parameters, {nbytes:,} bytes fp32")
    assert trainable == closed_form == 27_262_976
    assert nbytes == 4 * closed_form == 109_051_904


def test_apply_lora_errors_clearly_and_touches_nothing():
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear module.*'q_proj'"):
        apply_lora(model, LoRAConfig(target_modules=("qproj",)))
    with pytest.raises(ValueError, match="layers"):
        apply_lora(model, LoRAConfig(target_modules=("q_proj",), layers=(5,)))
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, LoRAConfig())


# ---------------------------------------------------------------------------- merge
def test_merge_equals_adapted_and_unmerge_restores():
    model = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=ALL_LINEAR, seed=0))
    randomize_B(model)
    ids = tokens()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merge_lora(model)  # a second merge must not add the update twice
        merged = model(ids)
        unmerge_lora(model)
        unmerge_lora(model)
        restored = model(ids)
    d_merge, d_round = max_diff(merged, adapted), max_diff(restored, adapted)
    w_round = max(max_diff(model.get_parameter(k.replace(".weight", ".base_layer.weight")), v)
                  for k, v in original.items() if k.endswith("proj.weight"))
    print(f"plain base: merged vs adapted {d_merge:.3g}, unmerged vs adapted {d_round:.3g}, W0 round trip {w_round:.3g}")
    assert d_merge <= 1e-5 and d_round <= 1e-5 and w_round <= 1e-6
    assert max_diff(adapted, Llama.forward(tiny_model(), ids).detach()) > 1e-3  # the adapter does change logits


def test_merge_refuses_a_head_tied_to_the_embedding():
    model = tiny_model(tie_word_embeddings=True)
    apply_lora(model, LoRAConfig(target_modules=("lm_head",), seed=0))
    randomize_B(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.*shared by.*embed_tokens"):
        merge_lora(model)
    assert_untouched(model, before)


# ---------------------------------------------------------------------------- adapters on disk
def _peft_logits(adapter_dir: str, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_twin(tiny_model()), adapter_dir)
    messages = [str(w.message) for w in caught]
    with torch.no_grad():
        return peft_model(ids).logits, messages


@pytest.mark.parametrize("config", [
    LoRAConfig(r=4, alpha=8, seed=0),
    LoRAConfig(r=8, alpha=8, target_modules=ALL_LINEAR, use_rslora=True, layers=(1,), seed=0),
])
def test_our_adapter_loads_into_peft(tmp_path, config):
    model = tiny_model()
    apply_lora(model, config)
    randomize_B(model)
    save_adapter(model, str(tmp_path), base_model_name_or_path="tiny-llama")
    # PEFT's two files, and our record of the base (PEFT ignores a file it does not know)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "trained_on.json"]
    ids = tokens()
    theirs, messages = _peft_logits(str(tmp_path), ids)
    with torch.no_grad():
        ours = model(ids)
    bad = [m for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "ignored", "found"))]
    diff = max_diff(ours, theirs)
    print(f"our adapter in PEFT ({config.target_modules}, layers={config.layers}): logits max abs diff {diff:.3g}")
    assert not bad, bad
    assert diff <= 1e-4
    assert max_diff(ours, hf_twin(tiny_model())(ids).logits.detach()) > 1e-3  # the adapter is really applied


def test_peft_adapter_loads_into_ours(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(hf_twin(tiny_model()), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    ids = tokens()
    model = tiny_model()
    names = load_adapter(model, str(tmp_path))
    with torch.no_grad():
        diff = max_diff(model(ids), peft_model(ids).logits)
    print(f"PEFT adapter in ours: logits max abs diff {diff:.3g}")
    assert len(names) == 2 * 3 and diff <= 1e-4
    assert trainable_parameters(model).trainable == peft_model.get_nb_trainable_parameters()[0]


def test_load_adapter_in_place_for_resume(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, seed=0))
    randomize_B(model, seed=1)
    save_adapter(model, str(tmp_path))
    saved = {k: v.clone() for k, v in lora_state_dict(model).items()}
    randomize_B(model, seed=2)
    load_adapter(model, str(tmp_path))
    loaded = lora_state_dict(model)
    assert loaded.keys() == saved.keys() and saved and all(torch.equal(loaded[k], v) for k, v in saved.items())

    other = tiny_model()
    apply_lora(other, LoRAConfig(r=8, alpha=8, seed=0))
    before = snapshot(other)
    with pytest.raises(ValueError, match="r=4.*differs.*r=8"):
        load_adapter(other, str(tmp_path))
    assert_untouched(other, before)


def test_save_is_atomic(tmp_path, monkeypatch):
    import lora.io

    model = tiny_model()
    apply_lora(model, LoRAConfig(seed=0))
    save_adapter(model, str(tmp_path))
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_B(model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora.io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "trained_on.json"]


def test_bad_adapters_error_clearly_and_leave_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_model()
    apply_lora(source, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "gate_proj"), seed=0))
    good = tmp_path / "good"
    save_adapter(source, str(good))

    def variant(name: str) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / f).write_bytes((good / f).read_bytes())
        return str(folder)

    wrong_shape = variant("wrong_shape")
    sd = load_file(os.path.join(wrong_shape, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    sd[key] = torch.zeros(4, 65)
    save_file(sd, os.path.join(wrong_shape, "adapter_model.safetensors"))

    lacking = variant("lacking")
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "gate_projection"]
    (tmp_path / "lacking" / "adapter_config.json").write_text(json.dumps(cfg))

    corrupt = variant("corrupt")
    path = os.path.join(corrupt, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])

    no_weights = variant("no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))

    cases = [
        (wrong_shape, ValueError, rf"{key}.*\(4, 65\).*\(4, 64\)"),
        (lacking, ValueError, r"gate_projection.*match no linear module"),
        (corrupt, ValueError, r"adapter_model\.safetensors.*not a readable safetensors"),
        (no_weights, FileNotFoundError, r"adapter_model\.safetensors.*missing"),
        (str(tmp_path / "nowhere"), FileNotFoundError, r"nowhere.*does not exist"),
    ]
    for folder, error, pattern in cases:
        fresh = tiny_model()
        before = snapshot(fresh)
        with pytest.raises(error, match=pattern):
            load_adapter(fresh, folder)
        assert_untouched(fresh, before)
        assert not lora_modules(fresh) and not hasattr(fresh, "lora_config")

    # A model that already carries the adapter: the bad state dict is refused before any copy.
    loaded = tiny_model()
    load_adapter(loaded, str(good))
    before = snapshot(loaded)
    with pytest.raises(ValueError, match=rf"{key}.*\(4, 65\).*\(4, 64\)"):
        load_lora_state_dict(loaded, sd)
    assert_untouched(loaded, before)


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    store_file = str(tmp_path / "store")
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1)
    try:
        model = tiny_model()
        apply_lora(model, LoRAConfig(seed=0))
        randomize_B(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert list(lora_state_dict(ddp)) == list(lora_state_dict(model))
        save_adapter(ddp, str(tmp_path / "adapter"))
        fresh = tiny_model()
        load_adapter(fresh, str(tmp_path / "adapter"))
        ours, theirs = lora_state_dict(fresh), lora_state_dict(model)
        assert ours.keys() == theirs.keys() and ours and all(torch.equal(ours[k], theirs[k]) for k in ours)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- NF4 base and export
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> str:
    """A tiny HF folder written by transformers: config.json, model.safetensors, a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = str(tmp_path_factory.mktemp("checkpoint"))
    hf_twin(tiny_model(seed=11)).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return folder


def test_export_merged_answers_as_the_nf4_model_that_was_trained(tmp_path, hf_checkpoint):
    """The default merge is into the weights training saw, dequantize(quantize(W0)): transformers on the
    folder gives the logits of our NF4 base + adapter. merge_into="original" gives W0 + s·BA, the
    full-precision base + adapter, which answers differently."""
    import transformers

    from model.load import load_pretrained

    qmodel, _ = load_pretrained(hf_checkpoint, quant="nf4", compute_dtype=torch.float32)
    apply_lora(qmodel, LoRAConfig(r=4, alpha=8, target_modules=ALL_LINEAR, seed=0))
    randomize_B(qmodel)  # a "trained" adapter
    adapter = str(tmp_path / "adapter")
    save_adapter(qmodel, adapter)
    out = export_merged(hf_checkpoint, adapter, str(tmp_path / "merged"), max_shard_size=100_000)
    original = export_merged(hf_checkpoint, adapter, str(tmp_path / "original"), merge_into="original")

    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left behind

    ids = tokens()
    full, _ = load_pretrained(hf_checkpoint)
    load_adapter(full, adapter)
    with torch.no_grad():
        trained, on_full = qmodel(ids), full(ids)
        hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
        theirs = hf.eval()(ids).logits
        theirs_original = transformers.LlamaForCausalLM.from_pretrained(original).eval()(ids).logits
    top = trained.abs().max()
    diff, apart = max_diff(theirs, trained) / top, max_diff(theirs_original, trained) / top
    print(f"export_merged, transformers vs ours NF4 + adapter: trained merge {diff:.2e}, original merge {apart:.2e} "
          f"of the largest logit (original vs full precision + adapter {max_diff(theirs_original, on_full):.2e})")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert diff <= 1e-5
    assert max_diff(theirs_original, on_full) <= 1e-4
    assert apart > 100 * max(diff, 1e-7)


def nf4_linear(base: nn.Linear, compute_dtype=torch.float32) -> nn.Module:
    from quant import Linear4bit

    return Linear4bit.from_linear(base, quant_type="nf4", double_quant=True, compute_dtype=compute_dtype)


def test_merge_on_nf4_base_equals_adapted_and_unmerge_restores_the_4bit_layer():
    torch.manual_seed(0)
    q = nf4_linear(nn.Linear(128, 64))
    layer = LoRALinear(q, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(4, 128)
    with torch.no_grad():
        adapted = layer(x)
        # the closed form on the dequantized weight: x W0^T + b + scaling x A^T B^T
        ref = x @ q.dequantize().float().T + q.bias + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        layer.merge()
        layer.merge()
        merged = layer(x)
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
        layer.unmerge()
        layer.unmerge()
        restored = layer(x)
    d_ref, d_merge = max_diff(adapted, ref), max_diff(merged, adapted)
    print(f"NF4 base: adapted vs closed form {d_ref:.3g}, merged vs adapted {d_merge:.3g}, "
          f"unmerged vs adapted {max_diff(restored, adapted):.3g}")
    assert layer.base_layer is q and torch.equal(restored, adapted)
    assert d_ref <= 1e-5 and d_merge <= 1e-5
    assert "_quantized_base" not in str(list(layer.state_dict()))


def test_trainable_parameters_on_nf4_base_equal_peft_on_bitsandbytes(hf_checkpoint):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from model.load import load_pretrained

    # Reference: transformers' model with every linear but the head swapped for bitsandbytes' Linear4bit.
    hf = hf_twin(tiny_model(seed=11))
    for name, m in list(hf.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, quant_type="nf4",
                                  compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q = q.to("cpu")  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, q)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTN)))
    expected = peft_model.get_nb_trainable_parameters()

    ours_model, _ = load_pretrained(hf_checkpoint, quant="nf4", compute_dtype=torch.float32)
    apply_lora(ours_model, LoRAConfig(r=4, alpha=8, target_modules=ATTN))
    ours = trainable_parameters(ours_model)
    plain = tiny_model(seed=11)
    apply_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=ATTN))
    print(f"NF4 base: ours {ours}, PEFT on bitsandbytes {expected}")
    assert tuple(ours) == expected
    assert tuple(ours) == tuple(trainable_parameters(plain))  # packing two values per byte changes no count


def test_export_merged_refuses_an_adapter_that_does_not_fit(tmp_path, hf_checkpoint):
    other = tiny_model(intermediate_size=32)
    apply_lora(other, LoRAConfig(r=4, alpha=8, target_modules=("down_proj",), seed=0))
    save_adapter(other, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 96\).*\(64, 32\)"):
        export_merged(hf_checkpoint, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export_merged(hf_checkpoint, str(tmp_path / "nowhere"), str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # neither the output nor a temporary folder
