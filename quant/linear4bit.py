"""`Linear4bit`: a frozen linear layer whose weight is stored in 4 bits (NF4 or FP4).

The packed weight and its quant state are quantized and multiplied by bitsandbytes'
kernels (CUDA on a GPU, its CPU backend otherwise); `quant.nf4` is the plain-torch
specification those kernels are tested against. In the forward pass of a batch of tokens,
bitsandbytes dequantizes the whole weight into a temporary `compute_dtype` tensor (bf16 on
CUDA, fp32 on the CPU), multiplies, and frees it; only a single token's input (generation, on
CUDA) takes a kernel that reads the 4-bit codes directly. The memory saving is in storage,
the arithmetic stays 16/32-bit.

One dequantization per use. With double quantization the per-block scales are themselves stored
as 8-bit codes (absmax ≈ nested_quant_map[code] · nested_absmax + offset), so decoding a weight
would take three ops: the nested absmax, the offset, then the 4-bit codes, once in the forward
pass and again in the backward pass. The scales are decoded to fp32 once, when the layer is built
or loaded (`decoded_absmax`, an fp32 value per block of 64 weights: +32/64 = +0.5 bit per
parameter held in memory, 4.127 -> 4.627 bits, never saved); every use then costs one kernel,
bitsandbytes' `dequantize_4bit` (inside `gemm_4bit` in the forward pass). Decoding once per step
instead would hold the same scales from each layer's forward to its backward pass, the same peak,
and still pay the decoding ops every step. The values are bitsandbytes' own, so the outputs are
bit for bit those of the nested state.

State dict layout (the same keys as bitsandbytes' own `Linear4bit`):
    weight                                   packed uint8, ((out*in + 1)//2, 1)
    bias                                     (out,), when present
    weight.absmax                            fp32 scales, or their uint8 codes with double quant
    weight.quant_map                         the 16-value code book
    weight.nested_absmax                     fp32 scales of the absmax codes (double quant only)
    weight.nested_quant_map                  the 256-value dynamic code map (double quant only)
    weight.quant_state.bitsandbytes__<type>  uint8 bytes of a JSON dict: quant_type, blocksize,
                                             dtype, shape, nested_blocksize, nested_dtype, nested_offset
"""
from __future__ import annotations

import json
from typing import Optional

import bitsandbytes
import bitsandbytes.functional as bnbF
import torch
from torch import nn

from .nf4 import NESTED_BLOCKSIZE, _check_args

