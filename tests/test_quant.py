"""quant/: NF4 and FP4 from scratch equal bitsandbytes byte for byte; Linear4bit and quantize_model behave."""
import collections
import itertools
from dataclasses import replace
import json
import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from quant.nf4 import unpack_4bit

from quant import (
    DYNAMIC_CODE,
    FP4_CODE,
    NF4_CODE,
    Linear4bit,
    QuantState,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    quantize_4bit,
    quantize_fp4,
    quantize_model,
    quantize_nf4,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sizes not multiples of 64 or 256, one element, and one exact multiple of 64
SHAPES = [(3, 100), (257, 129), (1, 1), (128, 64)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# QLoRA §3 / bitsandbytes' NF4 table
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def weight(shape, dtype, device, seed=0) -> torch.Tensor:
    """Normal weights with an all-zero block, an outlier and mixed block scales: every path of the kernels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    if flat.numel() > 192:
        flat[64:128] = 0.0  # a block whose absmax is 0
        flat[130] = 0.5  # an outlier sets its block's scale
        flat[192:] *= 30.0  # blocks of larger scale
    return w.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- code books

def test_nf4_code_is_derived_from_normal_quantiles_and_equals_bitsandbytes():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.equal(NF4_CODE, torch.tensor(NF4_TABLE))  # to the bit
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0


def test_fp4_and_dynamic_code_maps_equal_bitsandbytes():
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map())


def test_two_codes_per_byte_first_in_the_high_nibble():
    # one block holding each NF4 value in turn: its absmax is 1, so the indices are 0..15
    packed, state = quantize_nf4(NF4_CODE.clone(), blocksize=64, double_quant=False)
    assert packed.flatten().tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert state.absmax.tolist() == [1.0]


# ----------------------------------------------------------------------------- bytes equal bitsandbytes

def as_our_state(ref: bnbF.QuantState) -> QuantState:
    """bitsandbytes' QuantState as ours, to run our dequantizer on its output."""
    nested = ref.state2 is not None
    return QuantState(absmax=ref.absmax, shape=ref.shape, dtype=ref.dtype, blocksize=ref.blocksize,
                      quant_type=ref.quant_type, code=ref.code, offset=ref.offset if nested else None,
                      nested_absmax=ref.state2.absmax if nested else None,
                      nested_code=ref.state2.code if nested else None)


def assert_equal_but_fp16_ties(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """ours == ref, except that for fp16 a value exactly halfway between two fp16 numbers may round either way.

    exact: the fp32 product code * absmax both were rounded from. bitsandbytes' CPU kernel rounds such
    ties to even on some processors and away from zero on others (seen on a Xeon with AVX512-FP16).
    """
    differ = ours != ref
    if ours.dtype != torch.float16 or not differ.any():
        assert torch.equal(ours, ref)
        return
    e, a, b = exact[differ].double(), ours[differ].double(), ref[differ].double()
    assert torch.equal((e - a).abs(), (b - e).abs()), "fp16 values differ by more than the rounding of a tie"


def assert_same_as_bitsandbytes(w: torch.Tensor, quant_type: str, double_quant: bool) -> None:
    """On the CPU: every byte, scale, code map and dequantized value equals bitsandbytes'.

    On CUDA, bitsandbytes' kernels take their own near-tie decisions (a decision tree on the
    scaled value, exact binary search for the 8-bit absmax codes, all-zero blocks stored as code 0),
    so there the reference must agree on all but a sliver of codes, and our dequantizer must
    read the CUDA kernels' output to exactly the same values.
    """
    packed, state = quantize_4bit(w, 64, double_quant, quant_type)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert state.absmax.dtype == ref.absmax.dtype  # fp32 scales, or uint8 codes with double quant
    assert torch.equal(state.code, ref.code)
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
        assert torch.equal(state.nested_code, ref.state2.code)
        assert state.nested_blocksize == ref.state2.blocksize == 256
    ref_w_hat = bnbF.dequantize_4bit(ref_packed, ref).reshape(w.shape)
    exact = dequantize_4bit(ref_packed, replace(as_our_state(ref), dtype=torch.float32))
    assert_equal_but_fp16_ties(dequantize_4bit(ref_packed, as_our_state(ref)), ref_w_hat, exact)
    w_hat = dequantize_4bit(packed, state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    if w.device.type == "cpu":
        assert torch.equal(packed, ref_packed)
        assert torch.equal(state.absmax, ref.absmax)
        assert_equal_but_fp16_ties(w_hat, ref_w_hat, exact)
    else:
        n = w.numel()
        blocks = torch.nn.functional.pad(w.reshape(-1).float(), (0, -n % 64)).view(-1, 64)
        nonzero_blocks = torch.repeat_interleave(blocks.abs().amax(1) != 0, 64)[:n]
        differ = unpack_4bit(packed, n) != unpack_4bit(ref_packed, n)  # (n,) codes, padding nibble left out
        assert differ[nonzero_blocks].float().mean() < 0.02
        assert (state.absmax != ref.absmax).float().mean() < 0.02
        if not double_quant:
            assert torch.equal(state.absmax, ref.absmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_bytes_and_values_equal_bitsandbytes(device, double_quant, dtype, shape):
    w = weight(shape, dtype, device)
    assert_same_as_bitsandbytes(w, "nf4", double_quant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp4_bytes_and_values_equal_bitsandbytes(device, double_quant, dtype, shape):
    w = weight(shape, dtype, device, seed=1)
    assert_same_as_bitsandbytes(w, "fp4", double_quant)


def test_nf4_and_fp4_functions_quantize_as_bitsandbytes_and_refuse_the_other_type():
    w = weight((3, 101), torch.float32, "cpu")
    for quantize, dequantize, kind, other in ((quantize_nf4, dequantize_nf4, "nf4", dequantize_fp4),
                                              (quantize_fp4, dequantize_fp4, "fp4", dequantize_nf4)):
        packed, state = quantize(w)
        ref_packed, ref = bnbF.quantize_4bit(w, compress_statistics=True, quant_type=kind)
        assert torch.equal(packed, ref_packed)
        assert torch.equal(dequantize(packed, state), bnbF.dequantize_4bit(ref_packed, ref))
        with pytest.raises(ValueError, match="use dequantize_4bit"):
            other(packed, state)


@pytest.mark.parametrize("device", DEVICES)
def test_many_random_tensors_equal_bitsandbytes(device):
    # near-ties between codes are where a careless rounding shows: try many values
    for seed, (shape, dtype) in enumerate(itertools.product([(300, 1000), (77, 333)], DTYPES)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        assert_same_as_bitsandbytes(w, "nf4", double_quant=True)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = weight((70, 130), torch.float32, "cpu", seed=2)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    ref_packed, ref = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(ref_packed, ref))


def test_error_is_within_half_a_code_gap_of_each_block_scale():
    # closed form: |w - w_hat| <= absmax * (largest gap between neighbouring codes) / 2
    w = weight((257, 129), torch.float32, "cpu")
    packed, state = quantize_nf4(w, double_quant=False)
    err = (w - dequantize_nf4(packed, state)).reshape(-1)
    err = torch.nn.functional.pad(err, (0, -err.numel() % 64)).view(-1, 64).abs().amax(1)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    assert torch.all(err <= state.absmax * half_gap * (1 + 1e-6))


def test_double_quant_costs_about_0_127_bits_per_weight():
    w = torch.randn(1024, 1024)
    for double_quant, expected in [(False, 4 + 32 / 64), (True, 4 + 8 / 64 + 32 / (64 * 256))]:
        packed, state = quantize_nf4(w, double_quant=double_quant)
        bits = 8 * (packed.numel() + state.nbytes()) / w.numel()
        assert bits == pytest.approx(expected, abs=1e-4)  # + one fp32 offset


# ----------------------------------------------------------------------------- Linear4bit

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_is_x_times_dequantized_weight(device, compute_dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(130, 70, bias=bias).to(device)
    if bias:  # a bias well above every tolerance below: leaving it out must fail
        with torch.no_grad():
            linear.bias.copy_(torch.linspace(-3.0, 3.0, 70))
        assert linear.bias.abs().max() > 10 * TOL[compute_dtype] * 10
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype)
    assert (layer.in_features, layer.out_features, layer.compute_dtype) == (130, 70, compute_dtype)
    x = torch.randn(3, 5, 130, device=device, requires_grad=True)
    y = layer(x)
    w_hat = layer.dequantize()
    assert w_hat.shape == (70, 130) and w_hat.dtype == compute_dtype
    ref = x.detach().double() @ w_hat.double().T + (linear.bias.double() if bias else 0)
    assert y.shape == (3, 5, 70) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, atol=TOL[compute_dtype] * 10, rtol=TOL[compute_dtype])

    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None and layer.weight.grad is None and not layer.weight.requires_grad
    torch.testing.assert_close(x.grad.double(), g.double() @ w_hat.double(), atol=TOL[compute_dtype] * 10,
                               rtol=TOL[compute_dtype])
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_dequantize_equals_the_reference(quant_type):
    w = weight((70, 130), torch.bfloat16, "cpu")
    layer = Linear4bit.from_weight(w, quant_type=quant_type, compute_dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, 64, True, quant_type)
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))


def test_compute_dtype_defaults_to_fp32_on_cpu():
    layer = Linear4bit.from_weight(torch.randn(8, 64))
    assert layer.compute_dtype == torch.float32


@CUDA
def test_to_device_moves_weight_and_whole_quant_state():
    torch.manual_seed(0)
    linear = nn.Linear(130, 70)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(4, 130)
    y_cpu = layer(x)
    layer.to("cuda")
    tensors = [layer.weight, layer.bias, layer.absmax, layer.quant_map, layer.nested_absmax,
               layer.nested_quant_map, layer.offset]
    assert all(t.device.type == "cuda" for t in tensors)
    assert layer.compute_dtype == torch.bfloat16  # the default follows the device
    y = layer(x.cuda())
    torch.testing.assert_close(y.float().cpu(), y_cpu, atol=0.1, rtol=0.02)
    layer.compute_dtype = torch.float32
    torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    layer.to("cpu")
    torch.testing.assert_close(layer(x), y_cpu, atol=1e-5, rtol=1e-5)


def test_casting_a_model_keeps_the_quant_state_exact():
    layer = Linear4bit.from_weight(weight((70, 130), torch.float32, "cpu"))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert layer.offset.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_state_dict_round_trips_through_safetensors(tmp_path, quant_type, double_quant):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(130, 70), quant_type=quant_type, double_quant=double_quant)
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))
    loaded = load_file(str(path))

    fresh = Linear4bit.from_linear(nn.Linear(130, 70), quant_type=quant_type, double_quant=double_quant)
    fresh.load_state_dict(loaded)
    x = torch.randn(4, 130)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())

    # the layout is bitsandbytes' own: its QuantState.from_dict reads it and dequantizes the same weight
    qs = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in loaded.items() if k.startswith("weight.")},
                                   device="cpu")
    assert torch.equal(bnbF.dequantize_4bit(loaded["weight"], qs), layer.dequantize())


