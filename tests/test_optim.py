"""train/optim.py: the written-out AdamW against torch.optim.AdamW, and each optimizer name's class."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_script import CharTokenizer, pricer_items, tiny_lora_model  # noqa: E402

import train.loop as loop  # noqa: E402
from train import AdamW, TrainConfig, train  # noqa: E402
from train.config import OPTIMIZERS  # noqa: E402

SHAPES = [(8, 64), (64, 8), (5000,), (3, 7, 11), (1,)]


def _twins(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=g) for s in shapes]
    return [torch.nn.Parameter(w.clone()) for w in start], [torch.nn.Parameter(w.clone()) for w in start], g


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_equals_torch_adamw_to_the_bit_over_100_steps(weight_decay):
    ours, ref, g = _twins(SHAPES)
    opt = AdamW(ours, lr=1e-2, betas=(0.8, 0.99), weight_decay=weight_decay)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), weight_decay=weight_decay)  # for-loop path on the CPU
    for step in range(100):
        for a, b in zip(ours, ref):  # gradients from 1e-3 to 10: Adam's step barely depends on their size
            a.grad = torch.randn(a.shape, generator=g) * 10.0 ** (step % 5 - 3)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(ours, _twins(SHAPES)[0]))
    assert moved > 0.1  # 100 steps of about lr each, in random directions
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    for a, b in zip(ours, ref):
        sa, sb = opt.state[a], torch_opt.state[b]
        assert sa.keys() == {"step", "exp_avg", "exp_avg_sq"} and torch.equal(sa["step"], sb["step"])
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_adamw_first_step_is_the_closed_form():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    g = torch.tensor([0.5, -4.0, 1e-3])
    lr, wd, eps = 0.1, 0.01, 1e-8
    w.grad = g.clone()
    AdamW([w], lr=lr, weight_decay=wd, eps=eps).step()
    # m̂ = g and v̂ = g² after one step: w(1 − lr·λ) − lr · g / (|g| + ε)
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - lr * wd) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=0)


def test_adamw_state_round_trips_through_torch_save_and_loads_into_torch_adamw(tmp_path):
    ours, ref, g = _twins(SHAPES[:3])
    opt = AdamW(ours, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for a in ours:
            a.grad = torch.randn(a.shape, generator=g)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    with torch.no_grad():
        for a, b in zip(ours, ref):
            b.copy_(a)
    resumed = AdamW(ref, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([b.detach().clone().requires_grad_() for b in ref], lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(saved)
    theirs.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))  # its own copy: loading shares tensors
    for _ in range(3):  # the resumed optimizer, torch's loaded from our state, and the one never stopped agree
        grads = [torch.randn(a.shape, generator=g) for a in ours]
        for params in (ours, ref, theirs.param_groups[0]["params"]):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
        opt.step()
        resumed.step()
        theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs.param_groups[0]["params"]))


def _train_capturing_the_optimizer(name, monkeypatch, **model_kw):
    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, config: made.append(real(params, config)) or made[-1])
    model = tiny_lora_model(**model_kw)
    train(model, CharTokenizer(), pricer_items(12), None,
          TrainConfig(lr=1e-2, max_steps=3, batch_size=4, weight_decay=0.01, optimizer=name, progress=False))
    return made[0], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_optimizer_name_makes_its_class(monkeypatch):
    import bitsandbytes as bnb

    classes = {"adamw": AdamW, "torch_adamw": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    assert set(classes) == set(OPTIMIZERS)
    from train.optim import make_optimizer

    for name, cls in classes.items():
        opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer=name))
        assert type(opt) is cls, name
        if name.startswith("paged"):
            assert opt.is_paged


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_follow_torch_adamw_with_8bit_moments_from_4096_elements(name):
    from train.optim import make_optimizer

    shapes = [(8, 64), (128, 64)]  # 512 elements: 32-bit moments; 8,192: 8-bit ones in the 8-bit optimizers
    ours, ref, g = _twins(shapes)
    start = [p.detach().clone() for p in ours]
    config = dict(lr=1e-2, weight_decay=0.01)
    opt = make_optimizer(ours, TrainConfig(optimizer=name, **config))
    torch_opt = make_optimizer(ref, TrainConfig(optimizer="torch_adamw", **config))
    for _ in range(10):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    eight_bit = name.endswith("8bit")
    small, big = (opt.state[p]["state1"].dtype for p in ours)
    assert small == torch.float32 and big == (torch.uint8 if eight_bit else torch.float32)
    for a, b, s in zip(ours, ref, start):
        steps = (b - s).abs().max().item()                   # 10 steps of about lr
        err = (a - b).abs().max().item()
        # 32-bit moments follow torch to rounding; 8-bit ones to a few per cent of the distance moved
        assert steps > 0.02 and err <= (0.05 * steps if eight_bit and a.numel() >= 4096 else 1e-5), (a.shape, err, steps)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_train_uses_the_named_optimizer_and_its_8bit_state(name, monkeypatch):
    # r 64: lm_head's B is 128 x 64 = 8,192 elements; its A, and q_proj's A and B and v_proj's A in both layers,
    # 4,096: 8 tensors at or above bitsandbytes' threshold for 8-bit moments; v_proj's B, 32 x 64, keeps 32-bit ones
    opt, trained = _train_capturing_the_optimizer(name, monkeypatch, r=64)
    start = {n: p.detach() for n, p in tiny_lora_model(r=64).named_parameters() if p.requires_grad}
    assert trained.keys() == start.keys() and trained
    assert all((trained[k] - start[k]).abs().max() > 1e-3 for k in trained)
    if name == "adamw":
        assert type(opt) is AdamW
        return
    import bitsandbytes as bnb

    assert type(opt) is bnb.optim.AdamW8bit
    dtypes = sorted((p.numel(), opt.state[p]["state1"].dtype) for p in opt.param_groups[0]["params"])
    assert len([n for n, d in dtypes if n >= 4096]) == 8 and dtypes[-1][0] == 8192
    assert {d for n, d in dtypes if n >= 4096} == {torch.uint8} and {d for n, d in dtypes if n < 4096} == {torch.float32}
