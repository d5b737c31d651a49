"""train/: the four-step loop, its schedule, loss, logs, checkpoints and DDP, each against a reference."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_script import CharTokenizer, pricer_items, run_config, tiny_lora_model  # noqa: E402

from lora import read_adapter  # noqa: E402
from train import (  # noqa: E402
    IGNORE_INDEX, LengthBucketSampler, TrainConfig, answer_loss, build_examples, collate, cosine_with_warmup,
    epoch_batches, load_checkpoint, train, training_step,
)
from train.distributed import DistContext  # noqa: E402
from train.loss import AnswerLossModule, LinearCrossEntropy  # noqa: E402

SCRIPT = os.path.join(HERE, "train_script.py")
PY = sys.executable


def closed_form(s, total, warmup, base, min_lr):
    if s < warmup:
        return base * s / warmup
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch_of(items, max_len=None):
    examples, _ = build_examples(CharTokenizer(), items, max_len)
    return collate(examples, CharTokenizer.pad_id)


# ---------------------------------------------------------------------------------------- schedule
def test_cosine_with_warmup_equals_lambda_lr_at_every_step_of_1000():
    total, warmup, base, min_lr = 1000, 30, 2e-4, 2e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: closed_form(s, total, warmup, base, min_lr) / base)
    # after the warmup, torch's own (recursive) CosineAnnealingLR is a second, independent reference
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=total - warmup, eta_min=min_lr)
    worst = worst_cos = 0.0
    for s in range(total + 1):
        ours = cosine_with_warmup(s, total, warmup, base, min_lr)
        worst = max(worst, abs(ours - opt.param_groups[0]["lr"]))
        if s >= warmup:
            worst_cos = max(worst_cos, abs(ours - opt2.param_groups[0]["lr"]))
            opt2.step()
            cosine.step()
        opt.step()
        sched.step()
    assert worst <= 1e-18
    assert worst_cos <= 1e-15
    assert cosine_with_warmup(0, total, warmup, base, min_lr) == 0.0
    assert cosine_with_warmup(warmup, total, warmup, base, min_lr) == base
    assert cosine_with_warmup(total, total, warmup, base, min_lr) == min_lr
    assert cosine_with_warmup(0, total, 0, base, min_lr) == base


# ---------------------------------------------------------------------------------------- data
def test_labels_mask_prompt_and_padding_and_truncation_cuts_the_prompt_from_the_left():
    tok = CharTokenizer()
    batch = batch_of([("abcd", "12"), ("a", "345")])
    # row 0: BOS a b c d | 1 2 EOS ; row 1: BOS a | 3 4 5 EOS pad pad
    assert batch["input_ids"][0].tolist() == tok.encode("abcd") + tok.encode("12", bos=False) + [2]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 5 + tok.encode("12", bos=False) + [2]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 2 + tok.encode("345", bos=False) + [2] + [IGNORE_INDEX] * 2
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0] * 2]
    cut = batch_of([("abcdefgh", "12")], max_len=6)
    assert cut["input_ids"][0].tolist() == tok.encode("fgh", bos=False) + tok.encode("12", bos=False) + [2]


def test_length_buckets_cover_the_epoch_once_with_less_padding_and_a_seeded_order():
    lengths = [(i * 7919) % 97 + 3 for i in range(1000)]
    plain = epoch_batches(lengths, 8, seed=1, epoch=0)
    sampler = LengthBucketSampler(lengths, 8, seed=1)
    bucketed = list(sampler)
    for batches in (plain, bucketed):
        assert sorted(i for b in batches for i in b) == list(range(1000))
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert padding(bucketed) < padding(plain) / 4
    assert bucketed == list(LengthBucketSampler(lengths, 8, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != bucketed


# ---------------------------------------------------------------------------------------- loss
def test_answer_loss_equals_cross_entropy_over_full_logits_with_the_same_gradients():
    model = tiny_lora_model()
    batch = batch_of(pricer_items(5))
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(ids)                                                   # (B, T, V), every position
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(trainable(model).values()))
    for chunk in (1024, 3):  # one chunk; and many chunks, each recomputed in the backward pass
        ours = answer_loss(model, ids, labels, chunk_size=chunk)
        grads = torch.autograd.grad(ours, list(trainable(model).values()))
        assert (ours - ref).abs().item() <= 1e-6
        assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) <= 1e-6
    n = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(answer_loss(model, ids, labels, reduction="sum"), ref * n, rtol=1e-6)


def test_the_head_runs_only_at_answer_positions():
    model = tiny_lora_model()  # a LoRA on lm_head: the head is a module of its own, its input can be watched
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batch = batch_of(pricer_items(5))
    n = int((batch["labels"][:, 1:] != -100).sum())
    answer_loss(model, batch["input_ids"], batch["labels"], chunk_size=1024)
    assert rows == [n] and n < batch["labels"][:, 1:].numel() / 3  # short answers after long prompts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_autograd_through_the_head_and_cross_entropy(dtype, device):
    g = torch.Generator().manual_seed(0)
    n, D, V = 37, 16, 101
    h = torch.randn(n, D, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(V, D, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (n,), generator=g).to(device)
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
    ref_grads = torch.autograd.grad(3.0 * ref, (h, w, b))  # a scale on the loss reaches every gradient
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for chunk in (1000, 8, 1):
        ours = LinearCrossEntropy.apply(h, w, b, y, chunk)
        grads = torch.autograd.grad(3.0 * ours, (h, w, b))
        assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
        for a, r in zip(grads, ref_grads):
            assert a.dtype == dtype and a.shape == r.shape
            assert (a.float() - r.float()).abs().max().item() <= tol * r.float().abs().max().item()
    no_bias = LinearCrossEntropy.apply(h, w, None, y, 8)
    assert abs(no_bias.item() - F.cross_entropy(F.linear(h, w).float(), y, reduction="sum").item()) <= 1e-5 * no_bias.item()


def test_answer_loss_with_a_plain_head_takes_linear_cross_entropy_and_matches_full_logits():
    model = tiny_lora_model(targets=("q_proj", "v_proj"))  # lm_head stays an nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    batch = batch_of(pricer_items(5))
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    params = list(trainable(model).values())
    ref_grads = torch.autograd.grad(ref, params)
    for chunk in (1024, 3):
        ours = answer_loss(model, ids, labels, chunk_size=chunk)
        grads = torch.autograd.grad(ours, params)
        assert (ours - ref).abs().item() <= 1e-6
        assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) <= 1e-6


def test_evaluate_is_the_mean_cross_entropy_per_answer_token():
    model = tiny_lora_model()
    items = pricer_items(11)
    batch = batch_of(items)
    with torch.no_grad():
        logits = model(batch["input_ids"])
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    from train import evaluate

    assert abs(evaluate(model, items, CharTokenizer(), batch_size=4) - ref.item()) <= 1e-6  # 3 unequal batches
    assert abs(evaluate(model, [batch]) - ref.item()) <= 1e-6


def test_four_micro_batches_of_2_accumulate_to_one_batch_of_8():
    items = pricer_items(8)  # answers of 4 to 7 characters: unequal answer-token counts per row
    model = tiny_lora_model()
    params = list(trainable(model).values())
    before = [p.detach().clone() for p in params]
    # the reference: one batch of 8, the mean cross-entropy over all its answer tokens, plain autograd
    batch = batch_of(items)
    logits = model(batch["input_ids"])
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, params)
    # ours: training_step over 4 micro-batches of 2; SGD with lr 1 makes the update equal -gradient
    examples, _ = build_examples(CharTokenizer(), items)
    micro = [collate(examples[i:i + 2]) for i in range(0, 8, 2)]
    assert len({int((m["labels"] != -100).sum()) for m in micro}) > 1
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    n_tokens = sum(e.n_answer_tokens for e in examples)
    from contextlib import nullcontext
    loss, _, _ = training_step(AnswerLossModule(model), micro, opt, sched, params, n_tokens, DistContext(),
                               None, nullcontext, step=1)
    assert abs(loss - ref.item()) <= 1e-6
    diff = max((b - p.detach() - g).abs().max().item() for b, p, g in zip(before, params, ref_grads))
    assert diff <= 1e-6


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients():
    batch = batch_of(pricer_items(4))
    grads, calls = [], []
    for ckpt in (False, True):
        model = tiny_lora_model(dropout=0.1)  # dropout: recomputation must replay the same masks
        model.set_gradient_checkpointing(ckpt)
        model.train()
        count = [0]
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))  # recomputation may stop early: count starts
        torch.manual_seed(7)
        loss = answer_loss(model, batch["input_ids"], batch["labels"])
        grads.append(torch.autograd.grad(loss, list(trainable(model).values())))
        calls.append(count[0])
    # checkpointing keeps no activations inside a layer and runs its forward again in the backward pass
    assert calls == [2, 4]
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) <= 1e-6


def test_train_switches_on_grad_checkpointing_and_compile_and_runs_the_same_steps(monkeypatch):
    from model import Llama

    compiled = []  # compiling itself is proved in tests/test_model.py; here: train() asks for it
    monkeypatch.setattr(Llama, "compile_layers", lambda self, **kw: compiled.append(self))
    finals, recomputed = [], []
    for extra in ({}, dict(grad_checkpointing=True, compile=True)):
        model = tiny_lora_model()
        count = [0]
        model.model.layers[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        train(model, CharTokenizer(), pricer_items(8), None,
              TrainConfig(lr=1e-2, max_steps=2, batch_size=4, warmup_steps=0, progress=False, **extra))
        finals.append(trainable(model))
        recomputed.append(count[0])
    assert len(compiled) == 1 and compiled[0] is model
    assert recomputed == [2, 4]  # 2 steps of 1 micro-batch; checkpointing runs each layer again in the backward
    assert finals[0].keys() == finals[1].keys() and finals[0]
    assert max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0]) <= 1e-6


def test_train_under_bf16_autocast_follows_fp32_to_bf16_precision():
    dtypes, finals, losses = [], [], []
    for autocast_dtype in (None, torch.bfloat16):
        model = tiny_lora_model()
        hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        result = train(model, CharTokenizer(), pricer_items(8), pricer_items(4, 100),
                       TrainConfig(lr=1e-2, max_steps=2, batch_size=4, warmup_steps=0, progress=False,
                                   autocast_dtype=autocast_dtype))
        hook.remove()
        finals.append(trainable(model))
        losses.append([loss for _, loss in result.train_losses + result.val_losses])
    assert set(dtypes[:3]) == {torch.float32} and set(dtypes[3:]) == {torch.bfloat16}  # 2 steps and 1 evaluation each
    assert finals[0].keys() == finals[1].keys() and finals[0]
    assert all(p.dtype == torch.float32 for p in finals[1].values())  # the master weights stay fp32
    worst = max(abs(a - b) / a for a, b in zip(*losses))
    assert 0 < worst <= 2 ** -8  # bf16: 7 mantissa bits stored, 8 significant: its rounding, no more
    # AdamW moves each weight by about lr whatever its gradient's size, so a tiny gradient whose sign
    # bf16 flips moves that weight the other way: compare the whole update, not each weight
    start = trainable(tiny_lora_model())
    u32, u16 = (torch.cat([(f[k] - start[k]).flatten() for k in start]) for f in finals)
    assert (u16 - u32).norm() <= 0.15 * u32.norm() and F.cosine_similarity(u16, u32, dim=0) >= 0.99


# optimizers: tests/test_optim.py


# ---------------------------------------------------------------------------------------- checkpoints
def _run(out, mode, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PY, SCRIPT, str(out), mode], env=env, capture_output=True, text=True, timeout=300, **kw)


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}  # a later write wins
    return scalars, tags


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    done = _run(out, "full")
    assert done.returncode == 0, done.stderr
    return out


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_adapter_and_losses(full_run, tmp_path):
    killed = _run(tmp_path, "kill")  # SIGKILL right after checkpoint-4, in the middle of epoch 2
    assert killed.returncode == -9, killed.stderr
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "runs"]
    resumed = _run(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr
    # the adapter is bit-identical (dropout, data order and AdamW moments all resumed exactly)
    a = read_adapter(str(full_run / "final"))[1]
    b = read_adapter(str(tmp_path / "final"))[1]
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(d / "result.json")) for d in (full_run, tmp_path))
    assert ra == rb and ra["step"] == 6
    sa, sb = _scalars(full_run / "runs" / "run")[0], _scalars(tmp_path / "runs" / "run")[0]
    assert sa["train/loss"] == sb["train/loss"] and sa["eval/loss"] == sb["eval/loss"]
    assert sorted(sa["train/loss"]) == list(range(1, 7))
    # keep_last=2 pruned the older checkpoints; no temporary folder is left behind
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6", "final", "result.json", "runs"]


def test_event_file_holds_the_tags_and_the_learning_rates_follow_the_schedule(full_run):
    scalars, tags = _scalars(full_run / "runs" / "run")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "eval/loss"):
        assert tag in scalars, tag
    assert any("hparams" in t for t in tags["tensors"])
    cfg = run_config(str(full_run))
    total = json.load(open(full_run / "result.json"))["step"]
    lrs = scalars["train/lr"]
    assert sorted(lrs) == list(range(1, total + 1))
    for step, lr in lrs.items():  # step s was taken with lr(s - 1); TensorBoard stores float32
        assert lr == pytest.approx(cosine_with_warmup(step - 1, total, 2, cfg.lr, cfg.lr * cfg.min_lr_ratio), rel=1e-6, abs=1e-12)
    assert lrs[1] == 0.0 and lrs[3] == pytest.approx(cfg.lr, rel=1e-6)
    assert sorted(scalars["eval/loss"]) == [2, 4, 6]


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint_loads(tmp_path):
    model = tiny_lora_model()
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 4th optimizer step's forward pass returns NaN
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 4 else output

    model.model.register_forward_hook(poison)
    cfg = TrainConfig(max_steps=6, batch_size=4, save_every=2, out_dir=str(tmp_path), progress=False, run_name="r")
    with pytest.raises(FloatingPointError, match="step 4"):
        train(model, CharTokenizer(), pricer_items(24), None, cfg)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "runs"]
    fresh = tiny_lora_model()
    state = load_checkpoint(str(tmp_path / "checkpoint-2"), fresh)
    assert state["step"] == 2 and [s for s, _ in state["train_losses"]] == [1, 2]
    saved = read_adapter(str(tmp_path / "checkpoint-2"))[1]
    name = next(k for k in saved if "q_proj.lora_A" in k)
    assert torch.equal(trainable(fresh)[name.replace("base_model.model.", "")], saved[name])


def test_the_progress_bar_shows_step_loss_lr_and_time_left_on_stderr_unless_switched_off(capsys):
    for progress in (True, False):
        result = train(tiny_lora_model(), CharTokenizer(), pricer_items(8), None,
                       TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, progress=progress))
        err = capsys.readouterr().err
        if progress:
            last = err.split("\r")[-1]
            assert "2/2" in last and f"loss={result.train_losses[-1][1]:.4f}" in last and "lr=" in last
            assert "<" in last  # tqdm's "elapsed<remaining"
        else:
            assert "2/2" not in err and "loss=" not in err


# ---------------------------------------------------------------------------------------- DDP
# a LoRA on lm_head takes the loss through autograd; a plain head through LinearCrossEntropy
@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "lm_head"), ("q_proj", "v_proj")])
def test_two_gloo_processes_under_torchrun_end_with_the_single_process_adapter(tmp_path, targets):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, str(tmp_path / "ddp"), "ddp",
           "--targets", ",".join(targets)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = tiny_lora_model(lora_seed=0, targets=targets)  # the single process: rank 0's adapter, the same global batches
    config = run_config(str(tmp_path / "one"), save_every=None, keep_last=None, eval_every=None, epochs=1, group_by_length=False)
    result = train(model, CharTokenizer(), pricer_items(24), pricer_items(6, 100), config)
    ddp = read_adapter(str(tmp_path / "ddp" / "final"))[1]
    ours = {f"base_model.model.{k}": v for k, v in trainable(model).items()}
    assert ddp.keys() == ours.keys() and ddp
    assert max((ddp[k] - ours[k]).abs().max().item() for k in ddp) <= 1e-5
    initial = tiny_lora_model(lora_seed=0, targets=targets).state_dict()
    moved = max((ddp[k] - initial[k[len("base_model.model."):]]).abs().max().item() for k in ddp)
    assert moved > 1e-3  # training did change the adapter
    # rank 1 began from other A and B (lora_seed=1): it ends with rank 0's adapter only if DDP ran
    rank1 = read_adapter(str(tmp_path / "ddp" / "final-rank1"))[1]
    assert rank1.keys() == ddp.keys() and all(torch.equal(rank1[k], ddp[k]) for k in ddp)
    for rank in (0, 1):  # each rank's losses: the train loss and the validation loss summed over both shards
        logged = json.load(open(tmp_path / "ddp" / f"result-rank{rank}.json"))
        for kind, ref in (("train", result.train_losses), ("val", result.val_losses)):
            assert [s for s, _ in logged[kind]] == [s for s, _ in ref] and ref
            assert max(abs(a[1] - b[1]) for a, b in zip(logged[kind], ref)) <= 1e-5
    # the gradient itself, not only AdamW's step (which a gradient off by a constant factor leaves almost alone)
    norms = [_scalars(tmp_path / d / "runs" / "run")[0]["train/grad_norm"] for d in ("ddp", "one")]
    assert sorted(norms[0]) == sorted(norms[1]) == [1, 2, 3]
    assert all(norms[0][s] == pytest.approx(norms[1][s], rel=1e-4) for s in norms[1])
    state = load_checkpoint(str(tmp_path / "ddp" / "checkpoint-3"), tiny_lora_model(targets=targets))
    assert state["world_size"] == 2 and len(state["rng"]) == 2


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors_and_warnings(tmp_path):
    model = tiny_lora_model()
    with pytest.raises(ValueError, match="train_items is empty"):
        train(model, CharTokenizer(), [], None, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="out_dir"):
        TrainConfig(save_every=10)
    with pytest.raises(ValueError, match="item 1 must be a \\(prompt, answer\\) pair"):
        build_examples(CharTokenizer(), [("a", "b"), ("only a prompt",)])
    os.makedirs(tmp_path / "checkpoint-3.tmp")  # a save cut short does not count as a checkpoint
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(model, CharTokenizer(), pricer_items(4), None, TrainConfig(out_dir=str(tmp_path), progress=False), resume=True)
    # an answer longer than max_len leaves no answer token: skipped and counted, the rest trains
    items = pricer_items(7) + [("How much?", "1234567890.00")]
    with pytest.warns(UserWarning, match="1 of 8 items"):
        result = train(model, CharTokenizer(), items, None, TrainConfig(max_len=12, max_steps=1, progress=False))
    assert result.skipped_items == 1 and result.step == 1
