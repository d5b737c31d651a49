"""fp16 compute with dynamic loss scaling, on the CPU: skipped overflow steps and exact resumes.

Reference: PyTorch's AMP recipe written out by hand (scale the loss by S, divide the gradients by
S, skip the step and halve S on inf/NaN, double S after `growth_interval` clean steps).
"""
import math
import os
import signal
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_script import CharTokenizer, pricer_items, signal_at_forward, tiny_lora_model  # noqa: E402

from lora import lora_state_dict  # noqa: E402
from train import (  # noqa: E402
    TrainConfig, TrainingInterrupted, answer_loss, build_examples, collate, cosine_with_warmup, epoch_batches,
    load_checkpoint, train,
)

STEPS, OVERFLOW_AT, BS = 5, 3, 4
S0 = 2.0 ** 10  # low enough that this tiny model never overflows by itself (2^17 does, at step 3)


def fp16_config(out=None, **kw):
    base = dict(lr=5e-3, max_steps=STEPS, batch_size=BS, warmup_steps=1, autocast_dtype=torch.float16,
                fp16_init_scale=S0, fp16_growth_interval=2, out_dir=None if out is None else str(out), run_name="r", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def overflow_hook(model, at: int):
    """Put inf into one LoRA gradient in the backward pass of optimizer step `at` (1-based)."""
    p = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n)
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad.clone().fill_(math.inf) if calls[0] == at else grad

    p.register_hook(hook)


def reference_run(overflow_at: int, base: str = "fp32"):
    """The AMP recipe by hand, step by step as train() orders the data; returns (adapter, S, skipped)."""
    model = tiny_lora_model(base=base)
    overflow_hook(model, overflow_at)
    torch.manual_seed(42)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.999), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, STEPS, 1, 1.0, 0.0))
    examples, _ = build_examples(CharTokenizer(), pricer_items(24))
    batches = epoch_batches([len(e.input_ids) for e in examples], BS, seed=42, epoch=0)
    S, clean, skipped = torch.tensor(S0), 0, []
    model.train()
    for step in range(1, STEPS + 1):
        batch = collate([examples[i] for i in batches[step - 1]], CharTokenizer.pad_id)
        n = sum(examples[i].n_answer_tokens for i in batches[step - 1])
        with torch.autocast("cpu", dtype=torch.float16):
            loss = answer_loss(model, batch["input_ids"], batch["labels"], reduction="sum")
        (loss * (1 / n) * S).backward()
        inv = S.double().reciprocal().float()
        for p in params:
            p.grad.mul_(inv)
        if all(torch.isfinite(p.grad).all() for p in params):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            clean += 1
            if clean == 2:
                S, clean = S * 2, 0
        else:
            skipped.append(step)
            S, clean = S * 0.5, 0
        sched.step()
        opt.zero_grad(set_to_none=True)
    return lora_state_dict(model), float(S), skipped


@pytest.fixture(scope="module")
def full_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    model = tiny_lora_model()
    overflow_hook(model, OVERFLOW_AT)
    result = train(model, CharTokenizer(), pricer_items(24), None, fp16_config(out, save_every=STEPS))
    state = load_checkpoint(str(out / f"checkpoint-{STEPS}"), tiny_lora_model())
    return lora_state_dict(model), result, state


def test_an_overflow_skips_exactly_that_step_and_matches_the_amp_recipe(full_fp16):
    ours, result, state = full_fp16
    ref, ref_scale, ref_skipped = reference_run(OVERFLOW_AT)
    assert ref_skipped == [OVERFLOW_AT] and result.skipped_steps == 1 and state["loss_scaler"]["skipped"] == 1
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    # S: S0, grows after steps 1-2, halves at the overflow, grows again after steps 4-5
    assert state["loss_scaler"]["scaler"]["scale"] == ref_scale == 2 * S0
    assert [s for s, _ in result.train_losses] == list(range(1, STEPS + 1))
    no_skip, no_skip_scale, none_skipped = reference_run(overflow_at=0)  # the skip matters
    assert none_skipped == [] and no_skip_scale == 4 * S0
    assert any(not torch.equal(no_skip[k], ref[k]) for k in ref)


def test_a_resume_across_a_scale_change_is_exact(full_fp16, tmp_path):
    ours, result, _ = full_fp16
    model = tiny_lora_model()
    overflow_hook(model, OVERFLOW_AT)
    signal_at_forward(model, 4, signal.SIGTERM)  # during step 4: S was halved at step 3
    with pytest.raises(TrainingInterrupted):
        train(model, CharTokenizer(), pricer_items(24), None, fp16_config(tmp_path, save_every=STEPS))
    saved = load_checkpoint(str(tmp_path / "checkpoint-4"), tiny_lora_model())["loss_scaler"]
    assert saved == {"scaler": saved["scaler"], "skipped": 1} and saved["scaler"]["scale"] == S0
    assert saved["scaler"]["_growth_tracker"] == 1  # one clean step since the back-off: step 5 grows S
    resumed = tiny_lora_model()
    again = train(resumed, CharTokenizer(), pricer_items(24), None, fp16_config(tmp_path, save_every=STEPS), resume=True)
    after = lora_state_dict(resumed)
    assert all(torch.equal(after[k], ours[k]) for k in ours)
    assert again.skipped_steps == 1 and again.train_losses == result.train_losses
    final = load_checkpoint(str(tmp_path / f"checkpoint-{STEPS}"), tiny_lora_model())["loss_scaler"]
    assert final["scaler"]["scale"] == 2 * S0


