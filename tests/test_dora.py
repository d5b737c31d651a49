"""DoRA (lora/dora.py) against PEFT 0.21's DoRA: the layer's outputs and gradients, adapters both
ways, merging, and export_merged against PEFT's merge_and_unload."""
import json
import os

import pytest
import torch
from torch import nn

from conftest import tiny_hf_config
from lora import LoRAConfig, LoRALinear, apply_lora, export_merged, load_adapter, merge_lora, save_adapter, unmerge_lora
from lora import dora
from lora.inject import lora_modules
from model import load_pretrained
from quant import Linear4bit

import transformers  # noqa: E402  (test extras: the references)
from safetensors.torch import load_file, save_file  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------- the layer
def layer_pair(base_kind: str, dropout: float, ours_first: bool):
    """Our DoRA LoRALinear and PEFT's DoRA Linear holding the same W0, A, B and m.

    ours_first: our random B and m are copied into PEFT; else PEFT's (its own init of m from
    W0 + s·BA included) are copied into ours."""
    torch.manual_seed(0)
    plain = nn.Linear(32, 24, bias=True)
    with torch.no_grad():
        plain.weight.mul_(4.0)  # rows of different lengths than A, B make
    base = Linear4bit.from_linear(plain, quant_type="nf4", double_quant=True, compute_dtype=torch.float32) \
        if base_kind == "nf4" else plain
    ours = LoRALinear(base, r=4, alpha=8, dropout=dropout, use_dora=True, generator=torch.Generator().manual_seed(1))
    reference = nn.Linear(32, 24, bias=True)  # PEFT's base: W0 as our layer computes with it (dequantized)
    with torch.no_grad():
        reference.weight.copy_(dora.base_weight(ours))
        reference.bias.copy_(plain.bias)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, init_lora_weights=ours_first)
    theirs = PeftLinear(reference, "default", config, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                        init_lora_weights=ours_first)
    m_theirs = theirs.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        if ours_first:
            ours.lora_B.weight.normal_()
            ours.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(24))  # trained away from ‖W0 + s·BA‖
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
            m_theirs.copy_(ours.lora_magnitude_vector)
        else:
            ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
            dora.init_magnitude(ours)  # our m from W0 + s·BA must equal PEFT's
            assert max_diff(ours.lora_magnitude_vector, m_theirs) <= 1e-6
            m_theirs.mul_(1 + 0.2 * torch.rand(24))
            ours.lora_magnitude_vector.copy_(m_theirs)
    return ours, theirs


def outputs_and_grads(layer, x, params, seed=7):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # one dropout mask for both layers
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("base_kind", ["plain", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("ours_first", [True, False])
def test_dora_layer_equals_peft_outputs_and_gradients(base_kind, dropout, ours_first):
    ours, theirs = layer_pair(base_kind, dropout, ours_first)
    ours.train(dropout > 0)
    theirs.train(dropout > 0)
    x = torch.randn(3, 5, 32)
    a = outputs_and_grads(ours, x, [ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector])
    b = outputs_and_grads(theirs, x, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                      theirs.lora_magnitude_vector["default"].weight])
    assert all(t.abs().max() > 0 for t in a)  # every gradient is there to compare
    diffs = [max_diff(u, v) for u, v in zip(a, b)]
    print(f"\nDoRA layer {base_kind} dropout={dropout} {'ours->PEFT' if ours_first else 'PEFT->ours'}: "
          f"y, dx, dA, dB, dm max abs diff {', '.join(f'{d:.1e}' for d in diffs)}")
    assert max(diffs) <= 1e-5
    ours.use_dora = False  # plain LoRA with the same A, B gives other outputs: DoRA is really applied
    assert max_diff(ours.eval()(x), theirs.eval()(x)) > 1e-3


@pytest.mark.parametrize("base_kind", ["plain", "nf4"])
def test_dora_merge_equals_adapted_and_unmerge_restores(base_kind):
    ours, _ = layer_pair(base_kind, 0.0, True)
    x = torch.randn(4, 32)
    with torch.no_grad():
        adapted = ours(x)
        before = dora.base_weight(ours).clone()
        ours.merge()
        merged = ours(x)
        ours.unmerge()
        again = ours(x)
    assert max_diff(merged, adapted) <= 1e-5 and max_diff(again, adapted) <= 1e-5
    assert max_diff(dora.base_weight(ours), before) <= 1e-5
    if base_kind == "nf4":
        assert isinstance(ours.base_layer, Linear4bit)


# ---------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("dora_base")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_config()))
    hf.save_pretrained(str(folder))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))
    return str(folder)


