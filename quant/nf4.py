"""4-bit NormalFloat (NF4) and 4-bit float (FP4) quantization in plain torch.

QLoRA (Dettmers et al. 2023, §3) stores the frozen base weights in NF4:

1. Split the flattened weight into blocks of `blocksize` (64) values. Each block
   keeps one fp32 scale, its absolute maximum (absmax).
2. Divide every weight by its block's absmax, so it lies in [-1, 1], and replace
   it by the index (0..15) of the nearest of 16 code values.
3. Pack two indices per byte, the first in the high nibble.
4. Double quantization: the fp32 absmax values themselves cost 32/64 = 0.5 bits
   per weight. Subtract their mean and quantize them again, to 8-bit codes in
   blocks of 256 with bitsandbytes' dynamic 8-bit code map. That leaves
   8/64 + 32/(64*256) ≈ 0.127 bits per weight for the scales: about 4.127 in all.

Every rounding step here follows bitsandbytes' CPU backend (`quantize_4bit`,
`dequantize_4bit`), so the bytes are identical and this module can be read as the
specification of what those kernels compute. Its CUDA kernels agree on every scale and
on all but a sliver of codes: they settle values within a rounding error of a midpoint
between two codes their own way, and store an all-zero block as code 0 rather than as
the code of 0.0 (both dequantize to 0).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 absmax values
NF4_OFFSET = 0.9677083  # outermost quantile of N(0,1) that NF4 keeps (QLoRA §3, bitsandbytes)


# ----------------------------------------------------------------------------- code books

def normal_float_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), normalised to [-1, 1], with an exact 0.

    The codes are spaced by equal shares of a normal distribution's mass. Weights do not use
    them equally often, though: each block of 64 is divided by its own absmax first, so its
    largest value always lands on ±1 and the rest crowd towards 0. Measured
    (`bench/nf4_code_shares.py`): N(0, 1) blocks use the codes from 1.7% (the outermost) to
    9.2% (those next to 0) of the time, SmolLM2-135M's weights from 1.8% to 9.8%. The positive side takes
    8 quantiles of p in [0.5, offset] (0.5 itself excluded), the negative side 7, and 0 is
    added so that zero padding and zero weights stay exact: 8 + 7 + 1 = 16.

    Returns: (16,) float32, sorted ascending.
    """
    # bitsandbytes spaces the probabilities in fp32 and evaluates the quantiles in fp64
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()  # (8,)
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double()  # (7,)
    positive = torch.special.ndtri(p_pos)
    negative = -torch.special.ndtri(p_neg)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def float4_code() -> torch.Tensor:
    """The 16 FP4 values in bit-pattern order: 1 sign, 2 exponent, 1 mantissa bit.

    Index bits `s e1 e0 m`. Exponent field 0 is subnormal (m * 0.0625); otherwise the value
    is (1 + m/2) * 2**(4 - e), so larger exponent fields give *smaller* values, as in
    bitsandbytes' table. The 16 values are divided by their largest magnitude (12).

    Returns: (16,) float32, indexed by the 4-bit code (not sorted).
    """
    values = []
    for sign in (1.0, -1.0):
        for e in range(4):
            for m in range(2):
                magnitude = m * 0.0625 if e == 0 else (1 + m / 2) * 2.0 ** (4 - e)
                values.append(sign * magnitude)
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()


def dynamic_8bit_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code map (Dettmers 2015), used for double quantization.

    Each code is a sign, a run of zeros that sets a power of ten (10^-6 .. 10^0), an
    indicator bit, and a linear fraction in the remaining bits: many codes near zero and
    fewer near ±1. Plus 0 and 1.0. Returns: (256,) float32, sorted ascending.
    """
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # (fraction_items - 1,) float32
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


NF4_CODE = normal_float_code()
FP4_CODE = float4_code()
DYNAMIC_CODE = dynamic_8bit_code()
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


# ----------------------------------------------------------------------------- quant state

@dataclass
class QuantState:
    """Everything needed to undo `quantize_4bit` besides the packed bytes.

    absmax: (n_blocks,) float32 scales, or their uint8 codes when `nested`.
    Double quantization adds `offset` (the subtracted mean, 0-dim float32),
    `nested_absmax` ((ceil(n_blocks/256),) float32) and `nested_code` ((256,) float32).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def nbytes(self) -> int:
        """Bytes of the scales (absmax, or its codes plus the nested scales and offset)."""
        tensors = [self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------- blockwise helpers

def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """Zero-pad the flat x to whole blocks. Returns ((n_blocks, blocksize), n)."""
    n = x.numel()
    pad = -n % blocksize
    return torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize), n


LUT_SIZE = 65536  # grid points over [-1, 1] for the 8-bit nearest-code lookup