def test_quantize_model_replaces_linears_and_reports_bits(tiny_config):
    from model import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_weights = sum(m.weight.numel() for n, m in linears.items() if n != "lm_head")
    report = quantize_model(model)
    assert report.layers_replaced == len(linears) - 1 and report.layers_skipped == ["lm_head"]
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == len(linears) - 1
    assert report.params_quantized == n_weights and report.bytes_before == 4 * n_weights

    # closed form per layer: packed bytes + one absmax code per 64 + one fp32 per 256 codes + fp32 offset
    def layer_bytes(n):
        blocks = math.ceil(n / 64)
        return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    expected = sum(layer_bytes(m.weight.numel()) for n, m in linears.items() if n != "lm_head")
    assert report.bytes_after == expected
    assert report.bits_per_param == pytest.approx(8 * expected / n_weights)
    assert "bits per parameter" in str(report)


def test_quantized_model_computes_with_the_dequantized_weights(tiny_config):
    from model import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    quantize_model(model)
    logits = model(ids)
    # reference: the same architecture with every quantized layer as a plain nn.Linear of W_hat
    reference = Llama(tiny_config).eval()
    state = {k: v for k, v in reference.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            state[name + ".weight"] = m.dequantize()
        elif name and not any(True for _ in m.children()):
            for k, v in m.state_dict().items():
                state[f"{name}.{k}"] = v
    reference.load_state_dict(state)
    torch.testing.assert_close(logits, reference(ids), atol=1e-4, rtol=1e-4)


def test_quantized_model_state_dict_round_trips_through_safetensors(tmp_path, tiny_config):
    from model import Llama

    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    quantize_model(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))

    torch.manual_seed(1)
    other = Llama(tiny_config).eval()
    quantize_model(other)
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    assert torch.equal(other(ids), model(ids))