# the quant-state buffers, saved as "<prefix>weight.<name>" (bitsandbytes' layout)
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_META_PREFIX = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Linear4bit(nn.Module):
    """y = x W^T + b with W (out_features, in_features) held as packed 4-bit codes.

    Build one with `Linear4bit.from_weight(w)` or `Linear4bit.from_linear(linear)`.
    Nothing in it trains: the packed weight has no gradient, the bias is frozen; the input
    still receives its gradient, which is all QLoRA needs to train adapters around it.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        quant_state: bnbF.QuantState,
        bias: Optional[torch.Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"Linear4bit needs the state of a 2-D weight (out, in), got shape {shape}")
        self.out_features, self.in_features = shape
        self.quant_type: str = quant_state.quant_type
        self.blocksize: int = quant_state.blocksize
        self.weight_dtype: torch.dtype = quant_state.dtype  # dtype the weight had before quantization
        self._compute_dtype = compute_dtype
        self.weight = nn.Parameter(packed, requires_grad=False)  # ((out*in+1)//2, 1) uint8
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias
        # The quant state lives in buffers so that .to(device) moves all of it.
        # They are not persistent: _save_to_state_dict writes them in the layout above.
        self.register_buffer("absmax", quant_state.absmax, persistent=False)
        self.register_buffer("quant_map", quant_state.code, persistent=False)
        nested = quant_state.nested
        self.register_buffer("nested_absmax", quant_state.state2.absmax if nested else None, persistent=False)
        self.register_buffer("nested_quant_map", quant_state.state2.code if nested else None, persistent=False)
        self.register_buffer("offset", quant_state.offset.reshape(()) if nested else None, persistent=False)
        self.register_buffer("decoded_absmax", None, persistent=False)
        self._decode_absmax()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
    ) -> "Linear4bit":
        """Quantize a 2-D weight (out, in) into a new layer; the float weight is not kept."""
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit.from_weight needs a 2-D weight (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
        _check_args(weight, blocksize, quant_type)
        packed, state = bnbF.quantize_4bit(
            weight.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        return cls(packed, state, bias=bias, compute_dtype=compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
    ) -> "Linear4bit":
        """Quantize an `nn.Linear` (weight and bias) into a new layer."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, quant_type, double_quant, compute_dtype, blocksize)

    # ------------------------------------------------------------------ quant state

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the matmul: as given, else bf16 on CUDA and fp32 elsewhere."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        return torch.bfloat16 if self.weight.device.type == "cuda" else torch.float32

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[torch.dtype]) -> None:
        self._compute_dtype = dtype

    @property
    def quant_state(self) -> bnbF.QuantState:
        """bitsandbytes' view of this layer's quant state (built on the fly; shares the buffers)."""
        state2 = None
        if self.double_quant:
            state2 = bnbF.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                     blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return bnbF.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.quant_map,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
            offset=self.offset, state2=state2,
        )

    @torch.no_grad()
    def _decode_absmax(self) -> None:
        """decoded_absmax = nested_quant_map[absmax] · nested_absmax + offset, fp32 (n_blocks,), as
        bitsandbytes decodes it; None without double quant, where absmax is fp32 already."""
        if not self.double_quant:
            self._buffers["decoded_absmax"] = None
            return
        state2 = bnbF.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        absmax = bnbF.dequantize_blockwise(self.absmax, state2)
        absmax += self.offset
        self._buffers["decoded_absmax"] = absmax

    @property
    def kernel_state(self) -> bnbF.QuantState:
        """The quant state the kernels run on: the same codes with fp32 scales, no nesting, so that a
        dequantization is one op (bitsandbytes' `dequantize_4bit`)."""
        absmax = self.decoded_absmax if self.double_quant else self.absmax
        return bnbF.QuantState(
            absmax=absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.quant_map,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
        )

    def quantized_nbytes(self) -> int:
        """Bytes of the packed weight plus its stored quant state (scales, nested scales, offset);
        the decoded fp32 scales held beside them for speed are not counted (see the module doc)."""
        tensors = [self.weight, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) must move the quant state but never round it:
        # keep each buffer's dtype and take only the new device.
        before = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # ------------------------------------------------------------------ compute

    def dequantize(self) -> torch.Tensor:
        """The weight as the kernels see it. Returns (out_features, in_features) in compute_dtype."""
        w = bnbF.dequantize_4bit(self.weight, self.kernel_state)
        return w.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype; the matmul runs in compute_dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit expects inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = bitsandbytes.matmul_4bit(x.to(dtype), self.weight, self.kernel_state, bias=bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, blocksize={self.blocksize}, "
                f"compute_dtype={self.compute_dtype}")

    # ------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for name in _STATE_BUFFERS:
            t = self._buffers[name]
            if t is not None:
                destination[prefix + "weight." + name] = t if keep_vars else t.detach()
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.weight_dtype),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        destination[prefix + "weight." + _META_PREFIX + self.quant_type] = blob

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        where = prefix.rstrip(".") or "Linear4bit"
        meta_keys = [k for k in state_dict if k.startswith(prefix + "weight." + _META_PREFIX)]
        if prefix + "weight" not in state_dict or not meta_keys:
            raise ValueError(
                f"{where}: the state dict has no 4-bit quant state ('{prefix}weight' and "
                f"'{prefix}weight.{_META_PREFIX}<nf4|fp4>' are needed); was it saved from a Linear4bit?"
            )
        meta = json.loads(bytes(state_dict[meta_keys[0]].cpu().tolist()).decode("utf-8"))
        shape = tuple(meta["shape"])
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"{where}: quant state is for a weight of shape {shape}, "
                             f"this layer is ({self.out_features}, {self.in_features})")
        packed = state_dict[prefix + "weight"]
        n = shape[0] * shape[1]
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"{where}: packed weight has {packed.numel()} bytes, a {shape} weight needs {(n + 1) // 2}")
        nested = "nested_offset" in meta
        needed = _STATE_BUFFERS[:4 if nested else 2]
        missing = [prefix + "weight." + k for k in needed if prefix + "weight." + k not in state_dict]
        if missing:
            raise ValueError(f"{where}: quant state incomplete, missing {missing}")
        n_blocks = -(-n // meta["blocksize"])
        absmax = state_dict[prefix + "weight.absmax"]
        if absmax.numel() != n_blocks:
            raise ValueError(f"{where}: weight.absmax has {absmax.numel()} values, a {shape} weight in blocks of "
                             f"{meta['blocksize']} needs {n_blocks}")
        if nested and state_dict[prefix + "weight.nested_absmax"].numel() != -(-n_blocks // meta["nested_blocksize"]):
            raise ValueError(f"{where}: weight.nested_absmax does not match {n_blocks} absmax values "
                             f"in blocks of {meta['nested_blocksize']}")
        if (self.bias is not None) != (prefix + "bias" in state_dict):
            raise ValueError(f"{where}: bias {'missing from' if self.bias is not None else 'unexpected in'} the state dict")

        device = self.weight.device
        self.quant_type, self.blocksize = meta["quant_type"], meta["blocksize"]
        self.weight_dtype = getattr(torch, meta["dtype"])
        self.weight = nn.Parameter(packed.to(device).reshape(-1, 1), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(state_dict[prefix + "bias"].to(device, self.bias.dtype), requires_grad=False)
        for name in _STATE_BUFFERS:
            self._buffers[name] = state_dict[prefix + "weight." + name].to(device) if name in needed else None
        self._buffers["offset"] = (torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device)
                                   if nested else None)
        self._decode_absmax()
        own = {prefix + "weight", prefix + "bias"} | set(meta_keys)
        own |= {prefix + "weight." + k for k in _STATE_BUFFERS}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own
                                   and "." not in k[len(prefix):])
