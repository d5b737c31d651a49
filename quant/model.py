"""`quantize_model`: swap every `nn.Linear` of any module for a 4-bit `Linear4bit`, in place."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from .linear4bit import Linear4bit


@dataclass
class QuantReport:
    """What `quantize_model` did.

    bytes_before / bytes_after: the replaced layers' weights as they were and as packed codes
    plus quant state; bits_per_param: (packed bytes + absmax/state bytes) * 8 / number of weights.
    """

    layers_replaced: int
    layers_skipped: list[str]
    params_quantized: int
    bytes_before: int
    bytes_after: int
    quant_type: str
    double_quant: bool

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / max(self.params_quantized, 1)

    def __str__(self) -> str:
        skipped = ", ".join(self.layers_skipped) or "none"
        return (
            f"{self.quant_type.upper()}{' + double quant' if self.double_quant else ''}: "
            f"{self.layers_replaced} linear layers replaced ({self.params_quantized:,} weights), skipped: {skipped}\n"
            f"  weights {_size(self.bytes_before)} -> {_size(self.bytes_after)} "
            f"({self.bits_per_param:.3f} bits per parameter)"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module name if it equals the name, its last part, or is a regex that fully matches."""
    last = name.rsplit(".", 1)[-1]
    return any(p == name or p == last or re.fullmatch(p, name) for p in patterns)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
) -> QuantReport:
    """Replace every `nn.Linear` in `model` whose name is not in `skip` by a `Linear4bit`, in place.

    Each layer is quantized and its float weight released before the next one, so peak
    memory grows by one layer, not one model. Returns a `QuantReport`.
    """
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model replaces the linear layers inside a model; for one layer use Linear4bit.from_linear")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    # names only: holding the modules themselves would keep every float weight alive to the end
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = QuantReport(0, [], 0, 0, 0, quant_type, double_quant)
    for name in names:
        if _matches(name, skip):
            report.layers_skipped.append(name)
            continue
        linear = model.get_submodule(name)
        w = linear.weight
        report.params_quantized += w.numel()
        report.bytes_before += w.numel() * w.element_size()
        q = Linear4bit.from_linear(linear, quant_type, double_quant, compute_dtype, blocksize)
        report.bytes_after += q.quantized_nbytes()
        model.set_submodule(name, q)
        report.layers_replaced += 1
    return report
