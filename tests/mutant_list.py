"""The mutants of `tests/mutants.py`: each one feature the README claims, the smallest edit that switches
it off, and the tests that should notice. To add one: a `Mutant(name, file, old, new, tests)` record
below; `old` must occur exactly once in `file`."""
from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    name: str
    file: str            # relative to the repository root
    old: str             # must occur exactly once in the file
    new: str
    tests: tuple         # pytest arguments: files, and -k expressions


def k(file: str, expr: str) -> tuple:
    return (file, "-k", expr)


TRAIN, MODEL, LORA, QUANT, OPTIM = ("tests/test_train.py", "tests/test_model.py", "tests/test_lora.py",
                                    "tests/test_quant.py", "tests/test_optim.py")
FSDP, RELIABILITY, PRECISION, CLI = ("tests/test_fsdp.py", "tests/test_reliability.py", "tests/test_precision.py",
                                     "tests/test_cli.py")
LAB, PRICER = "tests/test_lab.py", "tests/test_pricer.py"
BACKWARD, FUSED, FAMILIES, DORA = ("tests/test_backward.py", "tests/test_lora_fused.py", "tests/test_families.py",
                                   "tests/test_dora.py")
CHAT, PACKING, FINETUNE = "tests/test_chat.py", "tests/test_packing.py", "tests/test_finetune.py"
EXPORT = "tests/test_export_gguf.py"


def case(test: str, param: str = "") -> str:
    """One test of the GGUF export file, by node id: `-k llama` would match every llama_cpp test."""
    return f"{EXPORT}::{test}" + (f"[{param}]" if param else "")