def _nearest_code_on_grid(normed: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Nearest code of each value in [-1, 1], as bitsandbytes' 8-bit CPU kernel finds it.

    Rather than search 256 codes per value, the kernel rounds the value to one of 65536
    evenly spaced grid points and reads a table that holds, for each grid point, the first
    code whose midpoint with the next code is not below it. The answer is the nearest code
    except within half a grid step (1.5e-5) of a midpoint; we follow it to get the same bytes.
    All arithmetic is float32, as in the kernel.
    """
    midpoints = (sorted_code[:-1] + sorted_code[1:]) * 0.5  # (255,)
    i = torch.arange(LUT_SIZE, dtype=torch.float32, device=normed.device)
    grid = -1.0 + (2.0 * i) / (LUT_SIZE - 1)  # (65536,)
    table = torch.bucketize(grid, midpoints)  # code index of each grid point
    grid_index = ((normed.clamp(-1, 1) + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()  # truncation, as a C cast
    return table[grid_index]


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat float32 tensor (used for the absmax values).

    x: (n,) float32. Returns (codes (n,) uint8, absmax (ceil(n/blocksize),) float32).
    A block whose absmax is 0 stores code 0 everywhere: any code times a zero scale is 0.
    """
    blocks, n = _blocks(x.float(), blocksize)  # (nb, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    normed = blocks * (1.0 / absmax)[:, None]  # (nb, blocksize)
    idx = _nearest_code_on_grid(normed.nan_to_num(0.0), code.to(x.device))
    idx = torch.where(absmax[:, None] == 0, torch.zeros_like(idx), idx)
    return idx.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: code[c] * absmax of its block. Returns (n,) float32."""
    values, n = _blocks(code.to(codes.device)[codes.long()], blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


def _check_args(w: torch.Tensor, blocksize: int, quant_type: str) -> None:
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported by bitsandbytes; use one of {SUPPORTED_BLOCKSIZES}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")


# ----------------------------------------------------------------------------- 4-bit quantize / dequantize

def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization of any float tensor (NF4 or FP4).

    w: any shape, float32/float16/bfloat16, flattened in row-major order.
    Returns (packed ((numel+1)//2, 1) uint8, QuantState) — the layout of bitsandbytes.
    """
    _check_args(w, blocksize, quant_type)
    code = CODES[quant_type].to(w.device)
    blocks, n = _blocks(w.detach().reshape(-1).float(), blocksize)  # (nb, blocksize); zeros pad the tail block
    absmax = blocks.abs().amax(dim=1)  # (nb,) float32
    # Whole blocks are scaled by the reciprocal, the tail block by a division: bitsandbytes
    # does exactly this, and the two can differ in the last bit.
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = blocks * inv[:, None]
    if n % blocksize:
        # ... and only the tail block keeps its clamped scale (so an all-zero tail stores 1e-38)
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    # an odd count keeps one padded zero, so that every byte holds two codes
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n + n % 2]

    # Nearest code through the midpoints of the sorted code; a value exactly on a
    # midpoint goes to the lower code (torch.bucketize with right=False).
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    idx = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)  # 0..15; NF4's order is the identity
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)  # first index in the high nibble

    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code.clone())
    if double_quant:
        offset = absmax.mean()
        nested_code = DYNAMIC_CODE.to(w.device, copy=True)
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state = replace(state, absmax=qabsmax, offset=offset, nested_absmax=nested_absmax, nested_code=nested_code)
    return packed, state


def block_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 scale of every block, undoing double quantization if used. Returns (n_blocks,)."""
    if not state.nested:
        return state.absmax.float()
    absmax = dequantize_blockwise_8bit(state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize)
    return absmax + state.offset


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Split each byte into its two 4-bit indices, high nibble first. Returns (n,) int64."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # (2 * bytes,)
    return idx[:n].long()


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """w_hat = code[index] * absmax of its block, in fp32, then cast to the original dtype.

    Returns a tensor of `state.shape` and `state.dtype`.
    """
    n = state.shape.numel()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed weight has {packed.numel()} bytes but the quant state's shape {tuple(state.shape)} "
            f"needs {(n + 1) // 2}"
        )
    values = state.code.to(packed.device)[unpack_4bit(packed, n)]  # (n,) float32
    blocks, _ = _blocks(values, state.blocksize)  # (nb, blocksize)
    w = (blocks * block_absmax(state)[:, None]).reshape(-1)[:n]
    return w.to(state.dtype).reshape(state.shape)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """NF4-quantize w (any shape). Returns (packed ((numel+1)//2, 1) uint8, QuantState)."""
    return quantize_4bit(w, blocksize, double_quant, "nf4")


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo `quantize_nf4`. Returns a tensor of the original shape and dtype."""
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 got a {state.quant_type!r} quant state; use dequantize_4bit")
    return dequantize_4bit(packed, state)


def quantize_fp4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """FP4-quantize w (any shape). Returns (packed ((numel+1)//2, 1) uint8, QuantState)."""
    return quantize_4bit(w, blocksize, double_quant, "fp4")


def dequantize_fp4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo `quantize_fp4`. Returns a tensor of the original shape and dtype."""
    if state.quant_type != "fp4":
        raise ValueError(f"dequantize_fp4 got a {state.quant_type!r} quant state; use dequantize_4bit")
    return dequantize_4bit(packed, state)