def test_a_nan_loss_under_fp16_still_stops_the_run():
    model, calls = tiny_lora_model(), [0]

    def poison(module, inputs, output):
        calls[0] += 1
        return output * float("nan") if calls[0] == 2 else output

    model.model.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match="step 2"):
        train(model, CharTokenizer(), pricer_items(24), None, fp16_config())


def test_an_fp16_model_takes_the_fused_path_and_still_skips_the_overflow_step(monkeypatch):
    """fp16 weights under fp16 autocast (the preset on a GPU without bf16): autocast's dtype is the
    activations', so the hand-written LoRA function runs, and the loss scaling around it skips the
    same step and ends with the same adapter and scale as the AMP recipe by hand."""
    from lora.fused import LoRAProjections

    calls, apply = [], LoRAProjections.apply
    monkeypatch.setattr(LoRAProjections, "apply", lambda *a: calls.append(1) or apply(*a))
    model = tiny_lora_model(base="fp16")
    overflow_hook(model, OVERFLOW_AT)
    result = train(model, CharTokenizer(), pricer_items(24), None, fp16_config())
    assert calls  # the fused path ran under fp16 autocast
    ref, ref_scale, ref_skipped = reference_run(OVERFLOW_AT, base="fp16")
    assert ref_skipped == [OVERFLOW_AT] and result.skipped_steps == 1
    ours = lora_state_dict(model)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_fp16_settings_are_checked():
    with pytest.raises(ValueError, match="fp16_growth_interval"):
        fp16_config(fp16_growth_interval=0)
    with pytest.raises(ValueError, match="autocast_dtype"):
        fp16_config(autocast_dtype=torch.int8)


# ------------------------------------------------------------------------ the course preset's precision
def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of every node of t's autograd graph."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    return names


def test_preset_precision_step_matches_transformers_and_peft():
    """The course preset's precision on both sides: bf16 frozen weights, NF4 computing in bf16 (ours:
    quantize_model; theirs: bitsandbytes' Linear4bit, as BitsAndBytesConfig(bnb_4bit_compute_dtype=bf16)
    builds it), LoRA weights in fp32, the forward pass under bf16 autocast, the backward pass outside.
    Ours runs the hand-written functions (asserted); the loss agrees within 2^-9 relative (one bf16
    rounding) and every LoRA gradient within 2^-5 of the largest (16 units of bf16 rounding), what
    bf16 allows two layers deep: theirs adds the low-rank product after rounding and scaling it, ours
    scales and adds it in one addmm, and the products are summed in other orders."""
    import bitsandbytes as bnb
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from conftest import tiny_hf_config
    from lora import LoRAConfig, apply_lora
    from model import Llama, LlamaConfig
    from quant import quantize_model

    targets, bf16 = ("q_proj", "k_proj", "v_proj", "o_proj"), torch.bfloat16
    torch.manual_seed(0)
    ours = Llama(LlamaConfig.from_hf(tiny_hf_config())).to(bf16)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_hf_config())).to(bf16)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected
    for name, m in list(hf.named_modules()):  # every linear but the head in NF4, from the same bf16 weights
        if isinstance(m, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=bf16, quant_type="nf4",
                                  compress_statistics=True)
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=q).to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, q)
    hf.is_loaded_in_4bit = True  # as from_pretrained marks it: PEFT then wraps with its bitsandbytes LoRA layer
    quantize_model(ours, "nf4", double_quant=True, compute_dtype=bf16)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets, seed=1))
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the same A, and a B that is not zero, on both sides
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) if "lora_B" in name else p)
                peft_name = "base_model.model." + name.replace(".weight", ".default.weight")
                theirs.get_parameter(peft_name).copy_(p)
    ours.train(), theirs.train()
    ids = torch.randint(3, 128, (2, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    with torch.autocast("cpu", dtype=bf16):
        loss = answer_loss(ours, ids, labels)
        loss_ref = theirs(input_ids=ids, labels=labels).loss
    assert "LoRAProjectionsBackward" in graph_nodes(loss) and "LoRAProjectionsBackward" not in graph_nodes(loss_ref)
    loss.backward()
    loss_ref.backward()
    rel_loss = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    worst = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            ref = theirs.get_parameter("base_model.model." + name.replace(".weight", ".default.weight")).grad
            assert p.grad.dtype == ref.dtype == torch.float32
            worst = max(worst, (p.grad - ref).abs().max().item() / ref.abs().max().item())
    print(f"\npreset precision vs transformers + PEFT: loss {rel_loss:.2e} relative, LoRA gradients {worst:.2e} of the largest")
    assert rel_loss <= 2 ** -9 and worst <= 2 ** -5
