"""Export a fine-tuned model as one GGUF file, to run in llama.cpp, Ollama or LM Studio.

    python examples/export_gguf.py --adapter runs/pricer/adapter --out pricer.gguf --type q8_0
    python examples/export_gguf.py --adapter runs/pricer/adapter --out pricer-lora.gguf --adapter-only

The adapter is merged into the weights it was trained against (an NF4-trained adapter into the NF4
copy of the base, dequantized: the file answers as the model that was evaluated; --merge-into original
for W0 + s·BA) and written with the architecture's metadata, the tokenizer and its chat template;
beside it an Ollama Modelfile that points at the file and stops at the template's end of turn.
--type q4_k_m, q5_k_m or q6_k: llama.cpp's own quantizer makes it from the f16 file (llama-cpp-python),
or the command prints the `llama-quantize` line to run on the f16 file it wrote. --adapter-only writes the adapter alone, llama.cpp's LoRA
GGUF, to run over the unchanged base GGUF with `--lora`. Prints the commands that run the result.
A mistake in the flags or files prints `error: <message>` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the library (model, lora) and the pricer package

from cli import run_command  # noqa: E402
from lora import (GGUF_TYPES, MERGE_INTO, LlamaQuantizerMissing, export_gguf, export_gguf_adapter,  # noqa: E402
                  recorded_checkpoint)
from model import default_checkpoint, end_of_turn_ids, load_tokenizer  # noqa: E402
from pricer import describe_four_cs, make_prompt  # noqa: E402

EXAMPLE = make_prompt(describe_four_cs({"carat": "1.01", "cut": "Ideal", "color": "G", "clarity": "VS1"}))
# the ChatML turns of SmolLM2 (and Qwen) in Ollama's template language, which is Go's, not Jinja
CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a PEFT-layout adapter folder, e.g. runs/pricer/adapter")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--model", help="the base model: HF checkpoint folder or .gguf file [the checkpoint the adapter "
                                   "recorded, when it exists here, else the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--type", choices=GGUF_TYPES, default="f16",
                   help="of the weights: f32, f16, bf16 (2 bytes), q8_0 (8.5 bits), q4_0 (4.5 bits); q4_k_m, q5_k_m, "
                        "q6_k by llama.cpp's quantizer [f16]")
    p.add_argument("--merge-into", choices=MERGE_INTO, default="trained",
                   help="trained: the weights training saw (the NF4 copy of a QLoRA base), so the file answers as "
                        "the trained model; original: W0 + s·BA [trained]")
    p.add_argument("--allow-other-checkpoint", action="store_true",
                   help="merge into --model even when it is not the checkpoint the adapter recorded")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone as llama.cpp's LoRA GGUF (f32), not the merged model")
    return p.parse_args(argv)


def ollama_modelfile(gguf_path: str) -> str:
    """An Ollama Modelfile beside the GGUF: FROM the file, the chat template in Ollama's syntax where it
    is ChatML (otherwise Ollama reads `tokenizer.chat_template` from the GGUF itself), and a stop at
    every token that ends a turn in the template, EOS included (Llama 3's <|eot_id|> and <|end_of_text|>)."""
    tok = load_tokenizer(gguf_path)
    lines = [f"FROM ./{os.path.basename(gguf_path)}"]
    if "<|im_start|>" in (tok.chat_template or ""):
        lines.append(f'TEMPLATE """{CHATML}"""')
    lines += [f"PARAMETER stop {json.dumps(tok.decode([i]))}" for i in end_of_turn_ids(tok)]
    return "\n".join(lines + ["PARAMETER temperature 0", ""])


def pricer_prompt(tok) -> str:
    """A pricer prompt with BOS first, as the pricer trained (llama.cpp and Ollama's raw mode read special
    tokens in a prompt); `completion_flags` escapes its newlines and quotes it for the shell."""
    bos = "" if tok.bos_id is None else tok.decode([tok.bos_id])
    return bos + EXAMPLE


def how_to_run(gguf: str, modelfile: str, tok) -> str:
    """The commands that run a merged export: llama.cpp on a pricer prompt and in a chat, and Ollama."""
    name = os.path.splitext(os.path.basename(gguf))[0]
    raw = json.dumps({"model": name, "prompt": pricer_prompt(tok), "raw": True, "stream": False,
                      "options": {"temperature": 0, "num_predict": 8}})
    return (f"  llama-completion -m {shlex.quote(gguf)} {completion_flags(tok)}\n"
            f"  llama-cli -m {shlex.quote(gguf)}     # a chat, in the model's own chat template\n"
            f"  ollama create {name} -f {shlex.quote(modelfile)} && ollama run {name}\n"
            f"  curl http://localhost:11434/api/generate -d {shlex.quote(raw)}   # the pricer's prompt, raw")


def completion_flags(tok) -> str:
    """llama-completion's flags for one greedy pricer answer (llama.cpp turns \\n in -p into newlines)."""
    return f"-no-cnv --temp 0 -n 8 -p {shlex.quote(pricer_prompt(tok).replace(chr(10), chr(92) + 'n'))}"


def main(argv: list[str] | None = None) -> int:
    """Run the script; user errors (bad flags, missing or broken files) become one line and status 2
    (examples/cli.py)."""
    return run_command(run, parse_args(argv), __file__, argv)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = args.model or recorded_checkpoint(args.adapter) or default_checkpoint()
    tok = load_tokenizer(model)
    out = args.out
    if args.adapter_only:
        export_gguf_adapter(model, args.adapter, args.out, args.allow_other_checkpoint)
        print(f"wrote {out}: the adapter {args.adapter} alone, llama.cpp's LoRA GGUF "
              f"({os.path.getsize(args.out) / 1e6:.1f} MB, {time.perf_counter() - t0:.0f}s)")
        base = model if model.endswith(".gguf") else "<the base model>.gguf"
        print(f"\nRun it over the base model in llama.cpp:\n"
              f"  llama-completion -m {shlex.quote(base)} --lora {shlex.quote(out)} {completion_flags(tok)}")
        return 0
    try:
        export_gguf(model, args.adapter, args.out, args.type, args.merge_into, args.allow_other_checkpoint)
    except LlamaQuantizerMissing as e:  # the f16 file is written: llama.cpp's own tool makes the k-quant
        print(f"wrote {e.f16_path} (f16). {args.type} is made by llama.cpp's quantizer; llama-cpp-python is not "
              f"installed here, so run:\n  {e.command}")
        return 0
    modelfile = os.path.splitext(out)[0] + ".Modelfile"
    with open(modelfile + ".tmp", "w") as f:
        f.write(ollama_modelfile(args.out))
    os.replace(modelfile + ".tmp", modelfile)
    print(f"wrote {out}: {os.path.basename(os.path.normpath(model))} + {args.adapter}, merged into the "
          f"{args.merge_into} weights, {args.type} "
          f"({os.path.getsize(args.out) / 1e6:.1f} MB, {time.perf_counter() - t0:.0f}s), and {modelfile}")
    print("\nRun it in llama.cpp (a prompt as the pricer writes it, greedy) or Ollama:\n"
          + how_to_run(out, modelfile, tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
