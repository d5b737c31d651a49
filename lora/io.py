"""Adapters on disk in PEFT's layout, so PEFT, vLLM and the hub read ours and we read theirs.

    adapter_dir/
      trained_on.json              what it was trained on: the base checkpoint (path, fingerprint), how
                                   its weights were held (NF4, dtypes), the data split (lora/trained_on.py)
      adapter_config.json          LoRAConfig.to_peft_dict()
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r, in)   fp32
                                   base_model.model.<module path>.lora_B.weight  (out, r)  fp32
                                   base_model.model.<module path>.lora_magnitude_vector (out,) DoRA only

Every file is written to a temporary name in the same folder and then renamed, so a save that is
interrupted (a crash, a full disk) never leaves a half-written adapter behind.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoRAConfig
from .dora import MAGNITUDE
from .inject import find_targets, lora_modules, unwrap, wrap_targets
from .trained_on import TRAINED_ON, trained_on

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (`base_model.model.<path>.lora_A.weight`), fp32.

    The tensors are detached views of the live parameters (like `state_dict()`), not copies.
    """
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float()  # (r, in)
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float()  # (out, r)
        if m.use_dora:
            sd[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = getattr(m, MAGNITUDE).detach().float()  # (out,)
    return sd


def _normalise_key(key: str) -> str:
    # A state dict taken from a live PEFT model still names the adapter ("lora_A.default.weight").
    key = key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
    return key.replace(f".{MAGNITUDE}.default.weight", f".{MAGNITUDE}")


def _expected_shapes(modules: dict[str, nn.Module], r: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, m in modules.items():
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
        if use_dora:
            shapes[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = (m.out_features,)
    return shapes


def _check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ValueError naming every missing or unexpected key and the first shape mismatch."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the adapter does not fit the model: "
            f"{len(missing)} missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(sd[key].shape)} but the model expects {shape}"
            )


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy an adapter state dict (PEFT's keys) into the model's A and B.

    Every key and shape is checked first; on any mismatch a ValueError names the tensor and both
    shapes, and the model is left untouched.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model carries no LoRA adapters; call apply_lora or load_adapter first")
    sd = {_normalise_key(k): v for k, v in sd.items()}
    first = next(iter(modules.values()))
    _check_state_dict(sd, _expected_shapes(modules, first.r, first.use_dora), source)
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_A.weight.copy_(sd[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(sd[f"{PEFT_PREFIX}{name}.lora_B.weight"])
            if m.use_dora:
                getattr(m, MAGNITUDE).copy_(sd[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"])


def _config_of(model: nn.Module) -> LoRAConfig:
    """The config apply_lora recorded, checked against the modules actually wrapped."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model carries no LoRA adapters: nothing to save")
    config = getattr(unwrap(model), "lora_config", None)
    if config is None:  # LoRALinears placed by hand: name them exactly
        m = next(iter(modules.values()))
        dropout = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
        config = LoRAConfig(r=m.r, alpha=m.alpha, dropout=dropout, target_modules=tuple(modules),
                            use_rslora=m.use_rslora, use_dora=m.use_dora)
    return config


def _atomic_write(path: str, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None,
                 split: dict | None = None) -> None:
    """Write `adapter_model.safetensors` (fp32) and `adapter_config.json` in PEFT's layout to out_dir,
    and `trained_on.json`: the base the model was loaded from and how its weights were held, so that an
    export merges into the weights training saw, and `split` ({seed, sizes, ...}: the data it trained
    on, for the scripts that score it on held-out items only)."""
    config = _config_of(model)
    record = trained_on(unwrap(model), split)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model).items()}
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG), config.to_peft_dict(base_model_name_or_path))
    _write_json(os.path.join(out_dir, TRAINED_ON), record)


def read_adapter_config(adapter_dir: str) -> dict:
    """The JSON object of `<adapter_dir>/adapter_config.json`, with errors that name the file."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG} (expected a PEFT adapter folder)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_adapter(adapter_dir: str) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read (config, state dict with PEFT's keys) from an adapter folder, with clear errors."""
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"adapter folder {adapter_dir!r} does not exist")
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is missing: an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = LoRAConfig.from_peft_dict(read_adapter_config(adapter_dir), source=config_path)
    try:
        sd = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return config, {_normalise_key(k): v for k, v in sd.items()}


def load_adapter(model: nn.Module, adapter_dir: str) -> list[str]:
    """Load a PEFT-layout adapter into `model`; returns the adapted module names.

    A model without LoRA gets LoRA applied from the saved `adapter_config.json` first; a model that
    already carries LoRA with the same rank, scaling and modules is loaded in place (resuming a run).
    Everything is checked before anything changes: on any error the model is untouched.
    """
    model = unwrap(model)
    config, sd = read_adapter(adapter_dir)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    existing = lora_modules(model)
    if existing:
        m = next(iter(existing.values()))
        targets = find_targets(model, config)  # names of the wrapped modules, by the saved rule
        if (set(targets) != set(existing) or m.r != config.r or m.scaling != config.scaling
                or m.use_dora != config.use_dora):
            raise ValueError(
                f"{adapter_dir}: the adapter (r={config.r}, scaling={config.scaling:g}, use_dora={config.use_dora}, "
                f"{len(targets)} modules) differs from the LoRA the model carries (r={m.r}, scaling={m.scaling:g}, "
                f"use_dora={m.use_dora}, {len(existing)} modules)"
            )
        load_lora_state_dict(model, sd, source=weights_path)
        return list(existing)

    targets = find_targets(model, config)
    _check_state_dict(sd, _expected_shapes(targets, config.r, config.use_dora), weights_path)
    # Seeded so that loading never draws from the global RNG; the loaded A, B replace this init.
    wrap_targets(model, targets, config, torch.Generator().manual_seed(0))
    load_lora_state_dict(model, sd, source=weights_path)
    return list(targets)