# ----------------------------------------------------------------------------- bad input

def test_weight_that_is_not_2d_is_refused():
    with pytest.raises(ValueError, match=r"2-D weight.*\(2, 3, 64\)"):
        Linear4bit.from_weight(torch.randn(2, 3, 64))


@pytest.mark.parametrize("blocksize", [48, 100, 16, 8192])
def test_unsupported_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize}"):
        quantize_nf4(torch.randn(8, 64), blocksize=blocksize)
    with pytest.raises(ValueError, match=f"blocksize {blocksize}"):
        Linear4bit.from_weight(torch.randn(8, 64), blocksize=blocksize)


def test_state_dict_without_quant_state_is_refused():
    layer = Linear4bit.from_weight(torch.randn(70, 130))
    sd = layer.state_dict()
    no_meta = {k: v for k, v in sd.items() if "quant_state" not in k}
    with pytest.raises(ValueError, match="no 4-bit quant state"):
        Linear4bit.from_weight(torch.randn(70, 130)).load_state_dict(no_meta)
    no_absmax = {k: v for k, v in sd.items() if k != "weight.absmax"}
    with pytest.raises(ValueError, match="missing.*weight.absmax"):
        Linear4bit.from_weight(torch.randn(70, 130)).load_state_dict(no_absmax)
    plain = nn.Linear(130, 70).state_dict()  # a full-precision layer's state dict
    with pytest.raises(ValueError, match="no 4-bit quant state"):
        Linear4bit.from_weight(torch.randn(70, 130)).load_state_dict(plain)


