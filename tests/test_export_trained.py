"""What a user takes away is what they trained: an adapter records its base, and every export merges
into the weights training saw, so the exported model answers as the evaluated one.

The references: our NF4 base + adapter in fp32 (the trained model); transformers reading the exported
HF folder and the f32 GGUF; llama.cpp running the f32 GGUF. Beside each, the merge into the original
weights (W0 + s·BA, what every export wrote before) is measured, and it is far off."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from lora import LoRAConfig, apply_lora, export_gguf, export_merged, read_trained_on, save_adapter
from model import load_pretrained, open_checkpoint
from test_export_gguf import (EXPORT_FAMILIES, PROMPTS, family_checkpoint, llama_cpp_logits, logits_of, random_adapter,
                              relative_error, transformers_logits)
from test_model import sp_model_file  # noqa: F401  (a fixture: a trained sentencepiece model)

import transformers  # noqa: E402  (test extra: the reference)
from safetensors.torch import load_file, save_file  # noqa: E402


def nf4_trained(folder: str, d: dict, adapter_dir, dora: bool = False):
    """Our NF4 base (fp32 compute) of `folder` with a random adapter on every projection, saved."""
    model, _ = load_pretrained(folder, quant="nf4", compute_dtype=torch.float32)
    if dora:
        from test_families import targets_of

        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=tuple(targets_of(d)), use_dora=True))
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "magnitude" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        save_adapter(model, str(adapter_dir))
        return model, str(adapter_dir)
    return model, random_adapter(model, d, adapter_dir)


def hf_folder_logits(folder: str) -> list[np.ndarray]:
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return [theirs(torch.tensor([p])).logits[0].numpy() for p in PROMPTS]


@pytest.mark.parametrize("name", list(EXPORT_FAMILIES))
def test_every_familys_export_answers_as_its_nf4_base_and_adapter(name, tmp_path, sp_model_file):
    folder = tmp_path / "base"
    folder.mkdir()
    d = family_checkpoint(name, folder, sp_model_file)
    model, adapter = nf4_trained(str(folder), d, tmp_path / "adapter")
    trained = logits_of(model)
    merged = export_merged(str(folder), adapter, str(tmp_path / "merged"))
    original = export_merged(str(folder), adapter, str(tmp_path / "original"), merge_into="original")
    gguf = export_gguf(str(folder), adapter, str(folder / "merged.gguf"), "f32")  # beside its config.json
    errors = {
        "HF folder, transformers": relative_error(hf_folder_logits(merged), trained),
        "HF folder, ours": relative_error(logits_of(load_pretrained(merged)[0]), trained),
        "f32 GGUF, transformers": relative_error(transformers_logits(gguf, name), trained),
    }
    apart = relative_error(hf_folder_logits(original), trained)
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + f" of the largest logit; merged into the original weights {apart:.1e}")
    assert max(errors.values()) <= 1e-5, errors
    assert apart > 100 * max(errors.values())


def test_every_familys_f32_gguf_runs_as_trained_in_llama_cpp(tmp_path, sp_model_file):
    """llama.cpp on the trained merge's f32 file against our NF4 base + adapter: within 1e-5 of the
    largest logit, or, where llama.cpp's own graph is further from transformers' on that very file
    (Gemma 2's soft-capped attention, about 5e-4), within twice that engine's gap: the merge adds
    nothing to it. The merge into the original weights is measured beside it, and is far off."""
    for i, name in enumerate(EXPORT_FAMILIES):
        folder = tmp_path / f"model{i}"  # general.name: transformers reads a family into "mistral", say
        folder.mkdir()
        d = family_checkpoint(name, folder, sp_model_file)
        model, adapter = nf4_trained(str(folder), d, tmp_path / f"{name}-adapter")
        trained = logits_of(model)
        keep = [i for i, p in enumerate(PROMPTS) if name != "phi3" or len(p) > d["original_max_position_embeddings"]]
        runs, files = {}, {}
        for into in ("trained", "original"):
            files[into] = export_gguf(str(folder), adapter, str(folder / f"{into}.gguf"), "f32", merge_into=into)
            runs[into] = llama_cpp_logits(files[into], [PROMPTS[i] for i in keep])
        err = relative_error(runs["trained"], [trained[i] for i in keep])
        apart = relative_error(runs["original"], [trained[i] for i in keep])
        engine = relative_error(runs["trained"], [transformers_logits(files["trained"], name)[i] for i in keep])
        print(f"\n{name}: llama.cpp f32, trained merge {err:.1e} (llama.cpp against transformers on the same file "
              f"{engine:.1e}), original merge {apart:.1e}")
        assert err <= max(1e-5, 2 * engine) and apart > 10 * err, (name, err, engine, apart)


def test_a_dora_adapter_merges_into_the_nf4_weights_it_trained_on(tmp_path, sp_model_file):
    folder = tmp_path / "base"
    folder.mkdir()
    d = family_checkpoint("llama", folder, sp_model_file)
    model, adapter = nf4_trained(str(folder), d, tmp_path / "dora", dora=True)
    err = relative_error(hf_folder_logits(export_merged(str(folder), adapter, str(tmp_path / "merged"))),
                         logits_of(model))
    print(f"\nDoRA on NF4, trained merge: {err:.1e} of the largest logit")
    assert err <= 1e-5


# ------------------------------------------------------------------------------------------ the record
def test_an_adapter_records_the_checkpoint_and_how_its_weights_were_held(tmp_path, sp_model_file):
    folder = tmp_path / "base"
    folder.mkdir()
    d = family_checkpoint("llama", folder, sp_model_file)
    _, adapter = nf4_trained(str(folder), d, tmp_path / "nf4")
    record = read_trained_on(adapter)
    assert record["checkpoint"] == {"path": str(folder), **open_checkpoint(str(folder)).fingerprint}
    assert record["base"] == {"quant": "nf4", "blocksize": 64, "double_quant": True, "dtype": "float32",
                              "compute_dtype": "float32", "unquantized": ["lm_head"]}
    plain, _ = load_pretrained(str(folder), dtype=torch.bfloat16)
    apply_lora(plain, LoRAConfig(r=2, alpha=4))
    save_adapter(plain, str(tmp_path / "bf16"), split={"seed": 3})
    assert read_trained_on(str(tmp_path / "bf16"))["base"] == {"quant": "none", "dtype": "bfloat16"}
    assert read_trained_on(str(tmp_path / "bf16"))["split"] == {"seed": 3}
    fp4, _ = load_pretrained(str(folder), quant="fp4", double_quant=False)
    apply_lora(fp4, LoRAConfig(r=2, alpha=4))
    save_adapter(fp4, str(tmp_path / "fp4"))
    base = read_trained_on(str(tmp_path / "fp4"))["base"]
    assert (base["quant"], base["double_quant"]) == ("fp4", False)


def test_a_stale_or_foreign_checkpoint_is_refused_naming_both(tmp_path, sp_model_file):
    folder, other = tmp_path / "base", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    d = family_checkpoint("llama", folder, sp_model_file)
    family_checkpoint("llama", other, sp_model_file)
    weights = other / "model.safetensors"  # the same shapes, other weights
    save_file({n: t + 0.01 for n, t in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    _, adapter = nf4_trained(str(folder), d, tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"{other} is not the checkpoint .* recorded {folder} "):
        export_merged(str(other), adapter, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="allow_other_checkpoint"):
        export_gguf(str(other), adapter, str(tmp_path / "x.gguf"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.gguf")
    export_merged(str(other), adapter, str(tmp_path / "x"), allow_other_checkpoint=True)  # asked for: done
    # a copy elsewhere is the same file; one changed byte in its first tensor is not
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    export_merged(str(copy), adapter, str(tmp_path / "from-copy"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 1] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not the checkpoint"):
        export_merged(str(copy), adapter, str(tmp_path / "y"))


def test_an_adapter_saved_without_a_record_merges_into_the_original_weights_with_one_warning(tmp_path, sp_model_file):
    folder = tmp_path / "base"
    folder.mkdir()
    d = family_checkpoint("llama", folder, sp_model_file)
    _, adapter = nf4_trained(str(folder), d, tmp_path / "adapter")
    original = export_merged(str(folder), adapter, str(tmp_path / "original"), merge_into="original")
    os.remove(os.path.join(adapter, "trained_on.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = export_merged(str(folder), adapter, str(tmp_path / "old"))
    said = [str(w.message) for w in caught if "trained_on.json" in str(w.message)]
    assert len(said) == 1 and "original weights" in said[0], said
    assert relative_error(hf_folder_logits(old), hf_folder_logits(original)) == 0


def test_a_record_that_is_not_json_or_names_an_unknown_quantization_is_an_error(tmp_path):
    (tmp_path / "trained_on.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"trained_on\.json: not valid JSON"):
        read_trained_on(str(tmp_path))
    (tmp_path / "trained_on.json").write_text(json.dumps({"base": {"quant": "int3"}}))
    with pytest.raises(ValueError, match=r"base\.quant is 'int3'"):
        read_trained_on(str(tmp_path))
