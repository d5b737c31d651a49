"""The pricer's adapters exported and scored beside ours on their own held-out diamonds: what a user
takes away against what they trained.

    python examples/llamacpp_pricer.py --adapter runs/pricer/adapter                 # the demo's adapter
    python examples/llamacpp_pricer.py --adapter runs/s0/adapter runs/s1/adapter runs/s2/adapter

For each adapter, greedy on the first --n diamonds of its recorded split (never trained on):
  - ours as trained: the NF4 base + the adapter, as the training script scores it;
  - the trained merge (`export_merged`, into the weights training saw) read back by our loader;
  - llama.cpp on the trained merge's GGUF of each --types (f16 and q8_0 written here, q4_k_m by
    llama.cpp's own quantizer), and on the merge into the original weights at f16, as exports were.
Every engine gets the same token ids (BOS first, as the pricer trained) and its answer is read the same
way. Prints one table per adapter, then the mean (range) over the adapters and each row's distance
from ours as trained. Needs llama.cpp's Python binding (`make test` builds it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora) and the pricer package

from cli import run_command  # noqa: E402
from lora import export_gguf, export_merged, load_adapter, read_trained_on, recorded_checkpoint  # noqa: E402
from model import default_checkpoint  # noqa: E402
from pricer import (answer_tokens, evaluate_prices, held_out, load_model, load_source, parse_price,  # noqa: E402
                    results_table, score)

AS_TRAINED = "ours: NF4 base + adapter, as trained"


def llama_cpp_prices(path: str, tokenizer, prompts: list[str], max_new_tokens: int, threads: int = 1) -> list[float]:
    """Greedy answers of llama.cpp to the prompts, tokenized by us (BOS first, as the pricer does)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    answers = []
    for prompt in prompts:
        llm.reset()
        llm.eval(tokenizer.encode(prompt, bos=True))
        new = []
        for _ in range(max_new_tokens):  # the logits of the last position only: llama.cpp computes no others
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(np.argmax(logits))
            if token == tokenizer.eos_id:
                break
            new.append(token)
            llm.eval([token])
        answers.append(tokenizer.decode(new))
    llm.close()
    return [parse_price(a) for a in answers]


def score_adapter(adapter: str, n: int, types: list[str], threads: int, tmp: str) -> list[tuple[str, object, float]]:
    """[(row name, PriceReport, seconds)] for one adapter, ours as trained first."""
    record = read_trained_on(adapter) or {}
    checkpoint = recorded_checkpoint(adapter) or default_checkpoint()
    base = record.get("base") or {"quant": "nf4"}
    model, tokenizer, _ = load_model(checkpoint, base["quant"], "cpu", double_quant=base.get("double_quant", True))
    load_adapter(model, adapter)
    split = record.get("split")
    loaded = load_source(None if split is None else split["data"], tokenizer,
                         "four-cs" if split is None else split["description"])
    items, _ = held_out(loaded.items, n, None, split, adapter)
    truths, prompts = [i.price for i in items], [i.prompt for i in items]
    max_new = answer_tokens(tokenizer, [item.price for item in loaded.items])
    rows = []

    def timed(name: str, run) -> None:
        t0 = time.perf_counter()
        report = run()
        rows.append((name, report, time.perf_counter() - t0))
        print(f"  {name}: {report.hit_rate:.1f}% hits, ${report.mean_error:,.0f} ({rows[-1][2]:.0f}s)", flush=True)

    timed(AS_TRAINED, lambda: evaluate_prices(model, tokenizer, items, max_new, batch_size=100))
    merged = export_merged(checkpoint, adapter, os.path.join(tmp, "merged"))
    del model
    merged_model, _, _ = load_model(merged, "none", "cpu")
    timed("ours: trained merge, HF folder (fp32)", lambda: evaluate_prices(merged_model, tokenizer, items, max_new,
                                                                             batch_size=100))
    del merged_model
    ggufs = [(f"llama.cpp: trained merge, {t}", t, "trained") for t in types] + [
        ("llama.cpp: original merge, f16", "f16", "original")]
    for name, out_type, into in ggufs:
        path = export_gguf(checkpoint, adapter, os.path.join(tmp, f"{into}-{out_type}.gguf"), out_type, merge_into=into)
        timed(name, lambda: score(llama_cpp_prices(path, tokenizer, prompts, max_new, threads), truths))
        os.remove(path)
    return rows


def summary(per_adapter: list[list[tuple[str, object, float]]]) -> str:
    """Markdown: each row's mean (range) hits and mean error over the adapters, and its distance from ours
    as trained (mean, and the largest over the adapters)."""
    lines = ["| model | hits: mean (range) | mean error | hits − as trained: mean | largest |",
             "| --- | ---: | ---: | ---: | ---: |"]
    trained = [rows[0][1].hit_rate for rows in per_adapter]
    for i, (name, _, _) in enumerate(per_adapter[0]):
        hits = [rows[i][1].hit_rate for rows in per_adapter]
        errors = [rows[i][1].mean_error for rows in per_adapter]
        gaps = [h - t for h, t in zip(hits, trained)]
        worst = max(gaps, key=abs)
        lines.append(f"| {name} | {np.mean(hits):.1f}% ({min(hits):.1f}–{max(hits):.1f}%) | ${np.mean(errors):,.0f} "
                     f"| {np.mean(gaps):+.1f} | {worst:+.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", nargs="+", required=True, help="the pricer's adapter folders, e.g. runs/pricer/adapter")
    p.add_argument("--n", type=int, default=200, help="held-out diamonds of each adapter's split [200]")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"],
                   help="GGUF types of the trained merge to score in llama.cpp [f16 q8_0 q4_k_m]")
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp's threads [1: more spin on a busy machine, and each prompt is small]")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    per_adapter = []
    for adapter in args.adapter:
        print(f"{adapter}:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            per_adapter.append(score_adapter(adapter, args.n, args.types, args.threads, tmp))
        rows = per_adapter[-1]
        print(f"\n{adapter}: {len(rows[0][1].truths)} held-out diamonds, greedy\n"
              + results_table([(name, report) for name, report, _ in rows]) + "\n", flush=True)
    print(f"{len(per_adapter)} adapters, {args.n} held-out diamonds each, greedy\n" + summary(per_adapter))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv), __file__, argv)


if __name__ == "__main__":
    sys.exit(main())