def test_state_dict_for_another_shape_is_refused():
    sd = Linear4bit.from_weight(torch.randn(70, 130)).state_dict()
    with pytest.raises(ValueError, match=r"shape \(70, 130\).*\(64, 130\)"):
        Linear4bit.from_weight(torch.randn(64, 130)).load_state_dict(sd)
    meta_key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[meta_key].tolist()))
    sd_bad = dict(sd)
    sd_bad["weight.absmax"] = sd["weight.absmax"][:-3]  # scales of a smaller weight
    with pytest.raises(ValueError, match="weight.absmax has"):
        Linear4bit.from_weight(torch.randn(70, 130)).load_state_dict(sd_bad)
    assert meta["shape"] == [70, 130]


def test_other_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(4, 64), quant_type="int4")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.randint(0, 3, (4, 64)))
    with pytest.raises(ValueError, match="last dimension 64"):
        Linear4bit.from_weight(torch.randn(8, 64))(torch.randn(2, 32))


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def smollm2_quantized(smollm2):
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)  # the session's model stays fp32 for the other tests
    report = quantize_model(model)
    return model, tok, report


def test_smollm2_nf4_still_answers_paris(smollm2_quantized):
    model, tok, report = smollm2_quantized
    ids = torch.tensor([tok.encode("The capital of France is", bos=True)])
    out = model.generate(ids, max_new_tokens=3)
    text = tok.decode(out[0, ids.shape[1]:].tolist())
    assert text.startswith(" Paris"), text


def test_smollm2_linear_weights_take_about_4_127_bits(smollm2_quantized):
    model, _, report = smollm2_quantized
    print(f"\nSmolLM2-135M after quantize_model: {report}\n  bits per parameter: {report.bits_per_param:.4f}")
    n_layers = model.config.num_hidden_layers
    assert report.layers_replaced == 7 * n_layers
    assert report.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)


# ----------------------------------------------------------------------- one dequantization per use
class OpCount(TorchDispatchMode):
    """Counts the compute ops dispatched inside it by name (views are not counted). A bitsandbytes
    4-bit GEMM is one op; whether it is asked to decode nested scales (absmax_8bit given) is noted
    as "gemm_4bit nested"."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        if not func.is_view:
            self.ops[name] += 1
        if name == "bitsandbytes.gemm_4bit" and (kwargs or {}).get("absmax_8bit") is not None:
            self.ops["gemm_4bit nested"] += 1
        return func(*args, **(kwargs or {}))


DECODE_OPS = ("bitsandbytes.dequantize_blockwise", "aten.add", "aten.add_", "gemm_4bit nested")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_weight_is_dequantized_by_one_op_per_use(quant_type):
    """Forward, backward and dequantize() each run bitsandbytes' dequantize_4bit once and decode no
    nested scale: those are decoded once, at build or load."""
    torch.manual_seed(0)
    layer = Linear4bit.from_weight(torch.randn(96, 128), quant_type=quant_type, double_quant=True)
    x = torch.randn(5, 128, requires_grad=True)
    with OpCount() as forward:
        y = layer(x)
    with OpCount() as backward:
        y.backward(torch.randn_like(y))
    with OpCount() as dequantize:
        layer.dequantize()
    assert dequantize.ops == {"bitsandbytes.dequantize_4bit": 1}
    assert forward.ops == {"bitsandbytes.gemm_4bit": 1}  # dequantize and multiply, flat fp32 scales
    assert backward.ops["bitsandbytes.dequantize_4bit"] == 1 and not any(backward.ops[k] for k in DECODE_OPS)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decoded_scales_give_the_nested_states_outputs_bit_for_bit(quant_type, compute_dtype):
    """The layer's forward, input gradient and dequantize() equal bitsandbytes' own run on the
    nested (double-quantized) state, which decodes the scales at every use."""
    import bitsandbytes

    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 96), quant_type=quant_type, compute_dtype=compute_dtype)
    nested = layer.quant_state
    assert nested.nested and layer.decoded_absmax.dtype == torch.float32
    x = torch.randn(7, 128, dtype=compute_dtype, requires_grad=True)
    dy = torch.randn(7, 96, dtype=compute_dtype)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = x.detach().requires_grad_()
    y_ref = bitsandbytes.matmul_4bit(x_ref, layer.weight, nested, bias=layer.bias.to(compute_dtype))
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert torch.equal(layer.dequantize(), bnbF.dequantize_4bit(layer.weight, nested).to(compute_dtype))
    assert "weight.decoded_absmax" not in layer.state_dict()  # memory only: the saved layout is bitsandbytes'
