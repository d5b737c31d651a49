"""model: a Llama-family decoder in plain PyTorch, its loaders, tokenizer and generation.

One decoder for llama, mistral, qwen2, qwen3, gemma2, gemma3_text and phi3 checkpoints: each
family is a set of LlamaConfig fields (model/families.py).

    from model import load_pretrained, Llama, LlamaConfig, Tokenizer
    model, tok = load_pretrained(path, dtype=torch.float32, device="cpu", quant=None)
    ckpt = open_checkpoint(path)          # one opened checkpoint: config, tokenizer, tensors, fingerprint
    ids, mask = pad_batch([tok.encode(p) for p in prompts], tok.pad_id)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""
from .chat_template import CHATML, ChatTemplateError, render_chat
from .chat_turns import assistant_spans, end_of_turn_ids
from .checkpoint import Checkpoint, open_checkpoint
from .config import LlamaConfig
from .generate import KVCache, generate, pad_batch, shared_prefix_batch
from .llama import Llama
from .load import default_checkpoint, iter_tensors, load_pretrained, load_tokenizer, read_config
from .tokenizer import Tokenizer

__all__ = [
    "Llama", "LlamaConfig", "KVCache", "Tokenizer", "Checkpoint", "open_checkpoint", "load_pretrained", "read_config", "iter_tensors",
    "load_tokenizer", "default_checkpoint", "pad_batch", "shared_prefix_batch", "generate", "CHATML", "ChatTemplateError", "render_chat",
    "assistant_spans", "end_of_turn_ids",
]
