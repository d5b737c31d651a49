"""lora/fused.py: the hand-written LoRA backward (LoRAProjections) against autograd through the plain path.

The reference is the same LoRALinears with `handwritten_backward = False`: today's autograd path.
Same seed, same dropout masks, the random stream left where the plain path leaves it; outputs equal
to the bit where the fused forward makes the plain path's ops (dropout on, or k = 1), within
1e-6 (fp32) where it stacks the k adapters into one product; gradients within 1e-6 (fp32) or bf16
rounding. In the course preset's precision (a bf16 model under bf16 autocast, fp32 LoRA weights)
the fused function runs too, against the plain path under the same autocast.
"""
import contextlib

import pytest
import torch
from torch import nn

from conftest import tiny_hf_config
from lora import LoRAConfig, LoRALinear, apply_lora
from lora.fused import FusedProjection, LoRAProjections, lora_projections
from model import Llama, LlamaConfig
from quant import Linear4bit, quantize_model

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# fp32: 1e-6 relative to the gradient's size; bf16: a few units of its rounding (2^-8 relative)
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -6}
# a whole model's LoRA gradients, two layers deep: 16 units of rounding (2^-9 in bf16, 2^-11 in fp16) of the largest
MODEL_TOL = {torch.bfloat16: 2 ** -5, torch.float16: 2 ** -7}


def set_handwritten(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "handwritten_backward"):
            m.handwritten_backward = enabled


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = want.abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item() / scale
    assert err <= TOL[dtype], f"{what}: max error {err:.2e} of its size, allowed {TOL[dtype]:.0e}"


def projections(base: str, k: int, dropout: float, bias: bool, dtype: torch.dtype) -> list[LoRALinear]:
    """k LoRALinears on one input of 64 features: distinct widths, ranks and scalings, B non-zero."""
    torch.manual_seed(0)
    layers = []
    for out, r, alpha in [(48, 4, 8), (16, 2, 8), (24, 8, 8)][:k]:
        linear = nn.Linear(64, out, bias=bias)
        if base == "linear":
            frozen = linear.to(dtype)
        else:
            frozen = Linear4bit.from_linear(linear, quant_type=base, double_quant=True, compute_dtype=dtype)
        layer = LoRALinear(frozen, r=r, alpha=alpha, dropout=dropout).train()
        nn.init.normal_(layer.lora_B.weight, std=0.1)
        layers.append(layer)
    return layers


def run(layers, x, dys, handwritten: bool, seed: int = 7):
    """Outputs, gradients of x and every A and B, the graph's output node and the RNG state after."""
    for layer in layers:
        layer.handwritten_backward = handwritten
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    ys = lora_projections(x, layers) if handwritten else tuple(layer(x) for layer in layers)
    weights = [w for layer in layers for w in (layer.lora_A.weight, layer.lora_B.weight)]
    grads = torch.autograd.grad(ys, [x, *weights], dys)
    return ys, grads, ys[0].grad_fn.name(), torch.get_rng_state()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("base,bias", [("linear", True), ("linear", False), ("nf4", True), ("fp4", False)])
def test_lora_projections_equal_autograd_through_the_plain_path(base, bias, k, dropout, dtype):
    layers = projections(base, k, dropout, bias, dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    dys = [torch.randn(3, 5, layer.out_features, dtype=dtype) for layer in layers]
    ys, grads, node, rng = run(layers, x, dys, handwritten=True)
    ys_ref, grads_ref, node_ref, rng_ref = run(layers, x, dys, handwritten=False)
    assert node == "LoRAProjectionsBackward" and node_ref != node  # each side took its own path
    for y, y_ref in zip(ys, ys_ref):
        if dropout or k == 1:
            assert torch.equal(y, y_ref)  # the same calls, the same dropout draws: equal to the bit
        else:
            assert_close(y, y_ref, dtype, "y")  # x [A_1; ...; A_k]^T: one product, summed in its own order
    assert torch.equal(rng, rng_ref)  # and the random stream left at the same place: resume stays exact
    names = ["x"] + [f"{w}{i}" for i in range(k) for w in ("A", "B")]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, f"d{name}")


