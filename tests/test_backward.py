"""model/backward.py: each hand-written backward pass against autograd's, and the model around them;
model/offload.py: checkpointed layers, their inputs offloaded, give the same gradients.

The reference is the plain autograd path of the same module (`handwritten_backward = False`), which
computes the same forward ops; transformers is the reference for the whole model's gradients.
fp32: gradients equal within 1e-6. bf16: within bf16 rounding of autograd's (one step in its 8th
significant bit, 7 mantissa bits stored, relative to the gradient's scale).
"""
import gc
import weakref

import pytest
import torch
import transformers

from conftest import tiny_hf_config
from model import Llama, LlamaConfig
from model.backward import RoPEFunction, SwiGLUFunction, rms_norm, swiglu
from model.llama import MLP, Attention, RMSNorm, RotaryEmbedding, apply_rope

DTYPES = [torch.float32, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def assert_grads_close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6, msg=name)
    else:  # a bf16 number carries 8 significant bits: one rounding step is 2^-8 of its size
        scale = ref.float().abs().amax().item()
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= 2 ** -7 * scale, f"{name}: {err:.3g} > bf16 rounding of {scale:.3g}"


def grads_of(fn, inputs: list[torch.Tensor], seed: int = 1):
    """fn(*inputs) and the gradients of a random linear function of its outputs with respect to inputs."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    loss = sum((o.float() * w.float()).sum() for o, w in zip(outs, weights))
    return outs, torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])


def leaf(t: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return t.to(device, dtype).detach().requires_grad_(True)


# -------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rmsnorm_function_equals_autograd(dtype, weight_trains, device):
    g = torch.Generator().manual_seed(0)
    x = leaf(3 * torch.randn(4, 7, 96, generator=g), dtype, device)
    norm = RMSNorm(96, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=g))
    norm.weight.requires_grad_(weight_trains)
    results = {}
    for handwritten in (True, False):
        norm.handwritten_backward = handwritten
        inputs = [x, norm.weight] if weight_trains else [x]
        results[handwritten] = grads_of(lambda x, *w: norm(x), inputs)
        assert results[handwritten][0][0].grad_fn.name() == ("RMSNormFunctionBackward" if handwritten else "MulBackward0")
    (y, grads), (y_ref, grads_ref) = results[True], results[False]
    assert torch.equal(y[0], y_ref[0])  # the forward pass is today's, op for op
    for name, a, b in zip(("dx", "dw"), grads, grads_ref):
        assert_grads_close(a, b, dtype, f"RMSNorm {name}")


def test_rmsnorm_function_takes_any_weight_tensor_with_a_gradient_to_its_source():
    # `weight` is any (D,) tensor: here 1 + w, whose gradient reaches w through the add
    g = torch.Generator().manual_seed(0)
    x, w = leaf(torch.randn(3, 5, 32, generator=g), torch.float32), leaf(0.1 * torch.randn(32, generator=g), torch.float32)
    (y,), grads = grads_of(lambda x, w: rms_norm(x, 1 + w, 1e-6), [x, w])

    def plain(x, w):
        return (1 + w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    (y_ref,), grads_ref = grads_of(plain, [x, w])
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, grads_ref):
        assert_grads_close(a, b, torch.float32, "RMSNorm with (1 + w)")


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of fn(*inputs), the
    module's own weights left out (they are in memory anyway)."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_rmsnorm_keeps_its_normalised_input_and_one_number_per_position():
    x = leaf(torch.randn(4, 16, 64), torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16).requires_grad_(False)
    r_bytes = 4 * 16 * 4                                   # one fp32 number per position
    assert saved_bytes(norm, x) - norm.weight.nbytes == x.nbytes + r_bytes           # x̂ = x · r, in bf16
    norm.handwritten_backward = False                      # autograd keeps x's fp32 copy instead
    assert saved_bytes(norm, x) - norm.weight.nbytes == 2 * x.nbytes + r_bytes


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_swiglu_outputs_carry_recipes_that_remake_them_bit_for_bit(dtype):
    """y.remake = (fn, inputs, version): fn(*inputs) is y again, from tensors the function keeps."""
    g = torch.Generator().manual_seed(0)
    x = leaf(3 * torch.randn(4, 7, 96, generator=g), dtype)
    norm = RMSNorm(96, eps=1e-5).to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=g))
    gate, up = (leaf(torch.randn(4, 7, 48, generator=g), dtype) for _ in range(2))
    for y in (norm(x), swiglu(gate, up)):
        fn, inputs, version = y.remake
        assert torch.equal(fn(*inputs), y) and version == y._version
        kept = {t.untyped_storage().data_ptr() for t in y.grad_fn.saved_tensors}
        assert all(t.untyped_storage().data_ptr() in kept for t in inputs)   # nothing new to keep
    with torch.no_grad():                                  # no graph: nothing kept, so no recipe
        assert not hasattr(norm(x), "remake")


# ----------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_function_equals_autograd_on_q_and_k(dtype, device):
    config = LlamaConfig.from_hf(tiny_hf_config(head_dim=32))
    B, T, nh, nkv, hs = 2, 9, 4, 2, 32
    rope = RotaryEmbedding(config).to(device)
    cos, sin = rope(torch.arange(3, 3 + T, device=device).expand(B, T), dtype)     # (B, 1, T, hs)
    g = torch.Generator().manual_seed(0)
    # as the attention makes them: (B, T, heads, hs) projections seen as (B, heads, T, hs)
    q = leaf(torch.randn(B, T, nh, hs, generator=g), dtype, device).transpose(1, 2)
    k = leaf(torch.randn(B, T, nkv, hs, generator=g), dtype, device).transpose(1, 2)
    (yq, yk), grads = grads_of(lambda q, k: RoPEFunction.apply(q, k, cos, sin), [q, k])
    (rq, rk), grads_ref = grads_of(lambda q, k: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)), [q, k])
    assert torch.equal(yq, rq) and torch.equal(yk, rk)
    for name, a, b in zip(("dq", "dk"), grads, grads_ref):
        assert_grads_close(a, b, dtype, f"RoPE {name}")
    assert saved_bytes(lambda q, k: RoPEFunction.apply(q, k, cos, sin), q, k) == cos.nbytes + sin.nbytes


# --------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_function_equals_autograd_and_keeps_gate_and_up_only(dtype, device):
    g = torch.Generator().manual_seed(0)
    gate = leaf(3 * torch.randn(3, 5, 48, generator=g), dtype, device)
    up = leaf(torch.randn(3, 5, 48, generator=g), dtype, device)
    (h,), grads = grads_of(SwiGLUFunction.apply, [gate, up])
    (h_ref,), grads_ref = grads_of(lambda a, b: torch.nn.functional.silu(a) * b, [gate, up])
    assert torch.equal(h, h_ref)
    for name, a, b in zip(("dg", "du"), grads, grads_ref):
        assert_grads_close(a, b, dtype, f"SwiGLU {name}")
    assert saved_bytes(SwiGLUFunction.apply, gate, up) == 2 * gate.nbytes       # autograd keeps silu(g) too
    assert saved_bytes(lambda a, b: torch.nn.functional.silu(a) * b, gate, up) == 3 * gate.nbytes


# --------------------------------------------------------------------------------------- whole model
def tiny_pair(seed: int = 0):
    """transformers' tiny Llama with every weight random and trainable, and ours with its weights."""
    d = tiny_hf_config()
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**d))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    ours = Llama(LlamaConfig.from_hf(d))
    ours.load_state_dict(hf.state_dict())
    return hf, ours, d


