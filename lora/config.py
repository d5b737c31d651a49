"""LoRAConfig: the three key hyperparameters of LoRA (r, alpha, target modules) and a few more.

The course's rule of thumb: start at r = 8 and double (16, 32, ...) while results improve;
alpha = 2r; target the attention projections, and later layers when the output must change a lot.

The config reads and writes PEFT's `adapter_config.json`, so an adapter trained here is one that
PEFT, vLLM and the rest of the ecosystem load as their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def check_rank(r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on B A x: alpha / r (Hu et al.), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoRAConfig:
    """How to adapt a model: `h = W0 x + scaling · B A x` on each target module.

    r:               rank, the inner dimension of A (r x in) and B (out x r).
    alpha:           scales the update: scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
    dropout:         dropout on x on the LoRA path only (the frozen path sees x unchanged).
    target_modules:  module names; "q_proj" matches every layer's q_proj, a full dotted name
                     ("model.layers.3.self_attn.q_proj") matches that one module.
    use_rslora:      rank-stabilised LoRA (Kalajdzievski 2023): scale by alpha / sqrt(r), so a
                     higher rank does not shrink the update.
    layers:          optional layer indices (`model.layers.<i>.`) to restrict suffix matches to.
    seed:            seed of A's initialisation (a local generator; the global RNG is untouched).
    use_dora:        DoRA (Liu et al. 2024): each output feature's length m is trained apart from
                     the direction of W0 + scaling · B A (lora/dora.py); PEFT's `use_dora`.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None
    seed: int | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_rank(self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha must be a positive number, got alpha={self.alpha!r} (rule of thumb: alpha = 2r)")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        if isinstance(self.target_modules, str):
            # A bare string would iterate as characters; PEFT reads a string as a regex, which we do not support.
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(
                f"target_modules must be a non-empty list of module names such as ('q_proj', 'v_proj'), "
                f"got {self.target_modules!r}"
            )
        if self.layers is not None:
            if not isinstance(self.layers, (int, list, tuple)):
                raise ValueError(f"layers must be None, a layer index or a list of them, got {self.layers!r}")
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"layers must be None or a non-empty list of layer indices >= 0, got {self.layers!r}")
            self.layers = layers

    @property
    def scaling(self) -> float:
        """The factor on B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    # ------------------------------------------------------------------ PEFT's adapter_config.json
    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The dict of PEFT's `adapter_config.json` (LoRA, causal LM), loadable by PEFT without warnings."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": list(self.target_modules),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "layers_pattern": "layers" if self.layers is not None else None,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": bool(self.use_dora),
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> "LoRAConfig":
        """Read PEFT's `adapter_config.json` dict; refuse what plain LoRA cannot reproduce."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; only 'LORA' adapters are supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        unsupported = {
            "fan_in_fan_out": (False, None),
            "bias": ("none", None),
            "rank_pattern": ({}, None),
            "alpha_pattern": ({}, None),
            "modules_to_save": (None, []),
        }
        for key, allowed in unsupported.items():
            if d.get(key) not in allowed:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by plain LoRA; expected {allowed[0]!r}")
        targets = d["target_modules"]
        if not isinstance(targets, (str, list, tuple, set, frozenset)):
            raise ValueError(f"{source}: target_modules must be a list of module names, got {targets!r}")
        if isinstance(targets, str):
            raise ValueError(
                f"{source}: target_modules is the regular expression {targets!r}; "
                "list the module names instead, e.g. ['q_proj', 'v_proj']"
            )
        layers = d.get("layers_to_transform")
        pattern = d.get("layers_pattern")
        if pattern not in (None, "", "layers", ["layers"]):
            raise ValueError(f"{source}: layers_pattern {pattern!r} is not supported; expected 'layers'")
        return cls(
            r=d["r"],
            alpha=d["lora_alpha"],
            dropout=d.get("lora_dropout", 0.0),
            target_modules=tuple(sorted(targets)) if isinstance(targets, (set, frozenset)) else tuple(targets),
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            layers=layers if layers not in ([],) else None,
        )
