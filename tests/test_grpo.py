"""train/: reward tuning (GRPO) on the model's own samples, against TRL's GRPOTrainer and closed forms."""
import math
import os
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from preference_kit import (  # noqa: E402
    char_tokenizer_folder, copy_adapter, grads_within, hf_base, lora_grads, max_diff, peft_config, tiny_policy,
    tokenizers_of, within,
)

import train.logps as logps  # noqa: E402
import train.loop as loop  # noqa: E402
import train.rollout as rollout  # noqa: E402
from lora import lora_state_dict, read_adapter  # noqa: E402
from train import GRPO, RewardError, TrainConfig, grpo_advantages, grpo_loss, latest_checkpoint, train  # noqa: E402
from train.preference import completion_batch  # noqa: E402

ROWS = [{"prompt": "Price of a ring? $", "price": 120}, {"prompt": "Pen: $", "price": 2},
        {"prompt": "A cup costs $", "price": 4}]
CHAT_ROW = {"prompt": [{"role": "user", "content": "Sky colour?"}], "price": 0}


def digits(prompt, completion, price):
    """More digits, more reward; the row's price counts when it appears."""
    return sum(c.isdigit() for c in completion) / 4 + (1.0 if str(price) in completion else 0.0) - 0.05 * len(completion)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return tokenizers_of(char_tokenizer_folder(str(tmp_path_factory.mktemp("chartok"))))


# ------------------------------------------------------------------------------- advantages and loss
def test_grpo_advantages_are_centred_in_each_group_and_scaled_by_its_std():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    a = grpo_advantages(r, 4)
    g1 = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(a[:4], (g1 - 3.0) / (math.sqrt(14 / 3) + 1e-4))    # Bessel: Σ(r − 3)² / 3 = 14 / 3
    assert torch.equal(a[4:], torch.zeros(4))                                 # one reward for all: no signal
    assert torch.allclose(grpo_advantages(r, 4, "none"), torch.tensor([-2.0, -1, 0, 3, 0, 0, 0, 0]))
    assert torch.allclose(grpo_advantages(r, 4, "batch"), (r - r.view(2, 4).mean(1).repeat_interleave(4)) / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="groups of group_size=3"):
        grpo_advantages(r, 3)


def test_grpo_loss_clips_the_ratio_and_adds_the_kl_in_closed_form():
    logp = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -0.5, -2.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss = grpo_loss(logp, adv, old, epsilon=0.2)
    # ratio = exp(log π − log π_old) = 1.649, 0.607, 1; A > 0 with the ratio above 1 + ε: clipped to 1.2; A < 0 with the ratio under 1 − ε: clipped to 0.8
    assert torch.allclose(loss, torch.tensor([-1.2, 0.8, -2.0]))
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.tensor([0.0, 0.0, -2.0]))          # clipped tokens give no gradient
    on_policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0])
    out = grpo_loss(on_policy, torch.tensor([1.0, 1.0]), ref_logps=ref, beta=0.1)
    d = ref - on_policy.detach()
    assert torch.allclose(out, -1 + 0.1 * (torch.exp(d) - d - 1))


# ------------------------------------------------------------------------------- equal to TRL
def trl_reward(prompts, completions, price, **_):
    return [digits(p, c, x) for p, c, x in zip(prompts, completions, price)]


def our_rollout(policy, toks, rows, group, seed):
    """Our sampling step on `rows`: the batch (with advantages), the rewards, the completions."""
    objective = GRPO(rewards=digits, group_size=group, max_new_tokens=6, temperature=0.9)
    prompts, _ = objective.units(toks[0], rows, TrainConfig(), "train")
    generator = torch.Generator().manual_seed(seed)
    completions = rollout.sample_completions(policy, prompts, group, 6, objective._eos_ids(policy), 0, 0.9,
                                                   1.0, generator)
    return objective, prompts, completions


