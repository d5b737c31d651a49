"""What does a DPO step keep for its backward pass? Ours against our SFT step and against TRL's DPO step.

A DPO step on B pairs runs the policy over 2B rows (each prompt with its chosen and its rejected
completion); the reference costs nothing here (its log-probabilities were computed once, before
training). So its saved-for-backward bytes should be those of an SFT step on the same 2B rows, the
completions labelled: the target is at most 1.05 times. TRL's `DPOTrainer` with PEFT (TRL 1.16: its
fused head, the reference recomputed each step under no_grad with the adapter switched off) on the
same weights, adapter and batch is the other comparison.

Bytes saved for backward: every tensor autograd keeps passes through `saved_tensors_hooks`; each
storage is counted once (bench/lean.py `count_saved`); the model's own weights (in memory anyway) apart.
The model: SmolLM2-135M's shape (hidden 576, 9 heads, 3 key/value heads, MLP 1536, vocabulary 49,152)
with fewer layers, random fp32 weights, LoRA r 8 on every projection, seeded.

    python bench/preference_memory.py                      # 4 pairs, prompts of 48 tokens, completions of 8
    python bench/preference_memory.py --pairs 8 --completion 32 --layers 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import header, table
from lean import Counts, count_saved

from lora import LoRAConfig, apply_lora, lora_state_dict
from model import Llama, LlamaConfig
from train import DPO, Example, PreferencePair, collate, preference_batch
from train.loss import AnswerLossModule

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_shape(layers: int) -> dict:
    return dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)


def random_pairs(n: int, prompt: int, completion: int, vocab: int, seed: int) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [PreferencePair([1] + ids(prompt - 1), ids(completion - 1) + [2], ids(completion - 1) + [2])
            for _ in range(n)]


def saved_bytes(model, step) -> Counts:
    """The bytes one forward + loss + backward keeps, the model's weights apart."""
    counts = Counts()
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    with count_saved(counts, None, weights):
        step().backward()
    model.zero_grad(set_to_none=True)
    return counts


def ours(model, pairs) -> tuple[Counts, Counts]:
    """(SFT step on the 2B rows, DPO step on the B pairs)."""
    rows = [Example(p.prompt_ids + c, [-100] * len(p.prompt_ids) + c) for p in pairs
            for c in (p.chosen_ids, p.rejected_ids)]
    batch = collate(rows, 0)
    sft = AnswerLossModule(model)
    sft_counts = saved_bytes(model, lambda: sft(batch["input_ids"], batch["labels"]))
    dpo_batch = preference_batch(pairs, 0)
    dpo_batch["ref_logps"] = torch.zeros(2 * len(pairs))      # computed once before training: no graph here
    loss = DPO(beta=0.1).loss_module(model)
    return sft_counts, saved_bytes(model, lambda: loss(**dpo_batch))


def trl_tokenizer(folder: str):
    """A minimal tokenizer for DPOTrainer's bookkeeping (pad and EOS ids); the batch is ours."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"abcdefghij "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def theirs(model, cfg: dict, pairs, r: int) -> Counts:
    """TRL's DPOTrainer with PEFT on our weights and adapter: its collator and compute_loss on our pairs."""
    import peft
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    hf.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k},
                       strict=False)
    folder = tempfile.mkdtemp(prefix="preference-memory-")
    args = DPOConfig(output_dir=os.path.join(folder, "out"), per_device_train_batch_size=len(pairs), report_to=[],
                     use_cpu=True, bf16=False, max_length=None, precompute_ref_log_probs=False, beta=0.1)
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    rows = [{"prompt": "a b", "chosen": "c", "rejected": "d"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=trl_tokenizer(folder), peft_config=lora)
    peft.set_peft_model_state_dict(trainer.model, lora_state_dict(model))
    twin = trainer.model.train()
    batch = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                    "rejected_ids": p.rejected_ids} for p in pairs])
    return saved_bytes(twin, lambda: trainer.compute_loss(twin, batch))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="B: pairs in the step (2B rows) [4]")
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens [48]")
    p.add_argument("--completion", type=int, default=8, help="tokens of each completion [8]")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model [4]")
    p.add_argument("--r", type=int, default=8, help="LoRA rank [8]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trl", action="store_true", help="leave TRL's side out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = smollm2_shape(args.layers)
    torch.manual_seed(args.seed)
    model = Llama(LlamaConfig.from_hf(cfg))
    apply_lora(model, LoRAConfig(r=args.r, alpha=2 * args.r, dropout=0.0, target_modules=TARGETS, seed=args.seed))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "lora_B" in name:
                t.normal_(0, 0.01)
    pairs = random_pairs(args.pairs, args.prompt, args.completion, cfg["vocab_size"], args.seed)
    sft, dpo = ours(model, pairs)
    sides = {"ours, SFT step on the 2B rows": sft, "ours, DPO step on the B pairs": dpo}
    if not args.no_trl:
        sides["TRL 1.16 DPOTrainer + PEFT, DPO step"] = theirs(model, cfg, pairs, args.r)
    mib = lambda n: f"{n / 2**20:,.2f}"  # noqa: E731
    rows = [["step", "saved for backward MiB", "/ ours SFT", "the model's own weights, also saved MiB"]]
    for name, c in sides.items():
        total = sum(c.saved.values())
        rows.append([name, mib(total), f"{total / sum(sft.saved.values()):.4f}", mib(c.weights_saved)])
    print(header("DPO step: bytes saved for backward", "cpu", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"model: SmolLM2-135M-shaped, {args.layers} layers, fp32, LoRA r {args.r} on {len(TARGETS)} projections; "
          f"{args.pairs} pairs, prompt {args.prompt} + completion {args.completion} tokens\n")
    print(table(rows))
    if not args.no_trl:
        ratio = sum(sides["TRL 1.16 DPOTrainer + PEFT, DPO step"].saved.values()) / sum(dpo.saved.values())
        print(f"\nTRL's DPO step / ours: {ratio:.2f}")


if __name__ == "__main__":
    main()
