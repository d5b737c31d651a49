"""model: a Llama-family decoder in plain PyTorch, its loaders, tokenizer and generation.

    from model import load_pretrained, Llama, LlamaConfig, Tokenizer
    model, tok = load_pretrained(path, dtype=torch.float32, device="cpu", quant=None)
"""
from .config import LlamaConfig
from .llama import KVCache, Llama

__all__ = ["Llama", "LlamaConfig", "KVCache"]