@pytest.mark.parametrize("beta,scale,old", [(0.0, "group", False), (0.04, "none", False), (0.04, "group", True)])
def test_grpo_loss_and_lora_gradients_equal_trl_for_the_same_completions(beta, scale, old, toks, tmp_path):
    """TRL's GRPOTrainer is given our completions through its `rollout_func` hook (its own generation
    left out); its `_generate_and_score_completions` then decodes them, calls the reward, computes the
    advantages (and the reference's log-probabilities, the adapter switched off, when beta > 0) and builds
    the inputs its `_compute_loss` takes; `old`: old log-probabilities put into those inputs, 0.3 off the
    current ones in alternate tokens, so that the clip bites (TRL's path for several updates per sample)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    group, policy = 3, tiny_policy()
    objective, prompts, completions = our_rollout(policy, toks, ROWS, group, seed=5)
    assert len({tuple(c) for c in completions}) > 3                       # samples that differ

    def rollout_func(trl_prompts, trainer):
        assert len(trl_prompts) == len(completions)
        return {"prompt_ids": [p.input_ids for p in prompts for _ in range(group)], "completion_ids": completions,
                "logprobs": [[0.0] * len(c) for c in completions]}

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(completions),
                      num_generations=group, max_completion_length=6, temperature=0.9, beta=beta, scale_rewards=scale,
                      report_to=[], use_cpu=True, bf16=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=hf_base(policy), reward_funcs=trl_reward, args=args, peft_config=peft_config(),
                              train_dataset=Dataset.from_list(ROWS), processing_class=toks[1], rollout_func=rollout_func)
    copy_adapter(policy, trainer.model)
    model = trainer.model.train()
    inputs = trainer._generate_and_score_completions([r for r in ROWS for _ in range(group)])

    ours = GRPO(rewards=digits, group_size=group, max_new_tokens=6, temperature=0.9, beta=beta, scale_rewards=scale)
    ours.tokenizer = toks[0]
    rewards = torch.tensor([rollout.score([digits], prompts[i // group], ours.text(c)) for i, c in enumerate(completions)])
    advantages = grpo_advantages(rewards, group, scale)
    assert max_diff(advantages, inputs["advantages"]) <= 1e-6
    batch = completion_batch([(prompts[i // group].input_ids, c) for i, c in enumerate(completions)], 0)
    batch["advantages"] = advantages
    if beta:
        batch["ref_logps"] = ours.reference_logps(policy, batch)
    loss_module = ours.loss_module(policy)
    if old:
        with torch.no_grad():
            now = logps.token_logps(policy, batch["input_ids"], batch["labels"], 0.9)[0]
        shift = 0.3 * (torch.arange(len(now)) % 2)
        batch["old_logps"] = now - shift
        mask = inputs["completion_mask"].bool()
        old_trl = torch.zeros(mask.shape)
        old_trl[mask] = batch["old_logps"]
        inputs["old_per_token_logps"] = old_trl
    n_tokens = int((batch["labels"] != -100).sum())
    assert n_tokens == int(inputs["num_items_in_batch"])
    loss = loss_module(**batch) / n_tokens                        # the loop's step: a mean over completion tokens
    loss.backward()
    trainer.current_gradient_accumulation_steps = 1     # what transformers' loop sets for one micro-batch a step
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    assert within(loss.item(), trl_loss.item())
    grads, trl_grads = lora_grads(policy), lora_grads(model)
    assert grads.keys() == trl_grads.keys() and len(grads) == 28
    assert grads_within([grads[k] for k in grads], [trl_grads[k] for k in grads])
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4


# ------------------------------------------------------------------------------- in the loop
def grpo_config(out, **kw):
    return TrainConfig(**{**dict(lr=2e-2, max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, save_every=2,
                                 out_dir=str(out), run_name="run", progress=False, seed=1), **kw})


def test_the_sampler_and_the_learner_see_the_same_adapter_at_every_step(toks, tmp_path, monkeypatch):
    seen = {"sampler": [], "learner": []}
    sample, step = rollout.generate, loop.training_step

    def sampler(model, *a, **kw):  # (the step it samples for, the adapter it samples with)
        seen["sampler"].append((len(seen["learner"]), {k: v.clone() for k, v in lora_state_dict(model).items()}))
        return sample(model, *a, **kw)

    def learner(loss_module, *a, **kw):
        seen["learner"].append({k: v.clone() for k, v in lora_state_dict(loss_module.model).items()})
        return step(loss_module, *a, **kw)

    monkeypatch.setattr(rollout, "generate", sampler)
    monkeypatch.setattr(loop, "training_step", learner)
    model = tiny_policy(targets=("q_proj", "v_proj"))
    result = train(model, toks[0], ROWS + [CHAT_ROW] * 3, None, grpo_config(tmp_path, save_every=None, out_dir=None),
                   objective=GRPO(rewards=digits, group_size=3, max_new_tokens=5))
    # 6 prompts, micro-batches of 2, two a step: 3 micro-batches an epoch, sampled 2 + 1 + 2 + 1 times
    assert len(seen["learner"]) == 4 and [s for s, _ in seen["sampler"]] == [0, 0, 1, 2, 2, 3]
    for s, weights in seen["sampler"]:
        assert all(torch.equal(weights[k], seen["learner"][s][k]) for k in weights)
    first, last = seen["learner"][0], seen["learner"][-1]
    assert any(not torch.equal(first[k], last[k]) for k in first)           # the adapter did move
    assert set(result.metrics[0][1]) == {"reward", "reward_std", "completions/mean_length"}


def test_grpo_in_the_loop_resumes_exactly(toks, tmp_path):
    def run(out, resume=False):
        model = tiny_policy(targets=("q_proj", "v_proj"))
        objective = GRPO(rewards=digits, group_size=3, max_new_tokens=5, beta=0.05, reference="start")
        return train(model, toks[0], ROWS * 2, ROWS[:2], grpo_config(out), resume=resume, objective=objective)

    full = run(tmp_path / "full")
    assert {"kl", "reward"} <= set(full.metrics[-1][1]) and full.metrics[0][1]["kl"] == pytest.approx(0, abs=1e-6)
    assert "reward" in full.val_metrics[-1][1]
    (tmp_path / "cut").mkdir()
    os.rename(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run(tmp_path / "cut", resume=True)
    a, b = (read_adapter(str(p / "checkpoint-4"))[1] for p in (tmp_path / "full", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train_losses == full.train_losses and resumed.metrics == full.metrics


@pytest.mark.parametrize("bad,error", [
    (lambda prompt, completion, price: 1 / 0,
     r"reward function \S*reward raised ZeroDivisionError: division by zero \(on train_items\[\d\]"),
    (lambda prompt, completion, price: float("nan"), r"reward function \S*reward returned nan on train_items\[\d\]"),
])
def test_a_reward_that_fails_stops_the_run_naming_it_with_the_last_good_checkpoint(bad, error, toks, tmp_path):
    calls = [0]

    def reward(prompt, completion, price):
        calls[0] += 1
        return bad(prompt, completion, price) if calls[0] > 2 * 12 else 0.1 * len(completion)  # from step 3 on

    model = tiny_policy(targets=("q_proj",))
    with pytest.raises(RewardError, match=error):
        train(model, toks[0], ROWS * 2, None, grpo_config(tmp_path, save_every=1),
              objective=GRPO(rewards=reward, group_size=3, max_new_tokens=4))
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")


def test_a_prompt_without_room_for_its_completion_is_named(toks):
    rows = ROWS + [{"prompt": "x" * 40, "price": 1}]
    with pytest.raises(ValueError, match=r"train_items\[3\]: the prompt's 41 tokens leave no room for 8 new tokens "
                                         r"within max_len=48"):
        train(tiny_policy(targets=("q_proj",)), toks[0], rows, None, grpo_config(None, out_dir=None, save_every=None,
                                                                                max_len=48),
              objective=GRPO(rewards=digits, group_size=2, max_new_tokens=8))
