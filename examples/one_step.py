"""One training step of a tiny random Llama with LoRA, the four steps printed one by one.

    python examples/one_step.py            # runs in a second on the CPU
    python examples/one_step.py --lr 0.01 --weight-decay 0.1

1. forward pass    token ids -> hidden states -> (the head, at answer positions only) logits
2. loss            cross-entropy of each answer token's prediction: how wrong was it
3. backward pass   the gradient of the loss for every LoRA parameter (A and B)
4. optimizer step  AdamW nudges every weight a little against its gradient

On the way it shows three facts of LoRA and AdamW: with B = 0 the adapted model's logits are
the base model's exactly; while B = 0 the gradient of A is exactly zero (dL/dA = s · Bᵀ · ...), so
the first step moves only B; and the AdamW update equals the one computed by hand from the
equations in train/optim.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lora import LoRAConfig, apply_lora  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402
from train import AdamW, answer_loss  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW's learning rate (default 1e-2)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay (default 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Run the step, print it, and return what it showed (for tests/test_examples.py)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False))
    model = Llama(config)
    ids = torch.randint(3, config.vocab_size, (2, 10))                # (B, T): 2 rows of 10 tokens
    labels = torch.full_like(ids, -100)
    labels[:, 7:] = ids[:, 7:]                                        # the last 3 tokens of each row: the answer
    with torch.no_grad():
        base_logits = model(ids)

    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    q = model.model.layers[0].self_attn.q_proj
    A, B = q.lora_A.weight, q.lora_B.weight
    print(f"LoRA on q_proj and v_proj: A {tuple(A.shape)} (r x in), B {tuple(B.shape)} (out x r), "
          f"scaling alpha / r = {q.scaling}")
    with torch.no_grad():
        lora_logits = model(ids)
    same = (lora_logits - base_logits).abs().max().item()
    print(f"B = 0: max |logits with LoRA - base logits| = {same}")

    # 1. forward pass
    hidden = model.model(ids)
    print(f"1. forward:  input_ids {tuple(ids.shape)} -> hidden states {tuple(hidden.shape)}; "
          f"the head makes logits {tuple(lora_logits.shape)} where asked, here only at "
          f"{int((labels[:, 1:] != -100).sum())} answer positions")
    # 2. loss: mean cross-entropy over the answer tokens (each position predicts the next token)
    loss = answer_loss(model, ids, labels)
    print(f"2. loss:     {tuple(loss.shape)} scalar, {loss.item():.4f} (ln {config.vocab_size} = "
          f"{torch.log(torch.tensor(float(config.vocab_size))).item():.4f} for a uniform guess)")
    # 3. backward pass
    loss.backward()
    grad_A, grad_B = A.grad.clone(), B.grad.clone()
    print(f"3. backward: dL/dA {tuple(grad_A.shape)} max |.| = {grad_A.abs().max().item()}, "
          f"dL/dB {tuple(grad_B.shape)} max |.| = {grad_B.abs().max().item():.3g}  (A gets nothing while B = 0)")
    # 4. optimizer step, and the same update by hand (t = 1: m̂ = g, v̂ = g²)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    before, A_before = B.detach().clone(), A.detach().clone()
    opt.step()
    eps = opt.param_groups[0]["eps"]
    by_hand = before * (1 - args.lr * args.weight_decay) - args.lr * grad_B / (grad_B.abs() + eps)
    adamw_diff = (B.detach() - by_hand).abs().max().item()
    print(f"4. AdamW:    B moved by up to {(B.detach() - before).abs().max().item():.3g} (about lr = {args.lr}); "
          f"max |AdamW - by hand| = {adamw_diff:.3g}; A only shrank by the weight decay (its m and v are 0)")
    return dict(logits_diff=same, grad_A_max=grad_A.abs().max().item(), grad_B_max=grad_B.abs().max().item(),
                adamw_diff=adamw_diff, B_moved=(B.detach() - before).abs().max().item(),
                A_only_decayed=torch.equal(A.detach(), A_before * (1 - args.lr * args.weight_decay)), loss=loss.item(),
                shapes=dict(hidden=tuple(hidden.shape), logits=tuple(lora_logits.shape), A=tuple(A.shape),
                            B=tuple(B.shape)))


if __name__ == "__main__":
    main()
