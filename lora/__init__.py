"""lora: low-rank adapters written by hand, in PEFT's layout.

    h = W0 x + (alpha / r) · B A x        W0 frozen (plain or NF4), only A (r x in) and B (out x r) train
    DoRA (use_dora=True): h = m ⊙ (W0 + s·BA) x / ‖W0 + s·BA‖, the length m per output feature trained too

    from lora import LoRAConfig, apply_lora, trainable_parameters, save_adapter, load_adapter
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    print(trainable_parameters(model))    # SmolLM2-135M: trainable 921,600 / 135,436,608 (0.68%)
    save_adapter(model, out_dir)          # adapter_model.safetensors + adapter_config.json + trained_on.json
    with adapters_disabled(model): ...    # the base alone answers (DPO's and GRPO's reference)
    export_merged(checkpoint, out_dir, merged_dir)   # a plain HF model: merged into the weights training saw
    export_gguf(checkpoint, out_dir, "model.gguf", out_type="q8_0")   # one file for llama.cpp / Ollama
    export_gguf_adapter(checkpoint, out_dir, "adapter.gguf")          # llama.cpp's --lora over the base GGUF
"""
from .config import LoRAConfig
from .export import export_merged
from .gguf_export import GGUF_TYPES, K_QUANTS, LlamaQuantizerMissing, export_gguf, export_gguf_adapter
from .inject import (ParameterCount, adapters_disabled, apply_lora, lora_modules, merge_lora, trainable_parameters,
                     unmerge_lora)
from .io import load_adapter, load_lora_state_dict, lora_state_dict, read_adapter, read_adapter_config, save_adapter
from .layer import LoRALinear
from .trained_on import MERGE_INTO, TRAINED_ON, read_trained_on, recorded_checkpoint

__all__ = [
    "LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "adapters_disabled", "trainable_parameters",
    "ParameterCount", "lora_modules", "lora_state_dict", "load_lora_state_dict", "save_adapter", "load_adapter",
    "read_adapter", "read_adapter_config", "export_merged", "export_gguf", "export_gguf_adapter", "GGUF_TYPES",
    "K_QUANTS", "LlamaQuantizerMissing", "MERGE_INTO", "TRAINED_ON", "read_trained_on", "recorded_checkpoint",
]
