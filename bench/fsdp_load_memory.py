"""Per-process memory of loading the base for FSDP: one process (`load_pretrained`) against N (`load_sharded`).

Each side runs in fresh processes (the N-process side under torchrun). Figures per process:
  * base bytes held: the frozen tensors this process keeps (its shards: packed NF4, absmax, norms,
    embeddings; LoRA excluded), counted exactly from the tensors;
  * peak RSS above baseline (VmHWM minus VmRSS before loading): everything resident, also the
    pages of a memory-mapped safetensors file that a tensor still points into;
  * peak anonymous memory above baseline while loading (RssAnon sampled every 2 ms, see
    bench/load_memory.py), which also counts the full tensor being read and quantized, the process
    group and FSDP's bookkeeping. The tokenizer is not loaded on either side: SmolLM2's
    tokenizer.json alone takes about 40 MiB of Python objects, as much as the model's shards.

    python bench/fsdp_load_memory.py                          # SmolLM2-135M (the default checkpoint), 2 processes
    python bench/fsdp_load_memory.py --hf                     # the same weights as an HF folder (bf16 safetensors)
    python bench/fsdp_load_memory.py --path CHECKPOINT --nproc 4 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import status_kb  # noqa: E402
from load_memory import AnonPeak  # noqa: E402

LORA = dict(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0)


def base_bytes(model) -> int:
    """Bytes this process holds of the frozen tensors (local shards of sharded ones)."""
    from train.fsdp import local_nbytes

    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return sum(local_nbytes(t) for t in frozen)


def probe(path: str, dtype: str, sharded: bool) -> None:
    import torch

    torch.set_num_threads(1)
    import model.load
    import train.sharded_load
    from lora import LoRAConfig, apply_lora
    from model import load_pretrained
    from train.sharded_load import load_sharded

    model.load.load_tokenizer = train.sharded_load.load_tokenizer = lambda path: None  # weights only

    dt = getattr(torch, dtype)
    baseline, baseline_rss = status_kb("RssAnon"), status_kb("VmRSS")
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        if sharded:
            llama, _ = load_sharded(path, LoRAConfig(**LORA), quant="nf4", dtype=dt)
        else:
            llama, _ = load_pretrained(path, dtype=dt, quant="nf4")
            apply_lora(llama, LoRAConfig(**LORA))
    print("RESULT " + json.dumps(dict(rank=int(os.environ.get("RANK", "0")), base_bytes=base_bytes(llama),
                                      peak_anon_kib=anon.peak - baseline,
                                      peak_rss_kib=status_kb("VmHWM") - baseline_rss, seconds=time.perf_counter() - t0)),
          flush=True)


def run(argv: list[str], nproc: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + [os.path.abspath(__file__), *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"probe failed:\n{done.stderr[-3000:]}")
    return sorted((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="HF folder or .gguf [model.default_checkpoint(): SmolLM2-135M]")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf", action="store_true", help="write the GGUF's weights to a temporary HF folder and load that: "
                    "load_sharded reads the rows of each tensor that is not quantized from safetensors files")
    ap.add_argument("--probe", choices=("one", "sharded"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path is None:
        from model import default_checkpoint

        args.path = default_checkpoint()
    if args.probe:
        return probe(args.path, args.dtype, args.probe == "sharded")
    if args.hf:
        import tempfile

        from load_memory import write_hf_folder

        with tempfile.TemporaryDirectory() as folder:
            write_hf_folder(args.path, folder)
            return report(folder, args)
    report(args.path, args)


def report(path: str, args) -> None:
    args.path = path
    common = ["--path", args.path, "--dtype", args.dtype]
    one = run(common + ["--probe", "one"], 1)[0]
    many = run(common + ["--probe", "sharded"], args.nproc)
    mib = lambda b: b / 2**20  # noqa: E731
    source = "SmolLM2-135M written as an HF folder" if args.hf else args.path
    print(f"{source}, NF4 base in {args.dtype}, LoRA r={LORA['r']} on q,k,v,o; "
          f"per process, 1 against {args.nproc} processes\n")
    print("| run | rank | base bytes held MiB | peak RSS above baseline MiB | peak anonymous above baseline MiB "
          "| load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in (("1 process, load_pretrained", [one]), (f"{args.nproc} processes, load_sharded", many)):
        for r in rows:
            print(f"| {name} | {r['rank']} | {mib(r['base_bytes']):.1f} | {r['peak_rss_kib'] / 1024:.1f} "
                  f"| {r['peak_anon_kib'] / 1024:.1f} "
                  f"| {r['seconds']:.1f} |")
    held = max(r["base_bytes"] for r in many) / one["base_bytes"]
    peak = max(r["peak_anon_kib"] for r in many) / one["peak_anon_kib"]
    rss = max(r["peak_rss_kib"] for r in many) / one["peak_rss_kib"]
    print(f"\nlargest process / single process: base bytes held {held:.1%}, peak RSS {rss:.1%}, "
          f"peak anonymous memory {peak:.1%} "
          f"(target <= 60%: {'met' if held <= 0.6 else 'missed'} for the base held)")


if __name__ == "__main__":
    main()