def test_dropout_masks_are_the_plain_paths_draws():
    """With dropout on, the fused outputs differ from the dropout-free ones (masks are drawn) and
    equal the plain path's for the same seed, for each of q, k, v in turn; another seed differs."""
    layers = projections("linear", 3, 0.5, True, torch.float32)
    x = torch.randn(4, 64)
    dys = [torch.randn(4, layer.out_features) for layer in layers]
    ys, *_ = run(layers, x, dys, handwritten=True, seed=1)
    ys_ref, *_ = run(layers, x, dys, handwritten=False, seed=1)
    ys_other, *_ = run(layers, x, dys, handwritten=True, seed=2)
    for layer in layers:
        layer.eval()
    ys_eval, *_ = run(layers, x, dys, handwritten=True, seed=1)
    for y, y_ref, y_other, y_eval in zip(ys, ys_ref, ys_other, ys_eval):
        assert torch.equal(y, y_ref) and not torch.equal(y, y_other) and not torch.equal(y, y_eval)


def tiny(nf4: bool, dropout: float, dtype=torch.float32, **overrides) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config(**overrides))).to(dtype)
    if nf4:
        quantize_model(model, compute_dtype=dtype)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=ALL_SEVEN, seed=1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model.train()


def logits_and_grads(model: Llama, handwritten: bool, autocast: torch.dtype | None = None):
    """Logits, every LoRA gradient and the graph's node names; the forward pass under `autocast` if
    given, the backward pass outside it, as train() runs them."""
    set_handwritten(model, handwritten)
    torch.manual_seed(3)
    device = model.lm_head.weight.device
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        logits = model(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = logits.float().logsumexp(-1).mean()
    seen, stack = set(), [loss.grad_fn]
    while stack:  # every node of the graph
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return logits, torch.autograd.grad(loss, params), {node.name() for node in seen}


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_tiny_llama_with_lora_on_all_seven_fused_equals_plain(nf4, dropout):
    model = tiny(nf4, dropout, attention_bias=True)
    keys = list(model.state_dict())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.project_qkv, FusedProjection) and isinstance(mlp.project_gate_up, FusedProjection)
    logits, grads, nodes = logits_and_grads(model, True)
    logits_ref, grads_ref, nodes_ref = logits_and_grads(model, False)
    if dropout:
        assert torch.equal(logits, logits_ref)
    else:
        assert_close(logits, logits_ref, torch.float32, "logits")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, torch.float32, "a LoRA gradient")
    # every adapted product ran inside the fused functions, none in autograd's addmm
    assert "LoRAProjectionsBackward" in nodes and "AddmmBackward0" not in nodes
    assert "LoRAProjectionsBackward" not in nodes_ref
    assert list(model.state_dict()) == keys  # names and keys untouched: PEFT's layout holds


def test_fused_projections_count_one_per_shared_input(monkeypatch):
    """Per decoder layer: one function for q, k, v (k = 3), one for gate, up (k = 2), one each for o and down."""
    model = tiny(True, 0.0)
    calls = []
    real = LoRAProjections.apply
    monkeypatch.setattr(LoRAProjections, "apply", lambda x, layers, *w: calls.append(len(layers)) or real(x, layers, *w))
    model(torch.randint(0, 128, (1, 5))).sum().backward()
    assert calls == [3, 1, 2, 1] * model.config.num_hidden_layers


def test_bf16_tiny_llama_fused_equals_plain_within_rounding():
    model = tiny(True, 0.1, dtype=torch.bfloat16)
    logits, grads, _ = logits_and_grads(model, True)
    logits_ref, grads_ref, _ = logits_and_grads(model, False)
    assert torch.equal(logits, logits_ref)  # with dropout: the plain path's calls
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32  # the fp32 master copies receive fp32 gradients
        err = (g - g_ref).abs().max().item() / g_ref.abs().max().item()
        assert err <= MODEL_TOL[torch.bfloat16], f"a LoRA gradient: max error {err:.2e} of the largest"


def test_without_gradients_or_merged_the_plain_path_runs(monkeypatch):
    model = tiny(False, 0.0)
    ids = torch.randint(0, 128, (1, 6))
    calls = []
    real = LoRAProjections.apply
    monkeypatch.setattr(LoRAProjections, "apply", lambda x, layers, *w: calls.append(len(layers)) or real(x, layers, *w))
    with torch.no_grad():
        out = model(ids)
    assert calls == []
    set_handwritten(model, False)
    assert torch.equal(out, model(ids)) and calls == []
    set_handwritten(model, True)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x)
    assert calls == [1]
    layer.merge()
    layer(x)
    assert calls == [1]


def test_checkpointed_layers_redraw_the_same_dropout_and_give_the_same_gradients():
    """Checkpointing recomputes each layer's forward pass in the backward pass: the fused function
    draws its dropout masks again from the restored random state, so the gradients are unchanged."""
    model = tiny(True, 0.1)
    _, grads, _ = logits_and_grads(model, True)
    model.set_gradient_checkpointing(True)
    _, grads_ckpt, nodes = logits_and_grads(model, True)
    assert "LoRAProjectionsBackward" in nodes
    for g, g_ref in zip(grads_ckpt, grads):
        assert torch.equal(g, g_ref)


