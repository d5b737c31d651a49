"""A tiny training run that can be preempted, for tests/test_reliability.py.

    python tests/preempt_script.py OUT full|run|resume [--sleep S] [--second-signal]
    torchrun --standalone --nproc_per_node 2 tests/preempt_script.py OUT run --ddp

`run` prints `done <n>` after each optimizer step (sleeping S seconds first, so a test can send a
signal mid-run) and exits with the status of `TrainingInterrupted` when stopped; `--second-signal`
sends itself another SIGTERM in the middle of writing the preemption checkpoint. Each run that
finishes writes OUT/final/ (the adapter) and OUT/result.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from train_script import CharTokenizer, pricer_items, run_config, tiny_lora_model  # noqa: E402

from lora import save_adapter  # noqa: E402


def config_for(out: str, ddp: bool):
    # checkpoints only on preemption: the checkpoint the test resumes from is the one the signal wrote
    return run_config(out, save_every=None, keep_last=None, eval_every=3, epochs=2, group_by_length=not ddp)


def main() -> None:
    import train.checkpoint as checkpoint
    import train.loop as loop
    from train import TrainingInterrupted, train

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("mode", choices=["full", "run", "resume"])
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--second-signal", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(args.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))

    step_fn, done = loop.training_step, [0]

    def slow_step(*a, **kw):
        out = step_fn(*a, **kw)
        time.sleep(args.sleep)
        done[0] += 1
        print(f"rank {rank} done {done[0]}", flush=True)
        return out

    loop.training_step = slow_step
    if args.second_signal:
        write, sent = checkpoint._write_bytes, []

        def write_and_signal(path, data):
            if not sent:  # between the adapter and the training state: the folder is half written
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            write(path, data)

        checkpoint._write_bytes = write_and_signal

    if args.ddp:  # each rank its own A, B: rank 0's win, as in train_script's ddp mode
        model = tiny_lora_model(lora_seed=rank)
        items = pricer_items(24)
    else:
        model = tiny_lora_model(dropout=0.1)
        items = pricer_items(20)
    try:
        result = train(model, CharTokenizer(), items, pricer_items(6, 100), config_for(args.out, args.ddp),
                       resume=args.mode == "resume")
    except TrainingInterrupted as e:
        print(f"{e}; resume with: {sys.executable} {sys.argv[0]} {args.out} resume", file=sys.stderr)
        sys.exit(e.exit_code)
    if rank == 0:
        save_adapter(model, os.path.join(args.out, "final"))
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"step": result.step, "train": result.train_losses, "val": result.val_losses}, f)


if __name__ == "__main__":
    main()
