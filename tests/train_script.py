"""A small training run on a tiny random Llama, shared by tests/test_train.py and its subprocesses.

    python tests/train_script.py OUT full|kill|resume [--kill-after N]    # the SIGKILL/resume test
    torchrun --standalone --nproc_per_node 2 tests/train_script.py OUT ddp   # the two-process test
    torchrun ... tests/train_script.py OUT ddp --parallel fsdp --base nf4 --steps 8   # sharded (tests/test_fsdp.py)
    torchrun ... tests/train_script.py OUT ddp --parallel fsdp --base nf4 --steps 8 --kill|--resume  # sharded kill/resume
    torchrun ... tests/train_script.py OUT packed    # packed rows under DDP, then FSDP (tests/test_fsdp.py)

Each run writes OUT/final/ (the adapter, PEFT layout) and OUT/result.json (the losses).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_hf_config  # noqa: E402
from lora import LoRAConfig, apply_lora, save_adapter  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402


class CharTokenizer:
    """One token per character (ids 3..122), BOS 1, EOS 2, PAD 0: enough for a 128-token vocabulary."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + [3 + ord(c) % 120 for c in text]


def tiny_lora_model(dropout: float = 0.0, lora_seed: int = 0, targets=("q_proj", "v_proj", "lm_head"),
                    base: str = "fp32", r: int = 4) -> Llama:
    """The same random base every time (as if loaded from one checkpoint); A and B drawn from `lora_seed`.

    base: "fp32", "bf16" or "fp16" (the base cast to that dtype) or "nf4" (every linear layer but the
    head in NF4).
    """
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config()))
    if base in ("bf16", "fp16"):
        model.to(torch.bfloat16 if base == "bf16" else torch.float16)
    elif base == "nf4":
        from quant import quantize_model

        quantize_model(model, "nf4")
    apply_lora(model, LoRAConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=targets, seed=lora_seed))
    # B starts at zero; give it values so every A receives a gradient from the first step
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(lora_seed + 1))
    return model


def signal_at_forward(model: Llama, n: int, signum: int) -> list[int]:
    """Send this process `signum` during the decoder's n-th forward pass (step n, one micro-batch a
    step), as a preempted machine or a Ctrl-C would. Returns the pass counter: [0] = 0 re-arms it."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)
        return output

    model.model.register_forward_hook(hook)
    return calls


def nonzero_b(shape) -> torch.Tensor:
    """The values a test gives a LoRA B (out, r) so that every A receives a gradient from the first step."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(1)) * 0.02


