"""train/: preference tuning (DPO, IPO) and its fused log-probabilities, against TRL's DPOTrainer and autograd."""
import copy
import dataclasses
import json
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from preference_kit import (  # noqa: E402
    char_tokenizer_folder, copy_adapter, grads_within, hf_base, lora_grads, max_diff, peft_config, peft_twin,
    tiny_policy, tokenizers_of, within,
)

from lora import adapters_disabled, read_adapter  # noqa: E402
from train import (  # noqa: E402
    DPO, TrainConfig, dpo_loss, load_preference_jsonl, preference_batch, preference_pairs, sequence_logps,
    token_logps, train,
)
from train.dpo import METRICS, reference_logps  # noqa: E402
from train.logps import LinearLogProbs  # noqa: E402
from train.plan import DataPlan  # noqa: E402

TEXT_ROWS = [
    {"prompt": "How much is the ring?\nPrice is $", "chosen": "120.00", "rejected": "95.00"},
    {"prompt": "A blue pen costs", "chosen": " 2 dollars.", "rejected": " a lot, I think."},
    {"prompt": "Name a colour:", "chosen": " red", "rejected": " the sky is green"},
]
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "Price of a 0.5 carat ring?"}],
     "chosen": [{"role": "assistant", "content": "$800"}], "rejected": [{"role": "assistant", "content": "$80"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Green, with red dots."}]},
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return tokenizers_of(char_tokenizer_folder(str(tmp_path_factory.mktemp("chartok"))))


# ------------------------------------------------------------------------------- log-probabilities
@pytest.mark.parametrize("head", ["frozen plain head", "head with an adapter"])
def test_token_logps_through_the_fused_head_equal_log_softmax_gather_with_their_gradients(head, toks):
    targets = ("q_proj", "v_proj") + (("lm_head",) if head == "head with an adapter" else ())
    model = tiny_policy(targets=targets)
    batch = preference_batch(preference_pairs(toks[0], TEXT_ROWS), pad_id=0)
    ids, labels = batch["input_ids"], batch["labels"]
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(int((labels[:, 1:] != -100).sum()), generator=torch.Generator().manual_seed(3))
    for temperature in (1.0, 0.7):
        # the reference: every logit in fp32, log_softmax, gather at the labelled positions
        logp_all = torch.log_softmax(model(ids)[:, :-1].float() / temperature, dim=-1)        # (B, T-1, V)
        keep = labels[:, 1:] != -100
        ref = logp_all.gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)[keep]
        ref_grads = torch.autograd.grad((ref * weights).sum(), params)
        logp, rows = token_logps(model, ids, labels, temperature, chunk_size=7)             # several chunks
        grads = torch.autograd.grad((logp * weights).sum(), params)
        assert max_diff(logp, ref) <= 1e-6
        assert rows.tolist() == keep.nonzero()[:, 0].tolist()
        assert grads_within(grads, ref_grads)
    seq = sequence_logps(model, ids, labels)
    with torch.no_grad():
        full = torch.log_softmax(model(ids)[:, :-1].float(), -1).gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    assert max_diff(seq, (full * (labels[:, 1:] != -100)).sum(1)) <= 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_linear_log_probs_backward_equals_autograd_through_the_head(bias):
    """`LinearLogProbs` makes dh = g · (onehot − softmax(z)) W / T in its forward pass; its backward only
    scales those rows. Against autograd through F.linear, log_softmax and gather, in several chunks."""
    g = torch.Generator().manual_seed(0)
    n, D, V, T = 11, 16, 37, 0.7
    h = torch.randn(n, D, generator=g, requires_grad=True)
    weight, y = torch.randn(V, D, generator=g), torch.randint(0, V, (n,), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    grad_out = torch.randn(n, generator=g)
    logp = LinearLogProbs.apply(h, weight, b, y, 4, T)                   # chunks of 4, 4 and 3 rows
    assert type(logp.grad_fn).__name__ == "LinearLogProbsBackward"
    (dh,) = torch.autograd.grad(logp, h, grad_out)
    ref = torch.log_softmax(F.linear(h, weight, b) / T, dim=-1).gather(1, y[:, None]).squeeze(1)
    (ref_dh,) = torch.autograd.grad(ref, h, grad_out)
    assert max_diff(logp, ref) <= 1e-6 and grads_within([dh], [ref_dh])
    assert ref_dh.abs().max() > 1e-2                                     # a gradient that could differ


def test_chosen_and_rejected_go_through_one_forward_and_no_vocabulary_sized_tensor_is_saved(toks):
    model = tiny_policy(targets=("q_proj", "v_proj"))
    objective = DPO(beta=0.1)
    loss_module = objective.loss_module(model)
    pairs = preference_pairs(toks[0], TEXT_ROWS)
    batch = preference_batch(pairs, 0)
    batch["ref_logps"] = torch.zeros(2 * len(pairs))
    calls, shapes = [], []
    model.model.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        loss_module(**batch).backward()
    assert calls == [(2 * len(pairs), batch["input_ids"].shape[1], 64)]   # both rows of every pair, one pass
    vocab = model.config.vocab_size
    assert shapes and not [s for s in shapes if s and s[-1] == vocab]    # the head never keeps (·, V) logits


def test_adapters_disabled_answer_as_the_base_and_come_back():
    torch.manual_seed(0)
    model = tiny_policy(targets=("q_proj", "v_proj", "lm_head"))
    base = copy.deepcopy(model)
    for m in base.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.zeros_(m.lora_B.weight)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        adapted = model(ids)
        with adapters_disabled(model):
            off = model(ids)
        again = model(ids)
    assert torch.equal(off, base(ids).detach()) and torch.equal(again, adapted) and not torch.equal(off, adapted)


# ------------------------------------------------------------------------------- the loss
def test_dpo_loss_is_the_closed_form_of_sigmoid_and_ipo():
    c, r, rc, rr = (torch.tensor(v) for v in ([-3.0, -10.0], [-5.0, -4.0], [-4.0, -9.0], [-4.5, -6.0]))
    losses, cr, rr_ = dpo_loss(c, r, rc, rr, beta=0.5)
    # ρ_c = (1, -1), ρ_r = (-0.5, 2): −log σ(0.5 · (1.5, −3)) = log(1 + e^{−0.75}), log(1 + e^{1.5})
    assert torch.allclose(losses, torch.tensor([0.386871, 1.701413]), atol=1e-6)
    assert torch.allclose(cr, torch.tensor([0.5, -0.5])) and torch.allclose(rr_, torch.tensor([-0.25, 1.0]))
    lc, lr = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    ipo, _, _ = dpo_loss(c, r, rc, rr, beta=0.5, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    # (ρ_c/|c| − ρ_r/|r| − 1/(2β))²: (0.5 + 0.5 − 1)², (−0.25 − 1 − 1)²
    assert torch.allclose(ipo, torch.tensor([0.0, 5.0625]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(c, r, rc, rr, loss_type="ipo")


# ------------------------------------------------------------------------------- equal to TRL
def trl_dpo(policy, toks, rows, tmp_path, loss_type, reference, sft_weight=0.0):
    """TRL's DPOTrainer on the twin of `policy`: reference "base" as TRL makes it for a new adapter (it
    wraps the model itself, the adapter switched off for the reference), "start" for an adapter it is
    given (it loads a frozen copy named "ref"). Its collator builds the batch from its own tokenization of
    the rows; its compute_loss runs once; the metrics are those its log would write."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    losses = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(
        loss_type=[loss_type])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), beta=0.3, **losses,
                     report_to=[], use_cpu=True, bf16=False, max_length=None,
                     precompute_ref_log_probs=False, dataset_num_proc=None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reference == "base":
            trainer = DPOTrainer(model=hf_base(policy), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=toks[1], peft_config=peft_config())
            copy_adapter(policy, trainer.model)
        else:
            trainer = DPOTrainer(model=peft_twin(policy), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=toks[1])
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, lora_grads(model), batch


@pytest.mark.parametrize("loss_type,reference,rows,sft_weight", [
    ("sigmoid", "base", "text", 0.0), ("sigmoid", "start", "chat", 0.0), ("ipo", "base", "chat", 0.0),
    ("ipo", "start", "text", 0.0), ("sigmoid", "start", "text", 0.5)])
def test_dpo_loss_metrics_and_lora_gradients_equal_trl(loss_type, reference, rows, sft_weight, toks, tmp_path):
    """sft_weight: TRL's loss_type=[loss_type, "sft"] with loss_weights=[1, sft_weight] (RPO)."""
    rows = TEXT_ROWS if rows == "text" else CHAT_ROWS
    policy = tiny_policy()
    trl_loss, trl_metrics, trl_grads, trl_batch = trl_dpo(policy, toks, rows, tmp_path, loss_type, reference,
                                                          sft_weight)

    objective = DPO(beta=0.3, loss_type=loss_type, reference=reference, sft_weight=sft_weight)
    pairs = preference_pairs(toks[0], rows)
    batch = preference_batch(pairs, pad_id=0)
    # the same rows, and only the completions labelled (TRL's completion_mask)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(batch["labels"] != -100, trl_batch["completion_mask"].bool())
    ref = reference_logps(policy, pairs, reference)
    batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    if sft_weight:  # the step's pairs over its chosen tokens, as DPO.batches gives it
        batch["sft_scale"] = torch.tensor(len(pairs) / sum(len(p.chosen_ids) for p in pairs))
    loss_module = objective.loss_module(policy)
    loss = loss_module(**batch) / len(pairs)      # the step's mean over pairs
    loss.backward()
    ours = dict(zip(METRICS, (loss_module.take_totals()[:-1] / len(pairs)).tolist()))
    assert within(loss.item(), trl_loss)
    for name in METRICS:
        assert within(ours[name], trl_metrics[name]), (name, ours[name], trl_metrics[name])
    grads = lora_grads(policy)
    assert grads.keys() == trl_grads.keys() and len(grads) == 2 * 7 * 2
    assert grads_within([grads[k] for k in grads], [trl_grads[k] for k in grads])
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4     # gradients that could differ


# ------------------------------------------------------------------------------- data
def test_preference_rows_in_trls_three_formats(toks, tmp_path):
    tok = toks[0]
    implicit = {"chosen": CHAT_ROWS[0]["prompt"] + CHAT_ROWS[0]["chosen"],
                "rejected": CHAT_ROWS[0]["prompt"] + CHAT_ROWS[0]["rejected"]}
    explicit = preference_pairs(tok, [CHAT_ROWS[0]])[0]
    assert preference_pairs(tok, [implicit])[0].prompt_ids == explicit.prompt_ids
    text_implicit = {"chosen": "Name a colour: red", "rejected": "Name a colour: the sky is green"}
    got, want = preference_pairs(tok, [text_implicit])[0], preference_pairs(tok, [TEXT_ROWS[2]])[0]
    assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (want.prompt_ids, want.chosen_ids, want.rejected_ids)
    # text: BOS + prompt, each completion ends with EOS; a chat: the prompt ends with the generation prompt
    assert want.prompt_ids[0] == tok.bos_id and want.chosen_ids[-1] == tok.eos_id == want.rejected_ids[-1]
    assert tok.decode(explicit.prompt_ids).endswith("<|im_start|>assistant\n")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TEXT_ROWS + CHAT_ROWS) + "\n\n")
    read = load_preference_jsonl(str(path), tok)
    assert [p.source for p in read] == [f"{path}:{n}" for n in range(1, 6)]
    assert [p.chosen_ids for p in read] == [p.chosen_ids for p in preference_pairs(tok, TEXT_ROWS + CHAT_ROWS)]


@pytest.mark.parametrize("bad,error", [
    ({"prompt": "Q?", "chosen": " yes", "rejected": " yes"}, r"train_items\[1\]: chosen and rejected are the same"),
    ({"prompt": "Q?" * 40, "chosen": " yes", "rejected": " no"}, r"train_items\[1\]: the prompt's 81 tokens leave no room"),
    ({"prompt": "Q?", "chosen": " yes"}, r"train_items\[1\]: missing key 'rejected'"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
     r"train_items\[1\]: prompt, chosen and rejected must all be strings or all lists of messages; here prompt is "
     r"a str, chosen is a list, rejected is a str"),
])
def test_a_bad_pair_is_named_and_nothing_trains(bad, error, toks):
    model = tiny_policy(targets=("q_proj",))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=error):
        train(model, toks[0], [TEXT_ROWS[0], bad], None, TrainConfig(max_steps=1, batch_size=2, max_len=64,
                                                                     progress=False), objective=DPO())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_bad_line_of_a_jsonl_file_names_its_path_and_line(toks, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n" + json.dumps({**TEXT_ROWS[1], "rejected": TEXT_ROWS[1]["chosen"]}))
    with pytest.raises(ValueError, match=f"{path}:2: chosen and rejected are the same"):
        load_preference_jsonl(str(path), toks[0])


# ------------------------------------------------------------------------------- in the loop
def dpo_run(toks, out, resume=False, model=None, **kw):
    rows = [TEXT_ROWS[i % 3] | {"chosen": TEXT_ROWS[i % 3]["chosen"] + "!" * (i // 3)} for i in range(8)]
    config = TrainConfig(lr=2e-2, max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, save_every=2,
                         out_dir=str(out), run_name="run", progress=False, seed=3, **kw)
    model = model if model is not None else tiny_policy(targets=("q_proj", "v_proj"))
    return train(model, toks[0], rows, rows[:3], config, resume=resume, objective=DPO(beta=0.5)), model


def test_dpo_in_the_loop_raises_the_margin_logs_trls_metrics_and_resumes_exactly(toks, tmp_path):
    full, model = dpo_run(toks, tmp_path / "full")
    margins = [m["rewards/margins"] for _, m in full.metrics]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)          # step 1: the policy is the reference
    assert margins[-1] > 0.05 and full.metrics[-1][1]["rewards/accuracies"] == 1.0
    assert set(full.metrics[0][1]) == set(METRICS) and set(full.val_metrics[-1][1]) == set(METRICS)
    assert full.val_losses[-1][1] < 0.6931                     # log 2: the loss of a policy equal to its reference
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "full" / "runs" / "run"))
    acc.Reload()
    assert {f"train/{m}" for m in METRICS} | {"train/loss", "eval/loss", "eval/rewards/margins"} <= set(acc.Tags()["scalars"])
    # resume from checkpoint-2 with the starting adapter in the model: the reference comes from the checkpoint
    (tmp_path / "cut").mkdir()
    os.rename(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed, _ = dpo_run(toks, tmp_path / "cut", resume=True)
    a, b = (read_adapter(str(p / "checkpoint-4"))[1] for p in (tmp_path / "full", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train_losses == full.train_losses and resumed.metrics == full.metrics


def test_the_reference_is_read_only_for_the_pairs_the_steps_train_on(toks, tmp_path):
    """max_steps short of an epoch: the reference's log-probabilities of the other pairs are never computed
    (NaN, never looked up); a resumed run that would need them is refused."""
    objective = DPO(beta=0.5)
    rows = [TEXT_ROWS[i % 3] | {"chosen": TEXT_ROWS[i % 3]["chosen"] + "!" * (i // 3)} for i in range(8)]
    config = TrainConfig(lr=2e-2, max_steps=1, batch_size=2, grad_accum=1, save_every=1, out_dir=str(tmp_path),
                         run_name="run", progress=False, seed=3)
    train(tiny_policy(targets=("q_proj", "v_proj")), toks[0], rows, None, config, objective=objective)
    plan = DataPlan(preference_pairs(toks[0], rows), config)
    read = (~objective.ref["train"].isnan().any(dim=1)).nonzero().flatten().tolist()
    assert read == sorted(i for row in plan.step_batches(0)[0] for i in row) and len(read) == 2
    with pytest.raises(ValueError, match="resume with the saved run's max_steps"):
        train(tiny_policy(targets=("q_proj", "v_proj")), toks[0], rows, None,
              dataclasses.replace(config, max_steps=4), resume=True, objective=DPO(beta=0.5))
