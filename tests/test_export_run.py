"""The exported file as people run it: SmolLM2's trained merge in llama.cpp, the k-quants from llama.cpp's
own quantizer, and a chat that stops where the template ends a turn (llama.cpp, and Ollama's Modelfile)."""
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch

from lora import LoRAConfig, LlamaQuantizerMissing, apply_lora, export_gguf, export_merged, save_adapter
from model import end_of_turn_ids, load_pretrained
from test_export_gguf import byte_level_tokenizer, hf_model, llama_cpp_logits, logits_of, relative_error
from test_export_gguf import EXPORT_FAMILIES

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding: `make test` builds it")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def smollm2_nf4(tmp_path_factory, smollm2_gguf):
    """SmolLM2 with an NF4 base and a random adapter on the demo's targets (every projection of layers
    20-29), as `make demo` trains it; its prompts' logits and the saved adapter."""
    model, tok = load_pretrained(smollm2_gguf, quant="nf4")
    apply_lora(model, LoRAConfig(r=8, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"), layers=tuple(range(20, 30))))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = str(tmp_path_factory.mktemp("smollm2") / "adapter")
    save_adapter(model, adapter)
    prompts = [tok.encode(s, bos=True) for s in ("The capital of France is",
                                                 "How much does this cost?\n\nDiamond: 1.01 carat\n\nPrice is $")]
    return logits_of(model, prompts), prompts, adapter


def test_smollm2_trained_merge_answers_as_its_nf4_base_and_adapter(smollm2_nf4, smollm2_gguf, tmp_path):
    trained, prompts, adapter = smollm2_nf4
    folder = export_merged(smollm2_gguf, adapter, str(tmp_path / "merged"))
    ours = relative_error(logits_of(load_pretrained(folder)[0], prompts), trained)
    runs = {into: relative_error(llama_cpp_logits(
        export_gguf(smollm2_gguf, adapter, str(tmp_path / f"{into}.gguf"), "f32", merge_into=into), prompts), trained)
        for into in ("trained", "original")}
    print(f"\nSmolLM2, NF4 base + adapter against: the trained merge's HF folder (ours) {ours:.1e}, its f32 GGUF in "
          f"llama.cpp {runs['trained']:.1e}; the original merge's in llama.cpp {runs['original']:.1e}")
    assert ours <= 1e-5 and runs["trained"] <= 1e-4 and runs["original"] > 10 * runs["trained"]


def test_k_quants_come_from_llama_cpps_quantizer(smollm2_nf4, smollm2_gguf, tmp_path):
    _, prompts, adapter = smollm2_nf4
    sizes = {}
    for out_type in ("q8_0", "q4_k_m"):
        path = export_gguf(smollm2_gguf, adapter, str(tmp_path / f"{out_type}.gguf"), out_type)
        sizes[out_type] = os.path.getsize(path)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "q4_k_m.gguf"), n_ctx=64, verbose=False)
    assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    llm.close()
    ref = llama_cpp_logits(str(tmp_path / "q8_0.gguf"), prompts)
    err = relative_error(llama_cpp_logits(str(tmp_path / "q4_k_m.gguf"), prompts), ref)
    print(f"\nSmolLM2 q4_k_m: {sizes['q4_k_m'] / 1e6:.1f} MB against q8_0's {sizes['q8_0'] / 1e6:.1f} MB; "
          f"logits {err:.2f} of the largest from q8_0's")
    assert sizes["q4_k_m"] < 0.8 * sizes["q8_0"] and err < 0.5
    assert os.listdir(tmp_path) == ["q8_0.gguf", "q4_k_m.gguf"] or sorted(os.listdir(tmp_path)) == ["q4_k_m.gguf", "q8_0.gguf"]


def test_without_llama_cpp_a_k_quant_leaves_the_f16_file_and_the_command(tmp_path, monkeypatch):
    folder = tmp_path / "base"
    folder.mkdir()
    byte_level_tokenizer(folder)
    hf_model(EXPORT_FAMILIES["llama"]).save_pretrained(str(folder))
    model, _ = load_pretrained(str(folder))
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)))
    save_adapter(model, str(tmp_path / "adapter"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    with pytest.raises(LlamaQuantizerMissing) as e:
        export_gguf(str(folder), str(tmp_path / "adapter"), str(tmp_path / "out.gguf"), "q5_k_m")
    assert e.value.command == f"llama-quantize {tmp_path / 'out.f16.gguf'} {tmp_path / 'out.gguf'} Q5_K_M"
    assert os.path.isfile(tmp_path / "out.f16.gguf") and not os.path.exists(tmp_path / "out.gguf")


# ------------------------------------------------------------------------------------------ where a turn ends
TURN_END = "<|turn_end|>"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}" + TURN_END + "\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_gguf_and_the_modelfile_end_a_turn_where_the_template_does(tmp_path):
    """A template that closes each turn with a token of its own, not EOS: the GGUF states it as the
    end-of-turn id (llama.cpp counts it as end of generation) and the Modelfile stops at it and at EOS."""
    folder = tmp_path / "base"
    folder.mkdir()
    byte_level_tokenizer(folder, special=["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", TURN_END],
                         template=TEMPLATE, eos="<|end_of_text|>")
    hf_model(EXPORT_FAMILIES["llama"]).save_pretrained(str(folder))
    model, tok = load_pretrained(str(folder))
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)))
    save_adapter(model, str(tmp_path / "adapter"))
    turn_end = tok.encode(TURN_END)[0]
    assert end_of_turn_ids(tok) == [turn_end, tok.eos_id]
    sys.path.insert(0, EXAMPLES)
    import export_gguf as script

    out = str(tmp_path / "model.gguf")
    assert script.main(["--adapter", str(tmp_path / "adapter"), "--model", str(folder), "--out", out]) == 0
    llm = llama_cpp.Llama(model_path=out, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == turn_end
    assert llama_cpp.llama_vocab_is_eog(vocab, turn_end) and llama_cpp.llama_vocab_is_eog(vocab, tok.eos_id)
    llm.close()
    modelfile = open(str(tmp_path / "model.Modelfile")).read()
    assert f'PARAMETER stop "{TURN_END}"' in modelfile and 'PARAMETER stop "<|end_of_text|>"' in modelfile


def test_a_two_turn_chat_in_llama_cpp_stops_at_the_end_of_the_turn(smollm2_gguf, smollm2, tmp_path):
    """SmolLM2's export (a zero adapter: the base itself) answers the second turn of a chat and stops
    at <|im_end|>, as the template ends a turn, instead of writing the next turn itself."""
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)))
    save_adapter(model, str(tmp_path / "adapter"))
    path = export_gguf(smollm2_gguf, str(tmp_path / "adapter"), str(tmp_path / "chat.gguf"), "q8_0")
    chat = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy? Answer in one short sentence."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    new = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        new.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) == 64:
            break
    llm.close()
    reply = tok.decode(new)
    print(f"\nllama.cpp's reply to the second turn: {reply!r}")
    assert new[-1] in end_of_turn_ids(tok) and len(new) < 64, reply
    assert "<|im_start|>" not in reply and "Rome" in reply