def pricer_items(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """Prompts of varied length, answers of 4 to 7 characters."""
    return [(f"How much is item {i}{' x' * (i % 5)}?\nPrice is $", f"{(i * 37) % 900 + 5 * (i % 3) ** 3}.00")
            for i in range(offset, offset + n)]


def run_config(out: str, **overrides):
    from train import TrainConfig

    kw = dict(lr=5e-3, epochs=2, batch_size=4, grad_accum=2, warmup_steps=2, min_lr_ratio=0.1, save_every=2,
              keep_last=2, eval_every=2, out_dir=out, run_name="run", group_by_length=True, progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def packed_config(out: str, parallel: str = "ddp"):
    """pricer_items(24) packed in 9 rows of up to 128 tokens (1 to 3 examples each), 3 rows a micro-batch,
    2 micro-batches a step (the second step of an epoch has one), 2 epochs: 4 steps."""
    return run_config(out, packing=True, max_len=128, batch_size=3, save_every=None, keep_last=None, eval_every=None,
                      group_by_length=False, parallel=parallel)


def main() -> None:
    from train import train

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("mode", choices=["full", "kill", "resume", "ddp", "load", "packed"])
    ap.add_argument("--checkpoint", help="load mode: an HF folder read straight into FSDP shards")
    ap.add_argument("--kill-after", type=int, default=4)
    ap.add_argument("--targets", default="q_proj,v_proj,lm_head", help="LoRA targets of the ddp mode")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--base", default="fp32", choices=["fp32", "bf16", "nf4"], help="the base of the ddp mode")
    ap.add_argument("--steps", type=int, default=None, help="max_steps of the ddp mode (default: one epoch)")
    ap.add_argument("--kill", action="store_true", help="ddp mode: SIGKILL after checkpoint --kill-after")
    ap.add_argument("--resume", action="store_true", help="ddp mode: resume from the newest checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, fsdp = int(os.environ.get("RANK", "0")), args.parallel == "fsdp" or args.mode == "load"
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "kill" or args.kill:
        import train.loop as loop

        save = loop.save_checkpoint

        def save_then_die(out_dir, step, *a, **kw):
            path = save(out_dir, step, *a, **kw)
            if step == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        loop.save_checkpoint = save_then_die

    if args.mode == "packed":  # one group for both runs: train() leaves a group it did not create
        import torch.distributed as dist
        from train.checkpoint import latest_checkpoint

        dist.init_process_group("gloo")
        for parallel in ("ddp", "fsdp"):
            model = tiny_lora_model(lora_seed=rank)  # rank 0's adapter wins
            out = os.path.join(args.out, parallel)
            result = train(model, CharTokenizer(), pricer_items(24), pricer_items(6, 100), packed_config(out, parallel))
            if rank == 0:  # FSDP: the adapter gathered into the last checkpoint
                if parallel == "fsdp":
                    shutil.copytree(latest_checkpoint(out), os.path.join(out, "final"))
                else:
                    save_adapter(model, os.path.join(out, "final"))
                with open(os.path.join(out, "result.json"), "w") as f:
                    json.dump({"train": result.train_losses, "val": result.val_losses}, f)
        dist.destroy_process_group()
        return
    if fsdp:  # keep hold of the optimizer, to count what each process holds of its state
        import train.loop as loop

        made, make = [], loop.make_optimizer
        loop.make_optimizer = lambda *a, **kw: made.append(make(*a, **kw)) or made[-1]
    if args.mode == "load":  # load_sharded, then the same training as the ddp mode
        from train.sharded_load import fill_shard, load_sharded

        import atexit

        import torch.distributed as dist

        def group_at_exit() -> None:  # registered first, so it runs after load_sharded's own exit handler
            with open(os.path.join(args.out, f"exit-{rank}.json"), "w") as f:
                json.dump({"group alive": dist.is_initialized()}, f)

        atexit.register(group_at_exit)
        lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), seed=0)
        model, _ = load_sharded(args.checkpoint, lora)
        for name, p in model.named_parameters():  # B = 0 would leave A's first gradients at rounding noise
            if "lora_B" in name:
                fill_shard(p, nonzero_b(p.shape), name)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a test-only gather, to compare
        full.update(model.named_buffers())
        if rank == 0:
            torch.save(full, os.path.join(args.out, "loaded-0.pt"))
        config = run_config(args.out, save_every=2, keep_last=None, eval_every=None, epochs=1, max_steps=args.steps,
                            group_by_length=False, parallel="fsdp")
        result = train(model, CharTokenizer(), pricer_items(24), pricer_items(6, 100), config)
    elif args.mode == "ddp":
        # each rank its own A, B: rank 0's win; FSDP writes the gathered adapter in its last checkpoint
        model = tiny_lora_model(lora_seed=rank, targets=tuple(args.targets.split(",")), base=args.base)
        # DDP: one checkpoint, at the end (step 3), which records the world size the run saw
        config = run_config(args.out, save_every=2 if fsdp else 3, keep_last=None, eval_every=None,
                            epochs=1, max_steps=args.steps, group_by_length=False, parallel=args.parallel)
        result = train(model, CharTokenizer(), pricer_items(24), pricer_items(18 if fsdp else 6, 100), config,
                       resume=args.resume)
        if not fsdp:  # every rank writes its own adapter and losses: the test checks that the ranks agree
            save_adapter(model, os.path.join(args.out, f"final-rank{rank}"))
            with open(os.path.join(args.out, f"result-rank{rank}.json"), "w") as f:
                json.dump({"step": result.step, "train": result.train_losses, "val": result.val_losses}, f)
    else:
        model = tiny_lora_model(dropout=0.1)
        # 20 items, micro-batches of 4, 2 per step: 3 steps an epoch, the last with one micro-batch
        result = train(model, CharTokenizer(), pricer_items(20), pricer_items(6, 100),
                       run_config(args.out, parallel=args.parallel), resume=args.mode == "resume")
    if fsdp:  # what this process holds of each weight, then the gathered adapter of the last checkpoint
        from train.fsdp import local_nbytes

        held = {n: [local_nbytes(p), p.numel() * p.element_size(), p.shape[0] if p.dim() else 1, str(p.dtype)]
                for n, p in list(model.named_parameters()) + list(model.named_buffers())}
        moments = [t for state in made[-1].state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
        held["optimizer state"] = [sum(local_nbytes(t) for t in moments), None, None, "moments"]
        with open(os.path.join(args.out, f"held-{rank}.json"), "w") as f:
            json.dump(held, f)
    if rank == 0:
        if fsdp:
            from train.checkpoint import latest_checkpoint

            shutil.copytree(latest_checkpoint(args.out), os.path.join(args.out, "final"), dirs_exist_ok=True)
        else:
            save_adapter(model, os.path.join(args.out, "final"))
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"step": result.step, "train": result.train_losses, "val": result.val_losses}, f)


if __name__ == "__main__":
    main()