def test_one_flag_switches_every_module_and_the_model_gradients_equal_transformers_either_way():
    hf, ours, d = tiny_pair()
    switched = [m for m in ours.modules() if isinstance(m, (RMSNorm, Attention, MLP))]
    assert len(switched) == 2 * 4 + 1 and all(m.handwritten_backward for m in switched)  # the default
    ids = torch.randint(0, d["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(0))
    ref = hf(input_ids=ids).logits
    ref.square().mean().backward()
    want = dict(hf.named_parameters())
    logits = {}
    for handwritten in (True, False):
        ours.set_handwritten_backward(handwritten)
        assert all(m.handwritten_backward is handwritten for m in switched)
        ours.zero_grad(set_to_none=True)
        logits[handwritten] = ours(ids)
        logits[handwritten].square().mean().backward()
        assert (logits[handwritten] - ref).abs().max().item() <= 1e-4
        for name, p in ours.named_parameters():   # every weight, norms included
            w = want[name].grad
            assert (p.grad - w).abs().max().item() <= 1e-4 * max(1.0, w.abs().max().item()), (handwritten, name)
    assert torch.equal(logits[True], logits[False])


# ------------------------------------------------------------------------------ offloaded checkpoints
def lora_model(layers: int = 2, device: str = "cpu", **overrides) -> Llama:
    from lora import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config(num_hidden_layers=layers, **overrides))).to(device)
    # dropout on the LoRA path: a recomputed layer must draw the same masks
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"), seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give A a gradient
                p.copy_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.train()