# ------------------------------------------------------------------------ the course preset's precision
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_preset_precision_takes_the_fused_path_with_the_plain_paths_gradients(dtype, dropout, device):
    """The preset: a bf16 model, NF4 computing in bf16, fp32 LoRA, the forward pass under bf16 autocast
    (fp16 alike, for GPUs without bf16). Autocast's dtype is x's, so the fused function runs; every
    LoRA gradient equals the plain path's under the same autocast within rounding (`MODEL_TOL`)."""
    model = tiny(True, dropout, dtype=dtype).to(device)
    logits, grads, nodes = logits_and_grads(model, True, autocast=dtype)
    logits_ref, grads_ref, nodes_ref = logits_and_grads(model, False, autocast=dtype)
    assert "LoRAProjectionsBackward" in nodes and "AddmmBackward0" not in nodes
    assert "LoRAProjectionsBackward" not in nodes_ref
    assert logits.dtype == dtype
    if dropout:  # the plain path's ops on the same inputs: the same logits
        assert torch.equal(logits, logits_ref)
    worst = 0.0
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32  # the fp32 master weights receive fp32 gradients
        worst = max(worst, (g - g_ref).abs().max().item() / g_ref.abs().max().item())
    assert worst <= MODEL_TOL[dtype], f"LoRA gradients: max error {worst:.2e} of the largest, allowed {MODEL_TOL[dtype]:.0e}"
    print(f"\n{device} {dtype}, dropout {dropout}: LoRA gradients, fused vs plain under autocast: {worst:.2e} of the largest")


def test_an_fp32_model_under_bf16_autocast_takes_the_plain_path():
    """Autocast casting to another dtype than x's would cast x and the bases op by op: the plain path."""
    model = tiny(True, 0.0)
    _, grads, nodes = logits_and_grads(model, True, autocast=torch.bfloat16)
    assert "LoRAProjectionsBackward" not in nodes and "AddmmBackward0" in nodes


# ------------------------------------------------------------------- an input remade, not kept twice
def activation_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd keeps for fn()'s backward pass, parameters left out."""
    weights, seen = {p.untyped_storage().data_ptr() for p in params}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("maker", ["rmsnorm", "swiglu"])
def test_an_input_made_by_rmsnorm_or_swiglu_is_remade_not_kept(maker, dtype):
    """After a hand-written RMSNorm (q, k, v; gate, up) or SwiGLU (down), the fused function keeps
    what remakes its input X (x̂ and w; g and u), which that function keeps anyway, instead of X
    itself: beyond the maker's own, it keeps only XA and the compute-dtype copies of A and B
    (closed form below), one (N, in) tensor less than when X cannot be remade, and its gradients
    are those of keeping X, bit for bit (X is remade exactly)."""
    from model.backward import swiglu
    from model.llama import RMSNorm

    k = 3 if maker == "rmsnorm" else 1
    layers = projections("nf4", k, 0.0, False, dtype)
    norm = RMSNorm(64).to(dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 5, 64, generator=g).to(dtype).requires_grad_() for _ in range(1 if k == 3 else 2)]
    dys = [torch.randn(3, 5, layer.out_features, generator=g).to(dtype) for layer in layers]
    params = [p for m in [norm, *layers] for p in m.parameters()]
    make = (lambda: norm(inputs[0])) if maker == "rmsnorm" else (lambda: swiglu(*inputs))

    def step(remade: bool):
        def fn():
            x = make()
            if not remade:
                del x.remake  # as for an input no hand-written function made
            return lora_projections(x, layers)
        kept, ys = activation_bytes(fn, params)
        return kept, torch.autograd.grad(ys, inputs + [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)], dys)

    maker_alone, _ = activation_bytes(make, params)
    (kept, grads), (kept_copy, grads_copy) = step(True), step(False)
    N, e, ranks = 15, torch.finfo(dtype).bits // 8, [m.r for m in layers]
    copies = sum(m.r * 64 for m in layers) * e * (dtype != torch.float32 or k > 1)   # A (stacked: a copy in fp32 too)
    copies += sum(m.r * m.out_features for m in layers) * e * (dtype != torch.float32)  # B
    assert kept - maker_alone == N * sum(ranks) * e + copies                 # XA and the weight copies, no X
    assert kept_copy - kept == N * 64 * e                                    # X, when it cannot be remade
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_copy))
