"""Put LoRA into a model: wrap the target linears, freeze everything else, count, merge.

Matching follows PEFT's rule, so one `target_modules` list means the same modules here and there:
a module is a target when its full dotted name equals a target or ends with "." + target; with
`layers` given, suffix matches are kept only inside `model.layers.<i>.` for i in `layers`.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import LoRAConfig
from quant import Linear4bit

from .fused import fuse_shared_projections
from .layer import ADAPTABLE, LoRALinear

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel wrappers (their `.module`); any other model as is."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} in the model's order."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """{name: linear module} that `config` would wrap; raises ValueError, touching nothing, when a
    target matches no linear module of the model."""
    model = unwrap(model)
    # A LoRALinear stands for the linear it wraps; its base_layer, lora_A and lora_B are never targets.
    wrapped = tuple(name + "." for name in lora_modules(model))
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, (*ADAPTABLE, LoRALinear)) and not name.startswith(wrapped)}

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    unmatched = [t for t in config.target_modules if not any(matches(n, t) for n in linears)]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"LoRA target_modules {unmatched} match no linear module of the model. "
            f"Linear modules available: {suffixes} (a full dotted name such as "
            f"{next(iter(linears), 'model.layers.0.self_attn.q_proj')!r} selects one module)"
        )
    chosen: dict[str, nn.Module] = {}
    for name, module in linears.items():
        if name in config.target_modules:  # named exactly: taken whatever `layers` says, as in PEFT
            chosen[name] = module
        elif any(matches(name, t) for t in config.target_modules):
            if config.layers is not None:
                m = _LAYER_INDEX.search(name)
                if m is None or int(m.group(1)) not in config.layers:
                    continue
            chosen[name] = module
    if not chosen:
        raise ValueError(
            f"LoRA target_modules {list(config.target_modules)} restricted to layers {list(config.layers or [])} "
            f"match no module; the model's layers are numbered from 0 (model.layers.<i>.)"
        )
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap each target linear of `model` in a LoRALinear, in place; freeze every other parameter.

    Returns the wrapped module names. A is drawn from a local generator seeded with `config.seed`
    when given (the global RNG is untouched), else from the global RNG as nn.Linear does.
    """
    model = unwrap(model)
    if lora_modules(model):
        raise ValueError("the model already carries LoRA adapters; load weights with load_adapter or "
                         "load_lora_state_dict, or start from a fresh model")
    targets = find_targets(model, config)  # validates before anything is changed
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    wrap_targets(model, targets, config, generator)
    return list(targets)


def wrap_targets(model: nn.Module, targets: dict[str, nn.Module], config: LoRAConfig,
                 generator: torch.Generator | None) -> None:
    """Freeze every parameter, then replace each target by a LoRALinear around it; where q, k, v (or
    gate, up) are all adapted, project them in one fused function (`lora.fused`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in targets.items():
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, generator,
                           use_dora=config.use_dora)
        layer.train(base.training)  # a model in eval mode stays there: no dropout sneaks in
        model.set_submodule(name, layer)
    fuse_shared_projections(model)
    model.lora_config = config  # read back by save_adapter


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight: W = W0 + scaling · B A (see `LoRALinear.merge`).

    An NF4 base is dequantized and kept in its compute dtype, not re-quantized: re-quantizing the
    merged weight would change the outputs. `unmerge_lora` restores the 4-bit layer exactly.
    """
    model = unwrap(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in lora_modules(model).items():
        shared = owners.get(id(getattr(m.base_layer, "weight", None)), [])
        if len(shared) > 1:  # e.g. a head tied to the embedding: merging would change both
            raise ValueError(f"cannot merge the adapter of {name}: its weight is shared by {shared}")
    for m in lora_modules(model).values():
        m.merge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter is switched off: the model answers as its base alone (PEFT's
    `disable_adapter()`), e.g. the reference of preference tuning. The adapters are back on after it,
    whatever happens inside. A merged model has no base to fall back to: ValueError."""
    layers = list(lora_modules(model).values())
    if any(m.merged for m in layers):
        raise ValueError("cannot switch the adapters off: they are merged into the base weights (unmerge_lora first)")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter out of its base weight again."""
    for m in lora_modules(model).values():
        m.unmerge()


@dataclass(frozen=True)
class ParameterCount:
    """Unpacks to (trainable, total); `str()` is the one-line summary."""

    trainable: int
    total: int

    def __iter__(self):
        return iter((self.trainable, self.total))

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def summary(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({100 * self.fraction:.2f}%)"

    def __str__(self) -> str:
        return self.summary


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count parameters as PEFT's `get_nb_trainable_parameters` does.

    Shared (tied) tensors count once. A 4-bit weight packs two values per byte, so its packed
    tensor counts twice its number of bytes: in x out parameters, as in the unquantized model.
    """
    model = unwrap(model)
    packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 * p.element_size() if id(p) in packed else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable, total)
