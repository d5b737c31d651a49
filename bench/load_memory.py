"""Peak resident memory of `load_pretrained` with quant=None against quant="nf4", in one run.

With quant="nf4" each linear weight is quantized as its tensor is read, so the full-precision
model never exists: peak memory should stay near the NF4 model plus one tensor. Each load runs in
a fresh subprocess (a "probe"), so neither side inherits the other's pages or allocator caches.

Two checkpoints are measured by default, both loaded with load_pretrained's default dtype (fp32):
the SmolLM2-135M-Instruct GGUF as shipped, and the same weights written once to a temporary HF
folder (config.json + model.safetensors in bf16), the layout a large 16-bit model comes in. The
GGUF reader dequantizes whole tensors with numpy first, which costs the same transient memory on
both sides; the safetensors reader hands over one tensor at a time. Each is measured under glibc's
default allocator settings and with MALLOC_MMAP_THRESHOLD_ fixed (see ALLOCATORS below).

Figures per side, read from /proc/self/status:
  * raw peak: VmHWM, the process's high-water mark of resident memory, interpreter and torch included;
  * peak RSS above baseline: VmHWM minus VmRSS measured after the imports and before the load;
  * peak anonymous above baseline: RssAnon sampled every 2 ms during the load, minus its baseline.
    VmHWM also counts file pages of a memory-mapped checkpoint, which the kernel can drop at any
    time; anonymous memory is what the process really holds. For a model as small as SmolLM2-135M
    the Python + torch baseline is a large share of the raw peak, so the ratio against the target
    (NF4 <= 60% of the other) is taken on this figure. All three ratios are printed.

    python bench/load_memory.py                     # SmolLM2-135M as GGUF and as an HF folder, none vs nf4
    python bench/load_memory.py --path CHECKPOINT --dtype bfloat16 --quant none nf4 fp4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone

from common import emit_probe_result, run_probe, smollm2_gguf
from common import status_kb as status_kib


class AnonPeak:
    """Samples RssAnon (heap and anonymous mappings: memory the process really holds) every `interval`
    seconds in a thread and keeps the peak. The kernel keeps no high-water mark of it; VmHWM also counts
    file pages of a memory-mapped checkpoint, which the kernel can drop and re-read at any time."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.peak, self.interval = status_kib("RssAnon"), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))


def probe(path: str, quant: str, dtype: str, threads: int) -> None:
    """Child process: import, note the baseline, load once, print the figures as one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from model import load_pretrained
    import quant as _quant  # noqa: F401  (imported before the baseline, as the loader would import it)

    baseline, baseline_anon = status_kib("VmRSS"), status_kib("RssAnon")
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        model, _ = load_pretrained(path, dtype=getattr(torch, dtype), quant=None if quant == "none" else quant)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    tensors = list(model.parameters()) + list(model.buffers())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    emit_probe_result(dict(quant=quant, baseline_kib=baseline, peak_kib=peak, baseline_anon_kib=baseline_anon,
                           peak_anon_kib=anon.peak, model_bytes=model_bytes, seconds=seconds))


ALLOCATORS = {
    "glibc default": {},
    # glibc raises its mmap threshold after a large block is freed, so later large temporaries come
    # from the heap and pin it between the small tensors kept from each layer; a fixed threshold
    # returns every large temporary to the OS at once.
    "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def load_probe(path: str, quant: str, dtype: str, threads: int, env: dict[str, str]) -> dict:
    """One load in a fresh process (with `env` added to its environment); its figures."""
    argv = ["--probe", quant, "--path", path, "--dtype", dtype, "--threads", str(threads)]
    return run_probe(os.path.abspath(__file__), argv, env=env)


def write_hf_folder(gguf: str, folder: str) -> None:
    """Write the GGUF's weights as an HF folder: config.json, model.safetensors (bf16), tokenizer."""
    import torch
    from safetensors.torch import save_file

    from model import load_pretrained

    model, tok = load_pretrained(gguf, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the head is the embedding
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)
    tok.save_pretrained(folder)


def report(title: str, results: list[dict]) -> None:
    mib = lambda kib: kib / 1024  # noqa: E731
    print(f"\n## {title}")
    print("| quant | baseline RSS MiB | peak RSS (VmHWM) MiB | peak RSS above baseline MiB "
          "| peak anonymous above baseline MiB | model tensors MiB | load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['quant']} | {mib(r['baseline_kib']):.0f} | {mib(r['peak_kib']):.0f} "
              f"| {mib(r['peak_kib'] - r['baseline_kib']):.0f} | {mib(r['peak_anon_kib'] - r['baseline_anon_kib']):.0f} "
              f"| {r['model_bytes'] / 2**20:.0f} | {r['seconds']:.1f} |")
    ref = results[0]
    for r in results[1:]:
        raw = r["peak_kib"] / ref["peak_kib"]
        above = (r["peak_kib"] - r["baseline_kib"]) / (ref["peak_kib"] - ref["baseline_kib"])
        anon = (r["peak_anon_kib"] - r["baseline_anon_kib"]) / (ref["peak_anon_kib"] - ref["baseline_anon_kib"])
        verdict = "meets" if anon <= 0.60 else "misses"
        print(f"\n{r['quant']} / {ref['quant']}: peak anonymous memory above baseline {anon:.1%} ({verdict} the 60% "
              f"target); peak RSS above baseline {above:.1%}; raw peak RSS {raw:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None,
                        help="HF folder or .gguf to measure (default: SmolLM2-135M as GGUF and as an HF folder)")
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"], choices=["none", "nf4", "fp4"],
                        help="loads to compare; the first is the reference of the ratios (default: none nf4)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="load_pretrained's dtype for the unquantized parameters (default: float32, its default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each probe (default: 2)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.path, args.probe, args.dtype, args.threads)
        return

    import bitsandbytes
    import torch

    print(f"# load_pretrained peak memory, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}; dtype {args.dtype}")
    with tempfile.TemporaryDirectory(prefix="smollm2-hf-") as folder:
        if args.path:
            sources = {args.path: args.path}
        else:
            gguf = smollm2_gguf()
            write_hf_folder(gguf, folder)
            sources = {f"{os.path.basename(gguf)} (GGUF)": gguf,
                       "the same weights as an HF folder (model.safetensors in bf16)": folder}
        for title, path in sources.items():
            for allocator, env in ALLOCATORS.items():
                results = [load_probe(path, q, args.dtype, args.threads, env) for q in args.quant]
                report(f"{title}, allocator: {allocator}", results)


if __name__ == "__main__":
    main()