MUTANTS = [
    # ---------------------------------------------------------------- optimizers (train/optim.py)
    Mutant("adamw8bit is torch's AdamW", "train/optim.py",
           '"adamw8bit": bnb.optim.AdamW8bit,', '"adamw8bit": torch.optim.AdamW,', (OPTIM,)),
    Mutant("adamw8bit keeps 32-bit moments", "train/optim.py",
           '"adamw8bit": bnb.optim.AdamW8bit,', '"adamw8bit": bnb.optim.AdamW,', (OPTIM,)),
    Mutant("paged_adamw is not paged", "train/optim.py",
           '"paged_adamw": bnb.optim.PagedAdamW,', '"paged_adamw": bnb.optim.AdamW,', (OPTIM,)),
    Mutant("paged_adamw8bit is not paged", "train/optim.py",
           '"paged_adamw8bit": bnb.optim.PagedAdamW8bit}', '"paged_adamw8bit": bnb.optim.AdamW8bit}', (OPTIM,)),
    Mutant("adamw is torch's, not the written-out one", "train/optim.py",
           "        return AdamW(params, **kwargs)", "        return torch.optim.AdamW(params, **kwargs)", (OPTIM,)),
    Mutant("AdamW without weight decay", "train/optim.py",
           "w.mul_(1 - lr * decay)", "pass", (OPTIM,)),
    Mutant("AdamW without the first bias correction", "train/optim.py",
           "step_size = lr / (1 - beta1 ** t)", "step_size = lr", (OPTIM,)),
    Mutant("AdamW without the second bias correction", "train/optim.py",
           "denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)", "denom = v.sqrt().add_(eps)", (OPTIM,)),
    Mutant("AdamW's moments not restored on resume", "train/fsdp.py",
           '    optimizer.load_state_dict(state["optimizer"])', "    pass", k(TRAIN, "resumes")),
    # ---------------------------------------------------------------- memory and speed switches
    Mutant("gradient checkpointing does nothing", "model/llama.py",
           "self.model.gradient_checkpointing = enabled", "self.model.gradient_checkpointing = False",
           k(TRAIN, "checkpointing")),
    Mutant("train() ignores grad_checkpointing", "train/loop.py",
           "    if config.grad_checkpointing:", "    if False:", k(TRAIN, "checkpointing")),
    Mutant("compile_layers does nothing", "model/llama.py",
           "layer.compile(**compile_kwargs)", "pass", k(MODEL, "compiled")),
    Mutant("train() ignores compile", "train/loop.py",
           "    if config.compile:", "    if False:", k(TRAIN, "compile")),
    Mutant("autocast_dtype ignored", "train/validation.py",
           "    if dtype is None:\n        return nullcontext", "    if True:\n        return nullcontext",
           k(TRAIN, "bf16")),
    # ---------------------------------------------------------------- DDP and FSDP
    Mutant("torchrun ignored: each rank trains alone", "train/distributed.py",
           'if "RANK" not in os.environ or world_size <= 1:', "if True:", k(TRAIN, "gloo")),
    Mutant("DDP loss not scaled by world_size", "train/loop.py",
           "scale = ctx.world_size / n_items", "scale = 1 / n_items", k(TRAIN, "gloo")),
    Mutant("validation loss not summed over ranks", "train/distributed.py",
           "    if ctx.enabled:\n        t = t.clone()", "    if False:\n        t = t.clone()", k(TRAIN, "gloo")),
    Mutant("rank 0's LoRA weights not broadcast", "train/distributed.py",
           "dist.broadcast(p.data, src=0)", "pass", k(TRAIN, "gloo")),
    Mutant("parallel='fsdp' runs as DDP", "train/fsdp.py",
           "        return wrap_fsdp(loss_module, ctx)", "        return wrap_ddp(loss_module, ctx)",
           k(FSDP, "nf4_base_end_with")),
    # ---------------------------------------------------------------- preemption, checkpoints, fp16
    Mutant("a signal is not noticed", "train/signals.py",
           "        signum = self.signum or 0\n", "        signum = 0\n", k(RELIABILITY, "sigint_in_process")),
    Mutant("resume trusts a checkpoint that fails its manifest", "train/checkpoint.py",
           "        reason = verify_checkpoint(path)\n", "        reason = None\n", k(RELIABILITY, "falls_back")),
    Mutant("an overflowed fp16 step is taken", "train/precision.py",
           "        self.scaler.step(optimizer)\n", "        optimizer.step()\n", k(PRECISION, "overflow")),
    Mutant("a user error exits 1", "examples/cli.py",
           'print(f"error: {e}", file=sys.stderr)\n        return 2', 'print(f"error: {e}", file=sys.stderr)\n        return 1',
           (CLI, FINETUNE, "-k", "user_errors")),
    Mutant("eval_pricer ignores --description", "examples/eval_pricer.py",
           "load_source(args.data, tokenizer, args.description)", "load_source(args.data, tokenizer)",
           k(CLI, "describes_the_diamonds")),
    # ---------------------------------------------------------------- hand-written backward passes
    Mutant("RMSNorm's backward forgets the mean term", "model/backward.py",
           "dx = torch.addcmul(gw * r, xh, c, value=-1).to(x_hat.dtype)", "dx = (gw * r).to(x_hat.dtype)",
           k(BACKWARD, "rmsnorm_function")),
    Mutant("RMSNorm keeps an fp32 copy of x̂", "model/backward.py",
           "ctx.save_for_backward(x_hat, r, weight)", "ctx.save_for_backward(xf * r, r, weight)",
           k(BACKWARD, "normalised_input")),
    Mutant("RMSNorm's output carries no recipe", "model/backward.py",
           "return leave_recipe(y, torch.mul, weight, x_hat)", "return y", k(FUSED, "remade_not_kept")),
    Mutant("SwiGLU's output carries no recipe", "model/backward.py",
           "return leave_recipe(SwiGLUFunction.apply(g, u), silu_times, g, u)", "return SwiGLUFunction.apply(g, u)",
           k(FUSED, "remade_not_kept")),
    Mutant("RoPE's backward rotates by +sin", "model/backward.py",
           "dx = dy * cos - rotate_half(dy) * sin", "dx = dy * cos + rotate_half(dy) * sin",
           k(BACKWARD, "rope_function")),
    Mutant("SwiGLU's backward takes silu as linear", "model/backward.py",
           "dg = torch.ops.aten.silu_backward(dh * u, g)", "dg = dh * u", k(BACKWARD, "swiglu_function")),
    Mutant("the flag does not reach the modules", "model/llama.py",
           "                m.handwritten_backward = enabled", "                pass", k(BACKWARD, "one_flag")),
    Mutant("offload keeps each layer's input where it was", "model/llama.py",
           'enabled=self.gradient_checkpointing == "offload"', "enabled=False", k(BACKWARD, "checkpointed_layers")),
    Mutant("fused LoRA dropout's backward forgets the mask", "lora/fused.py",
           "dX.add_(redo_dropout(torch.mm(g.t(), A), keep.reshape(X.shape), p), alpha=s)", "dX.addmm_(g.t(), A, alpha=s)",
           k(FUSED, "equal_autograd")),
    Mutant("fused LoRA keeps its own copy of an input it could remake", "lora/fused.py",
           "remake, inputs = recipe(x)", "remake, inputs = None, (x,)", k(FUSED, "remade_not_kept")),
    Mutant("fused LoRA steps aside under the preset's autocast", "lora/fused.py",
           "if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:",
           "if torch.is_autocast_enabled(device):", k(FUSED, "preset_precision")),
    Mutant("decoded NF4 scales forget the mean", "quant/linear4bit.py",
           "        absmax += self.offset\n", "", k(QUANT, "decoded_scales")),
    # ---------------------------------------------------------------- families and DoRA
    Mutant("Gemma's (1 + w) norms lose the 1", "model/llama.py",
           "        self.offset = offset\n", "        self.offset = 0.0\n", k(FAMILIES, "padded_batches")),
    Mutant("sliding windows ignored", "model/config.py",
           "        if self.sliding_window is None:\n            return False", "        if True:\n            return False",
           k(FAMILIES, "padded_batches")),
    Mutant("DoRA without its magnitude", "lora/dora.py",
           "    scale = (getattr(layer, MAGNITUDE) / n).to(x.dtype)", "    scale = torch.ones_like(n).to(x.dtype)",
           k(DORA, "equals_peft")),
    # ---------------------------------------------------------------- the loss and the data
    # the same loss (F.cross_entropy ignores -100), but the head computes logits at every position
    Mutant("the head runs at every position", "train/loss.py",
           "    h = hidden[:, :-1][keep]                                   # (N, D): only the positions with a label\n"
           "    y = targets[keep]                                          # (N,)\n"
           "    n = y.numel()\n",
           "    h = hidden[:, :-1].flatten(0, 1)\n    y = targets.flatten()\n    n = int(keep.sum())\n",
           k(TRAIN, "head_runs")),
    Mutant("LinearCrossEntropy's gradient forgets the onehot", "train/loss.py",
           "] -= 1.0      # - onehot(y)", "] -= 0.0", k(TRAIN, "linear_cross_entropy")),
    Mutant("each micro-batch divided by its own tokens", "train/loop.py",
           "            (scaler.scale(loss) * scale).backward()",
           "            (scaler.scale(loss) * ctx.world_size / len(micro_batches)"
           " / int((batch['labels'][:, 1:] != -100).sum())).backward()", k(TRAIN, "accumulate")),
    Mutant("no EOS after the answer", "train/data.py",
           "if add_eos and tokenizer.eos_id is not None:", "if False:", k(TRAIN, "labels_mask")),
    Mutant("no length bucketing", "train/data.py",
           "    if not group_by_length:", "    if True:", k(TRAIN, "length_buckets")),
    Mutant("keep_last keeps everything", "train/checkpoint.py",
           "    for path in deleted:\n        shutil.rmtree(path)", "    for path in []:\n        shutil.rmtree(path)",
           k(TRAIN, "resumes")),
    Mutant("no warmup", "train/schedule.py",
           "        return base_lr * step / warmup_steps", "        return base_lr", k(TRAIN, "cosine")),
    # ---------------------------------------------------------------- packing: rows of whole examples, documents apart
    Mutant("the mask ignores the document boundaries", "model/attention.py",
           "    if documents is not None:  # block-diagonal", "    if False:  # block-diagonal", k(PACKING, "alone")),
    Mutant("the loss predicts across a document boundary", "train/loss.py",
           "        keep = keep & (position_ids[:, 1:] != 0)", "        pass", k(PACKING, "padded_step")),
    Mutant("position ids run on across a packed row", "train/packing.py",
           "            position_ids[r, t:t + n] = torch.arange(n)", "            position_ids[r, t:t + n] = torch.arange(t, t + n)",
           k(PACKING, "padded_step")),
    Mutant("best fit opens a row for every example", "train/packing.py",
           "        j = bisect.bisect_left(free, (n, -1))", "        j = len(free)", k(PACKING, "nearly_full")),
    Mutant("train() ignores packing", "train/plan.py",
           "        if c.packing:\n            rows = epoch_rows", "        if False:\n            rows = epoch_rows",
           k(PACKING, "plan")),
    # ---------------------------------------------------------------- LoRA and NF4
    Mutant("no dropout on the LoRA path", "lora/layer.py",
           "nn.Dropout(dropout) if dropout > 0 else nn.Identity()", "nn.Identity()", k(LORA, "dropout")),
    Mutant("rsLoRA scales by alpha / r", "lora/config.py",
           "return alpha / math.sqrt(r) if use_rslora else alpha / r", "return alpha / r", k(LORA, "peft_linear")),
    Mutant("Linear4bit drops its bias", "quant/linear4bit.py",
           "bias = None if self.bias is None else self.bias.to(dtype)", "bias = None", k(QUANT, "x_times")),
    # ---------------------------------------------------------------- the model
    Mutant("qwen2 GGUF rows permuted like llama's", "model/gguf.py",
           'permuted = arch in ("llama", "mistral")', "permuted = True", k(MODEL, "gguf_loads")),
    Mutant("head_dim read as hidden / heads", "model/config.py",
           'head_dim=d.get("head_dim"),', "head_dim=None,", k(MODEL, "padded_batches")),
    # ---------------------------------------------------------------- chat templates and tokenizers
    Mutant("chat template ignored: the contents joined plainly", "model/chat_template.py",
           "        return compiled.render(", "        return ''.join(m['content'] for m in messages)\n"
           "        return compiled.render(", k(CHAT, "template")),
    Mutant("templates rendered without trim_blocks and lstrip_blocks", "model/chat_template.py",
           "ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,", "ImmutableSandboxedEnvironment(",
           k(CHAT, "whitespace_control")),
    Mutant("sentencepiece cuts control tokens into pieces", "model/tokenizer.py",
           'self._split = re.compile("|".join(map(re.escape, added))) if added else None', "self._split = None",
           k(CHAT, "phi3")),
    Mutant("Llama 3 merges whole-word tokens anew", "model/gguf_vocab.py",
           "ignore_merges=pre in LLAMA3_PRES", "ignore_merges=False", k(CHAT, "llama_cpps_test_texts")),
    Mutant("Qwen2's digits split as GPT-2's", "model/gguf_vocab.py",
           '"qwen2": _QWEN2_SPLIT, ', "", k(CHAT, "llama_cpps_test_texts")),
    Mutant("the assistant mask labels everything", "train/chat.py",
           "    labels = [t if learnt(lo, hi) else IGNORE_INDEX for t, (lo, hi) in zip(ids, offsets)]",
           "    labels = list(ids)", (CHAT, "tests/test_properties.py", "-k", "labels or chat_example")),
    Mutant("no end-of-turn token learnt", "train/chat.py",
           "            turn_end += len(token)\n", "            break\n",
           (CHAT, "tests/test_properties.py", "-k", "labels or chat_example")),
    Mutant("Alpaca's input dropped", "train/jsonl.py", "        if extra.strip():", "        if False:",
           (CHAT, "tests/test_properties.py", "-k", "jsonl")),
    Mutant("overlong conversations kept whole", "train/jsonl.py",
           "        if max_len is not None and len(example.input_ids) > max_len:", "        if False:", k(CHAT, "overlong")),
    # ---------------------------------------------------------------- examples/finetune.py: one command, any chat data
    Mutant("finetune ignores --packing", "examples/finetune.py",
           "parallel=args.parallel, packing=args.packing)", "parallel=args.parallel, packing=False)", k(FINETUNE, "packing")),
    Mutant("finetune ignores --resume", "examples/finetune.py",
           "config, resume=args.resume)", "config, resume=False)", k(FINETUNE, "resumes")),
    Mutant("replies not through the chat template", "examples/pricer/predict.py",
           "ids = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True) for c in conversations]",
           "ids = [tokenizer.encode(c[-1]['content'], bos=True) for c in conversations]", k(FINETUNE, "replies")),
    Mutant("replies without the assistant's header", "examples/pricer/predict.py",
           "add_generation_prompt=True) for c in conversations]", "add_generation_prompt=False) for c in conversations]",
           k(FINETUNE, "replies")),
    Mutant("a reply runs past its end of turn", "examples/pricer/predict.py",
           "texts += [tokenizer.decode(_until(row, stop)) for row in new]",
           "texts += [tokenizer.decode(row) for row in new]", k(FINETUNE, "replies")),
    Mutant("sampling is greedy", "model/generate.py",
           "    probs = torch.softmax(logits.float() / temperature, dim=-1)",
           "    return logits.argmax(-1)", k(MODEL, "sampling")),
    Mutant("the top-k candidates' cached prompt is run again", "model/generate.py",
           "start = cached if step == 0 else T + step - 1", "start = 0 if step == 0 else T + step - 1",
           k(MODEL, "prefilled")),
    Mutant("the shared question's keys and values are not copied to each row", "model/generate.py",
           "c.update(0, o.k.expand(B, -1, -1, -1), o.v.expand(B, -1, -1, -1))",
           "c.update(0, 0 * o.k.expand(B, -1, -1, -1), 0 * o.v.expand(B, -1, -1, -1))", k(MODEL, "shared_prefix")),
    Mutant("the pricer's scoring runs every prompt whole", "model/generate.py",
           "if not share or P < 2", "if True or P < 2", k(PRICER, "question_once")),
    Mutant("greedy from the one pass is another candidate's", "examples/pricer/predict.py",
           "_until([int(top_id[b, 0])] + tokens[b * k], stop)", "_until([int(top_id[b, 1])] + tokens[b * k + 1], stop)",
           k(PRICER, "one_pass")),
    Mutant("top_p ignored", "model/generate.py",
           "sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)", "sorted_p = sorted_p", k(MODEL, "sampling")),
    # ---------------------------------------------------------------- the lab (examples/lab*.py)
    Mutant("the lab runs stored runs again", "examples/labruns.py",
           "done = {s.key: r for s in unique if (r := load_result(s, out)) is not None}", "done = {}",
           k(LAB, "stored_runs")),
    Mutant("the lab's seed does not reach the split", "examples/labruns.py",
           'split = split_items(items, spec.seed, s["test_size"]', 'split = split_items(items, 0, s["test_size"]',
           k(LAB, "two_processes")),
    Mutant("load_pretrained ignores double_quant=False", "model/load.py",
           "quant_type=quant, double_quant=double_quant,", "quant_type=quant, double_quant=True,", k(LAB, "qlora")),
    Mutant("the nf4 experiment leaves the decoded scales out of the bits held", "examples/nf4lab.py",
           "n_bytes += layer.quantized_nbytes() + (0 if decoded is None else decoded.numel() * decoded.element_size())",
           "n_bytes += layer.quantized_nbytes()", k(LAB, "nf4")),
    # ---------------------------------------------------------------- GGUF export
    Mutant("GGUF export keeps HF's q/k row order", "model/gguf_write.py",
           'PERMUTED = ("llama",)', "PERMUTED = ()",
           (case("test_llama_cpp_computes_the_merged_models_logits", "llama"),)),
    Mutant("GGUF export writes no tokenizer", "lora/gguf_export.py",
           "metadata += gguf_write_vocab.tokenizer_metadata(checkpoint, tok, config.vocab_size)", "metadata += []",
           (case("test_llama_cpp_splits_text_as_we_do_and_keeps_the_chat_template", "qwen2"),)),
    Mutant("GGUF export names no pre-tokenizer", "model/gguf_write_vocab.py",
           '("tokenizer.ggml.pre", pre, "STRING"),', "",
           (case("test_llama_cpp_splits_text_as_we_do_and_keeps_the_chat_template", "qwen2"),)),
    Mutant("GGUF export drops the chat template", "model/gguf_write_vocab.py",
           'entries.append(("tokenizer.chat_template", tok.chat_template, "STRING"))', "pass",
           (case("test_llama_cpp_splits_text_as_we_do_and_keeps_the_chat_template", "qwen2"),)),
    Mutant("GGUF export stores Gemma's norms as w, not 1 + w", "model/gguf_write.py",
           'NORM_PLUS_ONE = ("gemma2", "gemma3")', "NORM_PLUS_ONE = ()",
           (case("test_llama_cpp_computes_the_merged_models_logits", "gemma3"),)),
    Mutant("GGUF LoRA keeps B's rows in HF order", "lora/gguf_export.py",
           "pairs += [A[name], gguf_write.to_gguf_layout(name, B[name], config)]", "pairs += [A[name], B[name]]",
           (case("test_llama_cpp_lora_moves_the_base_as_our_adapter_does"),)),
    Mutant("GGUF LoRA alpha ignores rsLoRA", "lora/gguf_export.py",
           '("adapter.lora.alpha", scaling * r, "FLOAT32")', '("adapter.lora.alpha", float(r), "FLOAT32")',
           (case("test_llama_cpp_lora_moves_the_base_as_our_adapter_does"),)),
    Mutant("a failed GGUF write leaves its temporary file", "lora/gguf_export.py",
           "        if os.path.exists(tmp):\n            os.remove(tmp)", "        pass",
           (case("test_a_write_that_fails_midway_leaves_nothing_behind"),)),
]