def hf_base(checkpoint):
    return transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()


IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def train_a_little(model, steps: int = 3) -> None:
    """A few AdamW steps on next-token loss, dropout on: our DoRA adapter as training leaves it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(IDS)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_dora_adapter_trained_by_ours_loads_in_peft(quant, checkpoint, tmp_path):
    load = dict(quant="nf4", compute_dtype=torch.float32) if quant else {}
    model, _ = load_pretrained(checkpoint, **load)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS, use_dora=True, seed=0))
    train_a_little(model)
    save_adapter(model, str(tmp_path))
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert sum(k.endswith(".lora_magnitude_vector") for k in names) == 2 * len(TARGETS)
    base = hf_base(checkpoint)
    if quant:  # PEFT's base holds the NF4 weights our model computes with
        sd = {n.replace(".base_layer", "") + ".weight": m.dequantize()
              for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        assert not base.load_state_dict(sd, strict=False).unexpected_keys
    peft_model = PeftModel.from_pretrained(base, str(tmp_path))
    assert peft_model.peft_config["default"].use_dora
    with torch.no_grad():
        diff = max_diff(model(IDS), peft_model(IDS).logits)
        moved = max_diff(model(IDS), hf_base(checkpoint)(IDS).logits)
    print(f"\nour trained DoRA adapter ({quant or 'fp32'} base) in PEFT: logits max abs diff {diff:.2e}")
    assert diff <= 1e-4 and moved > 1e-3


def test_peft_dora_adapter_loads_into_ours(checkpoint, tmp_path):
    torch.manual_seed(4)
    peft_model = get_peft_model(hf_base(checkpoint), LoraConfig(r=4, lora_alpha=16, target_modules=list(TARGETS),
                                                                use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    peft_model.save_pretrained(str(tmp_path))
    model, _ = load_pretrained(checkpoint)
    names = load_adapter(model, str(tmp_path))
    assert len(names) == 2 * len(TARGETS) and all(m.use_dora for m in lora_modules(model).values())
    with torch.no_grad():
        diff = max_diff(model(IDS), peft_model(IDS).logits)
    print(f"\nPEFT DoRA adapter in ours: logits max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        peft_model.get_nb_trainable_parameters()[0]


def test_dora_merge_lora_and_export_merged_equal_peft_merge_and_unload(checkpoint, tmp_path):
    model, _ = load_pretrained(checkpoint)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS, use_dora=True, seed=0))
    train_a_little(model)
    adapter = str(tmp_path / "adapter")
    save_adapter(model, adapter)
    out = export_merged(checkpoint, adapter, str(tmp_path / "merged"))
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        merged_ours = model(IDS)
        unmerge_lora(model)
        unmerged = model(IDS)
        exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()(IDS).logits
        peft_merged = PeftModel.from_pretrained(hf_base(checkpoint), adapter).merge_and_unload()(IDS).logits
    diff = max_diff(exported, peft_merged)
    print(f"\nDoRA export_merged vs PEFT merge_and_unload: logits max abs diff {diff:.2e}; "
          f"merge_lora vs adapted {max_diff(merged_ours, adapted):.2e}")
    assert diff <= 1e-4
    assert max_diff(merged_ours, adapted) <= 1e-4 and max_diff(unmerged, adapted) <= 1e-4
    assert max_diff(exported, hf_base(checkpoint)(IDS).logits) > 1e-3


def test_dora_refuses_a_magnitude_of_the_wrong_shape(checkpoint, tmp_path):
    model, _ = load_pretrained(checkpoint)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",), use_dora=True, seed=0))
    save_adapter(model, str(tmp_path))

    path = str(tmp_path / "adapter_model.safetensors")
    sd = load_file(path)
    key = next(k for k in sd if k.endswith("lora_magnitude_vector"))
    sd[key] = sd[key][:-1]
    save_file(sd, path)
    fresh, _ = load_pretrained(checkpoint)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_adapter(fresh, str(tmp_path))
    assert not lora_modules(fresh)
    assert os.path.isfile(path)
