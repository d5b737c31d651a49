"""FSDP2 (`TrainConfig(parallel="fsdp")`): N gloo processes under torchrun against one process.

Each torchrun case starts a few CPU processes on the tiny random Llama of tests/train_script.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lora import read_adapter
from train import TrainConfig, train
from train_script import CharTokenizer, nonzero_b, packed_config, pricer_items, run_config, tiny_lora_model

PY = sys.executable
SCRIPT = os.path.join(os.path.dirname(__file__), "train_script.py")
PREFIX = "base_model.model."


def torchrun(n: int, out, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), SCRIPT, str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def trainable(model) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{k}": p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run each sharded run must reproduce: rank 0's initial adapter, 8 steps.

    18 validation items: 4 processes get 5, 5, 4 and 4 of them, 2, 2, 1 and 1 batches of 4; every
    sharded forward is a collective, so the last two pad with a batch that counts nothing.
    """
    out = {}
    for base in ("nf4", "bf16"):
        model = tiny_lora_model(lora_seed=0, base=base)
        config = run_config(str(tmp_path_factory.mktemp(base)), save_every=None, keep_last=None, eval_every=None,
                            epochs=1, max_steps=8, group_by_length=False)
        result = train(model, CharTokenizer(), pricer_items(24), pricer_items(18, 100), config)
        out[base] = trainable(model), result.train_losses, result.val_losses
    return out


def sharded_run(n: int, out, base: str = "nf4", *flags: str, parallel: str = "fsdp") -> subprocess.CompletedProcess:
    return torchrun(n, out, "ddp", "--parallel", parallel, "--base", base, "--steps", "8", *flags)


