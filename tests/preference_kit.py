"""What the DPO and GRPO tests share: one tiny model held by us and by transformers + PEFT (the same
weights, the same adapter), and one tokenizer read by us and by transformers from the same files.

The tokenizer has a token per printable character, BOS/EOS/PAD and ChatML's two markers, so a text
tokenizes the same alone or joined to another (TRL tokenizes prompt + completion together, we each
part alone) and its chat template is ChatML's.
"""
from __future__ import annotations

import os

import torch

from conftest import tiny_hf_config
from lora import LoRAConfig, apply_lora, lora_state_dict
from model import CHATML, Llama, LlamaConfig, Tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]


def char_tokenizer_folder(folder: str) -> str:
    """tokenizer.json + tokenizer_config.json of a character tokenizer (ids < 128), written to `folder`."""
    import transformers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + CHAT_MARKERS)}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS + CHAT_MARKERS])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>", chat_template=CHATML)
    os.makedirs(folder, exist_ok=True)
    hf.save_pretrained(folder)
    return folder


def tokenizers_of(folder: str):
    """(ours, transformers') from the same folder."""
    import transformers

    return Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)


def tiny_policy(seed: int = 0, lora_seed: int = 0, targets=TARGETS, r: int = 4, b_scale: float = 0.05) -> Llama:
    """A tiny random Llama with LoRA on `targets`, B given values so every A has a gradient; eval-free fp32."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config(pad_token_id=0)))
    apply_lora(model, LoRAConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets, seed=lora_seed))
    g = torch.Generator().manual_seed(lora_seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(b_scale * torch.randn(p.shape, generator=g))
    return model


def hf_base(model: Llama):
    """transformers' LlamaForCausalLM holding our base weights (the adapter left out)."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_config(pad_token_id=0)))
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(base, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    return hf


def peft_config(targets=TARGETS, r: int = 4):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")


def peft_twin(model: Llama, targets=TARGETS, r: int = 4):
    """`hf_base` wrapped by PEFT, its adapter holding our adapter's values."""
    import peft

    twin = peft.get_peft_model(hf_base(model), peft_config(targets, r))
    copy_adapter(model, twin)
    return twin


def copy_adapter(model: Llama, twin) -> None:
    """Our adapter's values into the PEFT model's default adapter."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(twin, lora_state_dict(model))
    assert not result.unexpected_keys, result.unexpected_keys


def lora_grads(model) -> dict[str, torch.Tensor]:
    """{module path + lora_A / lora_B: gradient} of ours or PEFT's, under one naming."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default", "")
            out[key] = p.grad.detach().clone()
    return out


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def within(value: float, ref: float, tol: float = 1e-6) -> bool:
    """|value − ref| <= tol, relative to |ref| when that is above 1: fp32 holds a number of size x to about
    1e-7 · x (a log-probability of −40 to 4e-6), so 1e-6 is absolute up to 1 and relative above."""
    return abs(value - ref) <= tol * max(1.0, abs(ref))


def grads_within(grads, ref_grads, tol: float = 1e-6) -> bool:
    """Every gradient within tol of its reference, relative to the largest reference gradient when that
    is above 1 (as `within`)."""
    scale = max(1.0, max(r.abs().max().item() for r in ref_grads))
    return max(max_diff(g, r) for g, r in zip(grads, ref_grads)) <= tol * scale