def forward_watching_layers(model: Llama, ids: torch.Tensor):
    """The loss, and weak references to each decoder layer's input and to every tensor made inside
    the layers during the forward pass (the recomputation in the backward pass is not watched)."""
    inputs, inside, handles = [], [], []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0]))))
        for sub in layer.modules():
            handles.append(sub.register_forward_hook(
                lambda m, args, out: inside.extend(weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,)))))
    loss = model(ids).float().square().mean()
    for h in handles:
        h.remove()
    gc.collect()
    return loss, inputs, inside


@pytest.mark.parametrize("mode", [True, "offload"])
def test_checkpointed_layers_give_the_gradients_of_no_checkpointing_and_keep_only_the_inputs(mode):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, alive = {}, {}
    for ckpt in (False, mode):
        model = lora_model(layers=3)
        model.set_gradient_checkpointing(ckpt)
        torch.manual_seed(7)
        loss, inputs, inside = forward_watching_layers(model, ids)
        alive[ckpt] = ([r() is not None for r in inputs], sum(r() is not None for r in inside))
        params = [p for p in model.parameters() if p.requires_grad]
        grads[ckpt] = torch.autograd.grad(loss, params)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[mode]))
    assert alive[False][1] > 0                    # without checkpointing, the layers' tensors wait for backward
    inputs_kept, inside_kept = alive[mode]
    # of the tensors made inside the layers, only the outputs that are the next layers' inputs stay (the
    # last layer's output is freed too: the final norm keeps its normalised x̂, made outside the layers)
    if mode is True:                              # and each layer's input waits where it is
        assert inputs_kept == [True] * 3 and inside_kept == 2
    else:                                         # each input waits as a host copy, the original is freed
        assert inputs_kept == [False] * 3 and inside_kept == 0


def test_gradient_checkpointing_values_are_checked():
    model = lora_model(layers=1)
    with pytest.raises(ValueError, match="'offload'"):
        model.set_gradient_checkpointing("cpu")
    from train import TrainConfig

    with pytest.raises(ValueError, match="grad_checkpointing"):
        TrainConfig(grad_checkpointing="yes")
    assert TrainConfig(grad_checkpointing="offload").grad_checkpointing == "offload"


@CUDA
def test_offload_keeps_no_activation_of_a_layer_on_the_cuda_device():
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
    grown = {}
    for mode in (True, "offload"):
        for layers in (1, 4):
            model = lora_model(layers=layers, device="cuda", hidden_size=256, intermediate_size=512)
            model.set_gradient_checkpointing(mode)
            model(ids).float().square().mean().backward()   # warm-up: cuBLAS workspaces, gradients allocated
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            loss = model(ids).float().square().mean()
            torch.cuda.synchronize()
            grown[mode, layers] = torch.cuda.memory_allocated() - before
            loss.backward()
            del model, loss
    x_bytes = 4 * 256 * 256 * 4                                      # one layer's input, fp32
    assert grown[True, 4] - grown[True, 1] >= 3 * x_bytes             # plain checkpointing keeps them on the device
    assert grown["offload", 4] == grown["offload", 1]                # offloaded: nothing more per layer