def adapter_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_nf4(tmp_path_factory):
    """Two processes, NF4 base, 8 steps, a checkpoint every 2: the uninterrupted sharded run."""
    out = tmp_path_factory.mktemp("fsdp2")
    done = sharded_run(2, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def check_held(out, n: int, base: str) -> None:
    """Each process holds 1/N of every tensor (whole rows of dim 0): packed 4-bit weights, absmax, LoRA."""
    held = [json.load(open(out / f"held-{r}.json")) for r in range(n)]
    replicated = ("quant_map", "offset", "inv_freq")  # code books (16 and 256 values), a scalar, RoPE's table
    for name, (_, total, rows, dtype) in held[0].items():
        per_rank = [h[name][0] for h in held]
        if dtype == "moments":
            continue
        if name.endswith(replicated):
            assert per_rank == [total] * n, name
            continue
        assert sum(per_rank) == total and max(per_rank) <= -(-rows // n) * (total // rows), (name, per_rank)
        if dtype == "torch.uint8" and name.endswith(".weight"):  # NF4: 1/N within one block of 64 weights
            assert max(abs(b - total / n) for b in per_rank) <= 32, (name, per_rank)
    packed = [k for k, v in held[0].items() if v[3] == "torch.uint8" and k.endswith(".weight")]
    absmax = [k for k in held[0] if k.endswith(".absmax")]
    assert (len(packed), len(absmax)) == ((14, 14) if base == "nf4" else (0, 0))  # 2 layers x 7 linear layers


@pytest.mark.parametrize("n", [2, 4])
def test_n_sharded_processes_on_an_nf4_base_end_with_the_single_process_adapter(tmp_path, one_process, two_nf4, n):
    out = two_nf4
    if n != 2:
        out = tmp_path
        done = sharded_run(n, out)
        assert done.returncode == 0, done.stderr[-3000:]
    ours, losses, val = one_process["nf4"]
    sharded = read_adapter(str(out / "final"))[1]  # written once, gathered, in PEFT's layout
    assert adapter_diff(sharded, ours) <= 1e-5
    initial = trainable(tiny_lora_model(lora_seed=0, base="nf4"))
    assert adapter_diff(sharded, initial) > 1e-3  # training moved it
    logged = json.load(open(out / "result.json"))["train"]
    assert [s for s, _ in logged] == [s for s, _ in losses] == list(range(1, 9))
    assert max(abs(a[1] - b[1]) for a, b in zip(logged, losses)) <= 1e-5
    logged_val = json.load(open(out / "result.json"))["val"]
    assert len(logged_val) == len(val) == 1 and abs(logged_val[0][1] - val[0][1]) <= 1e-5
    check_held(out, n, "nf4")


def test_two_sharded_processes_on_a_bf16_base_equal_one_process_up_to_bf16_rounding(tmp_path, one_process):
    done = sharded_run(2, tmp_path, "bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = read_adapter(str(tmp_path / "final"))[1]
    # each process's bf16 gradient of its rows is rounded before the fp32 sum: 5.1e-4 from one process,
    # the same as DDP's (FSDP against DDP: 1.5e-8)
    assert adapter_diff(sharded, one_process["bf16"][0]) <= 2e-3
    assert adapter_diff(sharded, trainable(tiny_lora_model(lora_seed=0, base="bf16"))) > 1e-2
    check_held(tmp_path, 2, "bf16")


def test_a_sharded_run_killed_after_a_checkpoint_resumes_bit_identically_and_onto_4_processes(tmp_path, two_nf4):
    killed = sharded_run(2, tmp_path / "a", "nf4", "--kill")  # SIGKILL of rank 0 right after checkpoint-4
    assert killed.returncode != 0
    assert sorted(p for p in os.listdir(tmp_path / "a") if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(os.listdir(tmp_path / "a" / "checkpoint-4" / "optimizer")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    uninterrupted = read_adapter(str(two_nf4 / "final"))[1]
    resumed = sharded_run(2, tmp_path / "a", "nf4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = read_adapter(str(tmp_path / "a" / "final"))[1]
    assert ours.keys() == uninterrupted.keys() and all(torch.equal(ours[k], uninterrupted[k]) for k in ours)
    assert json.load(open(tmp_path / "a" / "result.json")) == json.load(open(two_nf4 / "result.json"))
    # four processes from a two-process checkpoint: torch.distributed.checkpoint reshards AdamW's moments
    resumed = sharded_run(4, tmp_path / "b", "nf4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert adapter_diff(read_adapter(str(tmp_path / "b" / "final"))[1], uninterrupted) <= 1e-5


def test_packed_rows_under_ddp_and_under_fsdp_end_with_the_single_process_adapter(tmp_path):
    done = torchrun(2, tmp_path, "packed")  # two gloo processes: a DDP run, then an FSDP run
    assert done.returncode == 0, done.stderr[-3000:]
    model = tiny_lora_model(lora_seed=0)
    result = train(model, CharTokenizer(), pricer_items(24), pricer_items(6, 100), packed_config(str(tmp_path / "one")))
    ours = trainable(model)
    assert adapter_diff(ours, trainable(tiny_lora_model(lora_seed=0))) > 1e-3  # training moved it
    for parallel in ("ddp", "fsdp"):
        diff = adapter_diff(read_adapter(str(tmp_path / parallel / "final"))[1], ours)
        print(f"\npacked {parallel}: max |adapter - one process| = {diff:.1e}")
        assert diff <= 1e-5, parallel
        logged = json.load(open(tmp_path / parallel / "result.json"))
        for kind, ref in (("train", result.train_losses), ("val", result.val_losses)):
            assert [s for s, _ in logged[kind]] == [s for s, _ in ref] and ref
            assert max(abs(a[1] - b[1]) for a, b in zip(logged[kind], ref)) <= 1e-5, (parallel, kind)


def test_bad_sharded_set_ups_give_clear_errors(tmp_path, two_nf4):
    from torch import nn

    from train.fsdp import check_shardable, load_optimizer

    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):  # no torchrun: nothing to shard across
        train(tiny_lora_model(), CharTokenizer(), pricer_items(8), None,
              TrainConfig(max_steps=1, parallel="fsdp", out_dir=str(tmp_path / "x"), progress=False))
    with pytest.raises(ValueError, match="needs out_dir"):
        TrainConfig(parallel="fsdp")
    with pytest.raises(ValueError, match="decoder layer"):
        check_shardable(nn.Sequential(nn.Linear(4, 4)), 2)
    model = tiny_lora_model(base="nf4")
    check_shardable(model, 32)  # k_proj: 64 x 32 weights, 1024 packed bytes = 32 blocks of 32 bytes
    with pytest.raises(ValueError, match=r"k_proj: a 32x64 4-bit weight has 1024 packed bytes.*64 processes"):
        check_shardable(model, 64)
    # a whole (single-process) optimizer state is not resharded for FSDP, nor FSDP's shards for one process
    cfg = run_config(str(tmp_path / "one"), max_steps=2, save_every=2, eval_every=None)
    train(tiny_lora_model(), CharTokenizer(), pricer_items(8), None, cfg)
    state = torch.load(tmp_path / "one" / "checkpoint-2" / "training_state.pt", weights_only=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="checkpoint-2 was saved with parallel='ddp'.*cannot be resharded"):
        load_optimizer(model, optimizer, state, str(tmp_path / "one" / "checkpoint-2"), "fsdp")
    shutil.copytree(two_nf4 / "checkpoint-8", tmp_path / "two" / "checkpoint-8")
    with pytest.raises(ValueError, match=r"sharded optimizer state \(parallel='fsdp', 2 processes"):
        train(tiny_lora_model(base="nf4"), CharTokenizer(), pricer_items(24), None,
              run_config(str(tmp_path / "two"), max_steps=10, eval_every=None), resume=True)


def test_train_pricer_runs_sharded_under_torchrun_and_writes_the_adapter_once(tmp_path):
    from test_pricer import EXAMPLES, write_csv, write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(str(tmp_path / "tiny"))
    data = tmp_path / "items.csv"
    write_csv(data, ["text", "price"], [[f"Diamond: 0.{i} carat, {['Ideal', 'Good'][i % 2]} cut", 100 + 37 * i]
                                        for i in range(16)])
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(EXAMPLES, "train_pricer.py"), "--parallel", "fsdp", "--model", checkpoint, "--data", str(data),
           "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--train-size", "8", "--val-size", "4",
           "--test-size", "4", "--save-every", "0", "--layers", "all", "--lr", "1e-2",  # torchrun takes --r for its own
           "--device", "cpu", "--no-progress", "--eval-batch-size", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| after training |") == 1  # rank 0 alone scores the trained adapter
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2"]
    final = read_adapter(str(out / "adapter"))[1]
    assert len(final) == 2 * 7 * 2 and final.keys() == read_adapter(str(out / "checkpoint-2"))[1].keys()
    assert all(torch.equal(v, read_adapter(str(out / "checkpoint-2"))[1][k]) for k, v in final.items())


def test_load_sharded_reads_each_process_its_rows_equal_to_one_process_load_and_trains_the_same(tmp_path):
    from lora import LoRAConfig, apply_lora
    from model import load_pretrained
    from test_pricer import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(str(tmp_path / "tiny"))
    done = torchrun(2, tmp_path / "run", "load", "--checkpoint", checkpoint, "--steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    # the group load_sharded joined is gone before the interpreter tears down (a live gloo group can abort it)
    assert [json.load(open(tmp_path / "run" / f"exit-{r}.json")) for r in range(2)] == [{"group alive": False}] * 2
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), seed=0)
    model, _ = load_pretrained(checkpoint, quant="nf4")  # the reference: the whole model in one process
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(nonzero_b(p.shape))
    reference = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded = torch.load(tmp_path / "run" / "loaded-0.pt", weights_only=True)  # the shards, gathered for the test
    assert loaded.keys() == reference.keys() and len(loaded) == 114  # parameters and buffers, 14 decoded scales among them
    assert all(torch.equal(loaded[k].reshape(reference[k].shape), reference[k]) for k in loaded)
    check_held(tmp_path / "run", 2, "nf4")
    model.train()
    config = run_config(str(tmp_path / "one"), save_every=None, keep_last=None, eval_every=None, epochs=1,
                        max_steps=4, group_by_length=False)
    train(model, CharTokenizer(), pricer_items(24), pricer_items(6, 100), config)
    assert adapter_diff(read_adapter(str(tmp_path / "run" / "final"))[1], trainable(model)) <= 1e-5


def test_the_memory_model_matches_what_each_sharded_process_holds_and_what_autograd_saves(two_nf4):
    from lora import LoRAConfig, apply_lora
    from model import Llama, LlamaConfig
    from quant import quantize_model
    from train.memory import Shape, per_process_bytes

    from conftest import tiny_hf_config

    shape = Shape.of(LlamaConfig.from_hf(tiny_hf_config()))
    # the two-process NF4 run: r=4 on q, v and the head, fp32 embeddings, head and norms on the CPU
    model = per_process_bytes(shape, 2, r=4, targets=("q_proj", "v_proj", "lm_head"), frozen_bytes=4)
    for rank in range(2):
        held = json.load(open(two_nf4 / f"held-{rank}.json"))
        bytes_of = lambda test: sum(v[0] for k, v in held.items() if test(k, v[3]))  # noqa: E731
        measured = {
            "base": bytes_of(lambda k, d: d == "torch.uint8" and k.endswith(".weight")),
            "quant state": bytes_of(lambda k, d: k.endswith(("absmax", "quant_map", "offset"))),
            "other frozen": bytes_of(lambda k, d: d == "torch.float32" and "lora_" not in k and "absmax" not in k
                                     and not k.endswith(("quant_map", "offset"))),
            "LoRA": bytes_of(lambda k, d: "lora_" in k),
            "optimizer": held["optimizer state"][0],
        }
        for part, got in measured.items():
            assert got == pytest.approx(model[part], rel=0.05), (rank, part, got, model[part])
    # activations: the bytes autograd keeps for one more decoder layer (saved_tensors_hooks, storages once)
    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        m = Llama(LlamaConfig.from_hf(tiny_hf_config(num_hidden_layers=layers)))
        quantize_model(m)
        apply_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        seen, weights = {}, {p.untyped_storage().data_ptr() for p in m.parameters()}

        def keep(t):  # the model's own weights are counted apart (LoRA, other frozen), not as activations
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            m.model(torch.randint(3, 100, (2, 16)))
        return sum(seen.values())

    one_layer = saved_bytes(3) - saved_bytes(2)
    act = lambda layers: per_process_bytes(Shape.of(LlamaConfig.from_hf(tiny_hf_config(num_hidden_layers=layers))),  # noqa: E731
                                           1, r=4, batch=2, seq=16, act_bytes=4)["activations"]
    assert act(3) - act(2) == pytest.approx(one_layer, rel=0.05)
