"""The pricer's adapter, exported to GGUF, scored in llama.cpp beside ours on the same diamonds.

    python examples/llamacpp_pricer.py --adapter runs/pricer/adapter          # 200 diamonds, f32 and q8_0

Ours, twice: the NF4 base with the adapter (as it trained and as eval_pricer scores it), and the
adapter merged into the original weights in fp32 (what the GGUF holds). llama.cpp: the export of each
--type, and (for a GGUF base) the base file itself with the adapter's LoRA GGUF, each with the same
token ids in (BOS first), greedy, the answer decoded and read the same way. Needs llama.cpp's Python
binding (`make test` builds it). Prints a Markdown table and how many answers agree with ours merged.
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

from lora import export_gguf, export_gguf_adapter, load_adapter, merge_lora  # noqa: E402
from pricer import (PRESETS, answer_tokens, evaluate_prices, load_model, load_source, parse_price,  # noqa: E402
                    results_table, score, shuffled)
from export_gguf import base_model  # noqa: E402


def llama_cpp_prices(path: str, tokenizer, prompts: list[str], max_new_tokens: int, lora: str | None = None,
                     threads: int = 2) -> tuple[list[float], list[str]]:
    """Greedy answers of llama.cpp to the prompts, tokenized by us (BOS first, as the pricer does)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, lora_path=lora, n_ctx=256, n_threads=threads, verbose=False)
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
    return [parse_price(a) for a in answers], answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="the pricer's adapter folder, e.g. runs/pricer/adapter")
    p.add_argument("--model", help="the base model [the adapter's base_model_name_or_path, else the embedded SmolLM2]")
    p.add_argument("--n", type=int, default=200, help="held-out diamonds, eval_pricer's first N [200]")
    p.add_argument("--types", nargs="+", default=["f32", "q8_0"], help="GGUF types to score [f32 q8_0]")
    p.add_argument("--seed", type=int, default=42, help="the training run's --seed [42]")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp's threads [2]")
    args = p.parse_args(argv)
    model_path = base_model(args)
    description = PRESETS["demo"]["description"]

    rows, answers = [], {}
    for quant, name in (("nf4", "ours: NF4 base + adapter"), ("none", "ours: merged, fp32")):
        model, tokenizer, _ = load_model(model_path, quant, "cpu")
        load_adapter(model, args.adapter)
        if quant == "none":
            merge_lora(model)
        if not rows:
            loaded = load_source(None, tokenizer, description)
            items = shuffled(loaded.items, args.seed)[:args.n]
            max_new = answer_tokens(tokenizer, [item.price for item in loaded.items])
        t0 = time.perf_counter()
        rows.append((name, evaluate_prices(model, tokenizer, items, max_new, batch_size=100)))
        print(f"{name}: {rows[-1][1].hit_rate:.1f}% hits ({time.perf_counter() - t0:.0f}s)", flush=True)
        answers[name] = rows[-1][1].guesses
        del model
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(f"llama.cpp: GGUF {t}", export_gguf(model_path, args.adapter, os.path.join(tmp, f"{t}.gguf"), t), None)
                for t in args.types]
        if model_path.endswith(".gguf"):  # the base file itself, the adapter applied by llama.cpp's LoRA path
            lora = export_gguf_adapter(model_path, args.adapter, os.path.join(tmp, "lora.gguf"))
            runs.append((f"llama.cpp: {os.path.basename(model_path)} + LoRA GGUF", model_path, lora))
        for name, path, lora in runs:
            t0 = time.perf_counter()
            guesses, _ = llama_cpp_prices(path, tokenizer, [item.prompt for item in items], max_new, lora, args.threads)
            rows.append((name, score(guesses, [item.price for item in items])))
            answers[name] = guesses
            print(f"{name}: {rows[-1][1].hit_rate:.1f}% hits ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\n{len(items)} held-out diamonds, greedy\n" + results_table(rows))
    merged = answers["ours: merged, fp32"]
    for name, guesses in answers.items():
        same = sum(a == b for a, b in zip(guesses, merged))
        print(f"{name}: the same price as ours merged on {same} of {len(items)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
