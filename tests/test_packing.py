"""Packing (train/packing.py): whole examples in full rows, with document boundaries no token crosses.

The reference for a packed row is each of its examples run alone: its logits, its loss and its
LoRA gradients must be those it has alone, on every path the model offers. transformers' own
padding-free path (position ids restarting at 0, no attention mask) gives the same logits.
"""
import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conftest import tiny_hf_config  # noqa: E402
from train_script import CharTokenizer, pricer_items, tiny_lora_model  # noqa: E402

from model import Llama, LlamaConfig  # noqa: E402
from train import TrainConfig, answer_loss, build_examples, collate, train  # noqa: E402
from train.data import Example  # noqa: E402
from train.packing import best_fit_decreasing, collate_packed, epoch_rows, fill  # noqa: E402
from train.plan import DataPlan  # noqa: E402

# windows of 3-4 tokens, shorter than every example below: a window ignored (or measured across a
# boundary) would show; Gemma 2 adds soft-caps and alternating windows, Gemma 3 a local RoPE base
CONFIGS = {
    "llama": tiny_hf_config(),
    "mistral_window": tiny_hf_config(model_type="mistral", sliding_window=4),
    "gemma2_softcap_window": tiny_hf_config(model_type="gemma2", head_dim=16, sliding_window=3, query_pre_attn_scalar=16,
                                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_local_rope": tiny_hf_config(model_type="gemma3_text", head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                        rope_local_base_freq=1e4, query_pre_attn_scalar=16),
}
LENGTHS = (9, 5, 12, 7, 3, 10)  # two rows of 26 and 20 tokens: the second ends in 6 tokens of padding


def random_examples(lengths=LENGTHS, seed: int = 1, all_labelled: bool = False) -> list[Example]:
    """Examples with a prompt and an answer; `all_labelled`: every token a label, the first one too, so a
    loss that predicted an example's first token from the one before would count it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        prompt = 0 if all_labelled else n // 2
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def packed_rows(examples):
    return collate_packed([examples[:3], examples[3:]])


def random_model(d: dict) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(d)).eval()
    with torch.no_grad():  # norms off their init, so Gemma's (1 + w) and Llama's w both matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("handwritten", [True, False], ids=["handwritten", "plain"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_example_in_a_packed_row_has_the_logits_it_has_alone(name, handwritten):
    model = random_model(CONFIGS[name])
    model.set_handwritten_backward(handwritten)
    examples = random_examples()
    batch = packed_rows(examples)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"])      # (2, 26, V)
        alone = [model(torch.tensor([e.input_ids]))[0] for e in examples]
        unmasked = model(batch["input_ids"])                                          # the boundaries ignored
    starts = [0, 9, 14, 0, 7, 10]
    rows = [0, 0, 0, 1, 1, 1]
    worst = max((packed[r, s:s + len(a)] - a).abs().max().item() for r, s, a in zip(rows, starts, alone))
    print(f"\n{name}: max |packed - alone| = {worst:.1e}")
    assert worst <= 1e-5
    assert (unmasked[0, 9:14] - alone[1]).abs().max().item() > 1e-2  # without the boundaries they differ


@pytest.mark.parametrize("name", ["llama", "gemma2_softcap_window"])
def test_a_packed_row_with_a_padding_mask_keeps_the_block_diagonal_mask_and_each_example_alone(name):
    """With an attention mask as well (padding marked), a packed row takes the masked path (model/attention.py:
    the block-diagonal mask of its documents, cut by the padding); each example still has its logits alone."""
    model = random_model(CONFIGS[name])
    examples = random_examples()
    batch = packed_rows(examples)
    mask = torch.arange(26) < torch.tensor([[26], [20]])                 # row 1 ends in 6 tokens of padding
    with torch.no_grad():
        packed = model(batch["input_ids"], mask.long(), position_ids=batch["position_ids"])
        alone = [model(torch.tensor([e.input_ids]))[0] for e in examples]
    starts, rows = [0, 9, 14, 0, 7, 10], [0, 0, 0, 1, 1, 1]
    worst = max((packed[r, s:s + len(a)] - a).abs().max().item() for r, s, a in zip(rows, starts, alone))
    assert worst <= 1e-5


def test_a_packed_row_has_transformers_padding_free_logits():
    import transformers

    d = tiny_hf_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**d)).eval()  # SDPA attention
    ours = Llama(LlamaConfig.from_hf(d)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    batch = packed_rows(random_examples())
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits  # no cache: packed
        got = ours(batch["input_ids"], position_ids=batch["position_ids"])
    assert (got - ref).abs().max().item() <= 1e-5


def test_a_plain_arange_keeps_the_fused_causal_path_and_misused_position_ids_are_refused(monkeypatch):
    import model.attention as attention

    model = random_model(CONFIGS["llama"])
    ids = torch.randint(3, 128, (2, 8))
    masks = []
    real = attention.attention_mask_4d
    monkeypatch.setattr("model.llama.attention_mask_4d", lambda *a, **kw: masks.append(real(*a, **kw)) or masks[-1])
    with torch.no_grad():
        same = model(ids, position_ids=torch.arange(8).expand(2, 8))
        assert torch.equal(same, model(ids)) and masks == [None] * 4  # no mask built: SDPA's is_causal
        from model import KVCache

        cache = KVCache.for_model(model, 2, 16)
        with pytest.raises(ValueError, match="KV cache"):
            model.model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2), cache=cache)
    with pytest.raises(ValueError, match=r"position_ids \(2, 7\) must have the shape of input_ids \(2, 8\)"):
        answer_loss(model, ids, ids, position_ids=torch.zeros(2, 7, dtype=torch.long))


# ------------------------------------------------------------------------------------------ loss and gradients
@pytest.mark.parametrize("handwritten,checkpointing", [(True, False), (False, False), (True, True), (True, "offload"),
                                                       (False, "offload")])
def test_a_packed_step_has_the_loss_and_lora_gradients_of_the_padded_step(handwritten, checkpointing):
    model = tiny_lora_model(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model.set_handwritten_backward(handwritten)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # half the examples labelled on every token: a first token predicted across the boundary would count
    examples = random_examples()[:3] + random_examples(seed=2, all_labelled=True)[3:]
    n = sum(e.n_answer_tokens for e in examples)
    padded = collate(examples)
    ref = answer_loss(model, padded["input_ids"], padded["labels"], reduction="sum") / n
    ref_grads = torch.autograd.grad(ref, params)
    batch = packed_rows(examples)
    loss = answer_loss(model, batch["input_ids"], batch["labels"], reduction="sum", position_ids=batch["position_ids"]) / n
    grads = torch.autograd.grad(loss, params)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
    print(f"\n|loss - padded| = {abs(loss.item() - ref.item()):.1e}, max |gradient - padded| = {worst:.1e}")
    assert abs(loss.item() - ref.item()) <= 1e-5 and worst <= 1e-5
    assert max(g.abs().max().item() for g in ref_grads) > 1e-3


def preset_lora_model() -> Llama:
    """The course preset's precision on the tiny model: bf16 frozen weights, every linear but the head in
    NF4 computing in bf16, LoRA (fp32) on all seven projections."""
    from lora import LoRAConfig, apply_lora
    from quant import quantize_model

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config())).to(torch.bfloat16)
    quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, seed=0, target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    with torch.no_grad():  # B off zero, so every A has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model.train()


def test_a_packed_step_in_the_preset_precision_has_the_padded_steps_loss_and_gradients_within_bf16_rounding():
    """The same comparison in the course preset's precision (bf16 under bf16 autocast, fp32 LoRA), on the
    hand-written path (asserted): packed rows and padded ones group the tokens into other products, so the
    two agree within bf16 rounding, not to the bit; an example attending across a boundary (or its first
    token predicted from the one before) moves the loss by 8% (asserted: more than 2^-5)."""
    model = preset_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = random_examples()[:3] + random_examples(seed=2, all_labelled=True)[3:]
    n = sum(e.n_answer_tokens for e in examples)
    padded, batch = collate(examples), packed_rows(examples)

    def step(ids, labels, position_ids=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, ids, labels, reduction="sum", position_ids=position_ids) / n
        nodes, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node.name() not in nodes:
                nodes.add(node.name())
                stack.extend(f for f, _ in node.next_functions)
        assert {"LoRAProjectionsBackward", "RMSNormFunctionBackward", "SwiGLUFunctionBackward"} <= nodes
        return loss.item(), torch.autograd.grad(loss, params)

    ref, ref_grads = step(padded["input_ids"], padded["labels"])
    loss, grads = step(batch["input_ids"], batch["labels"], batch["position_ids"])
    crossed, _ = step(batch["input_ids"], batch["labels"])            # no boundaries: one document a row
    rel = abs(loss - ref) / abs(ref)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) / max(g.abs().max().item() for g in ref_grads)
    print(f"\npreset precision: |loss - padded| {rel:.1e} relative, gradients {worst:.1e} of the largest; "
          f"without boundaries the loss moves {abs(crossed - ref) / abs(ref):.1e}")
    assert rel <= 2 ** -8 and worst <= 2 ** -5
    assert abs(crossed - ref) / abs(ref) > 2 ** -5


# ------------------------------------------------------------------------------------------ the rows
def mixed_lengths(n: int = 400, seed: int = 0) -> list[int]:
    """Lengths of a mixed chat-like set: mostly short turns, some long ones (log-uniform, 8 to 500)."""
    g = torch.Generator().manual_seed(seed)
    return [int(8 * math.exp(u * math.log(500 / 8))) for u in torch.rand(n, generator=g).tolist()]


def test_best_fit_decreasing_packs_every_example_once_nearly_full_rows():
    lengths, max_len = mixed_lengths(), 512
    rows = best_fit_decreasing(lengths, max_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_len for row in rows)
    fewest = math.ceil(sum(lengths) / max_len)  # no packing of these lengths can use fewer rows
    share = fill(rows, lengths, max_len)
    print(f"\n{len(lengths)} examples, {sum(lengths)} tokens: {len(rows)} rows (at least {fewest}), fill {share:.2%}")
    assert len(rows) <= fewest + 1 and share >= 0.95
    with pytest.raises(ValueError, match="item 0 has 600 tokens"):
        best_fit_decreasing([600], 512)


def test_the_packed_plan_is_a_function_of_seed_and_step_and_covers_each_epoch_once():
    examples = build_examples(CharTokenizer(), pricer_items(40))[0]
    config = TrainConfig(packing=True, max_len=128, batch_size=3, grad_accum=2, seed=5, progress=False)
    plan = DataPlan(examples, config)
    lengths = [len(e.input_ids) for e in examples]
    for epoch in (0, 1):
        steps = [plan.step_batches(s) for s in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)]
        rows = [row for step in steps for mb in step for row in mb]
        assert sorted(i for row in rows for i in row) == list(range(len(examples)))
        sizes = [len(mb) for step in steps for mb in step]
        assert all(size == 3 for size in sizes[:-1]) and sizes[-1] >= 1  # batch_size rows, the last what is left
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        assert len(rows) == len(epoch_rows(lengths, 128, 5, epoch)) < len(examples) / 2  # 2 or 3 examples a row
        assert [DataPlan(examples, config).step_batches(s) for s in range(epoch * plan.steps_per_epoch,
                (epoch + 1) * plan.steps_per_epoch)] == steps  # a fresh plan (a resumed run) finds the same
    assert epoch_rows(lengths, 128, 5, 0) != epoch_rows(lengths, 128, 5, 1)


def test_train_with_packing_takes_the_first_step_of_the_padded_run(tmp_path):
    items = pricer_items(12)  # one step covers every example, packed or padded: the same mean loss
    losses = []
    for packing in (False, True):
        result = train(tiny_lora_model(), CharTokenizer(), items, None,
                       TrainConfig(packing=packing, max_len=80, batch_size=12, max_steps=1, progress=False))
        losses.append(result.train_losses[0][1])
    assert abs(losses[0] - losses[1]) <= 1e-5
    with pytest.raises(ValueError, match="packing fills rows of max_len tokens: set max_len"):
        TrainConfig(packing=True)
