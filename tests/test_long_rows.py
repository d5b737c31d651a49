"""Long rows: packed documents at the cost of the documents alone (model/attention.py), and rows of 32k tokens.

The reference for a packed row's attention is each document alone; for its kernels, autograd and the
block-diagonal mask; for RoPE at long positions, transformers' rotary embeddings of the same config.
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_hf_config
from model import Llama, LlamaConfig
from model.attention import (Documents, DocumentAttention, attend, attend_each_document, attend_varlen,
                             attention_mask_4d, packed_documents, use_varlen)

WINDOWED = {  # the kernel's three CPU paths: causal, a window shorter than the documents, a soft-cap
    "llama": tiny_hf_config(),
    "mistral_window": tiny_hf_config(model_type="mistral", sliding_window=5),
    "gemma2_softcap_window": tiny_hf_config(model_type="gemma2", head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}


def qkv(B=2, T=40, nh=4, nkv=2, hs=8, seed=0, dtype=torch.float32):
    """q (B, nh, T, hs), k, v (B, nkv, T, hs), stored (B, T, heads, hs) as the projections leave them."""
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(B, T, n, hs, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    return make(nh), make(nkv), make(nkv)


def test_packed_documents_reads_the_lengths_from_the_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 0, 1, 2, 3, 0, 0]])
    docs = packed_documents(pos)
    assert docs.lengths == ((3, 2, 3), (8,), (2, 4, 1, 1))
    assert docs.cu_seqlens("cpu").tolist() == [0, 3, 5, 8, 16, 18, 22, 23, 24] and docs.max_len == 8
    assert docs.ids("cpu")[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert packed_documents(torch.arange(8).expand(3, 8)) is None  # one document a row: the fused causal path


@pytest.mark.parametrize("window", [None, 3])
def test_the_document_kernels_backward_equals_autograd_and_the_mask(window):
    """DocumentAttention (SDPA's CPU kernels per document, gradients by hand) against autograd through the
    per-document path, and its output against the block-diagonal mask of the dense path."""
    q, k, v = qkv()
    docs = Documents(((7, 1, 20, 12), (40,)), window)
    y = DocumentAttention.apply(q, k, v, docs, 0.3)
    ref = attend_each_document(q, k, v, docs, 0.3)
    mask = attention_mask_4d(None, 40, 0, "cpu", window, docs.ids("cpu"))
    dense = attend(q, k, v, mask, 0.3)
    assert (y - ref).abs().max() <= 1e-6 and (y - dense).abs().max() <= 1e-6
    assert y.stride() == (40 * 4 * 8, 8, 4 * 8, 1)  # stored (B, T, nh, hs): o_proj's input is a view of it
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (q, k, v), dy)
    want = torch.autograd.grad(ref, (q, k, v), dy)
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max() <= 1e-5, name
    crossed = attend(q, k, v, attention_mask_4d(None, 40, 0, "cpu", window), 0.3)  # one document a row
    assert (crossed[0, :, 8:] - y[0, :, 8:]).abs().max() > 1e-2


def flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn as documented (and tested against SDPA in torch's own suite):
    (N, heads, hs) rows cut at cu_seq; query i sees the keys j of its own sequence with
    i - left <= j <= i + right (-1: no limit); written densely, for a test."""
    doc = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff().long())
    i, j = torch.arange(len(doc))[:, None], torch.arange(len(doc))[None, :]
    left, right = window_size
    allowed = (doc[:, None] == doc[None, :]) & ((j >= i - left) if left >= 0 else True) & ((j <= i + right) if right >= 0 else True)
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                         attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
    return y.transpose(0, 1)


@pytest.mark.parametrize("window", [None, 4])
def test_the_varlen_call_cuts_the_flattened_rows_at_each_document(window, monkeypatch):
    """The CUDA entry point's arguments (flattened rows, cu_seqlens, window (w - 1, 0), GQA), proved on the CPU
    with a stand-in that follows varlen_attn's documented semantics; the kernel itself runs on a GPU only."""
    q, k, v = qkv()
    docs = Documents(((7, 1, 20, 12), (25, 15)), window)
    monkeypatch.setattr("model.attention.varlen_attn", flash_varlen_reference)
    got = attend_varlen(q, k, v, docs, 0.3)
    want = attend_each_document(q, k, v, docs, 0.3)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    assert not use_varlen(q.detach(), None)  # the CPU keeps DocumentAttention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama", "mistral_window"])
def test_on_cuda_a_packed_row_runs_the_varlen_kernel_and_each_document_has_its_logits_alone(name, monkeypatch):
    """bf16 on a GPU: the documents go through varlen_attn (counted), and each one's logits are those it has
    alone (SDPA's flash kernel), within bf16 rounding; the backward pass runs through it."""
    import model.attention as attention

    calls = []
    real = attention.varlen_attn
    monkeypatch.setattr(attention, "varlen_attn", lambda *a, **kw: calls.append(kw["window_size"]) or real(*a, **kw))
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(dict(WINDOWED[name], hidden_size=256, num_attention_heads=4, head_dim=64)))
    model = model.to("cuda", torch.bfloat16).train()
    ids, pos = (t.cuda() for t in packed_row(T=2048, n=8))
    packed = model(ids, position_ids=pos)
    packed.float().pow(2).mean().backward()
    with torch.no_grad():
        alone = torch.cat([model(d) for d in ids.split(256, dim=1)], dim=1)
    scale = alone.float().abs().max().item()
    assert calls and (packed.detach().float() - alone.float()).abs().max().item() <= 2e-2 * scale
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op makes, forward and backward."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def packed_row(T=1024, n=8, vocab=128):
    ids = torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(T // n).repeat(n)[None]


@pytest.mark.parametrize("name", list(WINDOWED))
def test_a_packed_row_never_holds_or_computes_a_T_by_T_mask(name):
    """1,024 tokens in 8 documents, forward and backward: no op makes a tensor of T² / 4 elements (a (T, T) mask,
    or scores across documents), which the block-diagonal mask path does (checked: the detector works)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(WINDOWED[name])).train()
    ids, pos = packed_row()
    T = ids.shape[1]
    for attention_mask, dense in ((None, False), (torch.ones_like(ids), True)):  # a padding mask keeps the mask
        with LargestTensor() as seen:
            model(ids, attention_mask, position_ids=pos).pow(2).mean().backward()
        print(f"\n{name}, {'masked' if dense else 'per document'}: largest tensor {seen.most:,} elements, T² = {T * T:,}")
        assert (seen.most >= T * T) if dense else (seen.most < T * T // 4)


def saved_bytes(fn, skip=()) -> int:
    """Bytes autograd keeps for the backward pass of fn(), each storage once (bench/lean.py's count), but `skip`'s."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_a_packed_row_saves_for_backward_what_one_document_of_its_length_saves():
    from train_script import tiny_lora_model

    model = tiny_lora_model(targets=("q_proj", "k_proj", "v_proj", "o_proj")).train()
    ids, pos = packed_row(n=16)
    one = saved_bytes(lambda: model.model(ids, None, torch.arange(ids.shape[1])[None]))
    packed = saved_bytes(lambda: model.model(ids, None, pos))
    masked = saved_bytes(lambda: model.model(ids, torch.ones_like(ids), pos))
    print(f"\nsaved: one document {one:,} B, 16 packed {packed:,} B, with the block-diagonal mask {masked:,} B")
    assert packed <= one and masked > 1.5 * one


# ------------------------------------------------------------------------------------------ RoPE at 32k
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
ROPE = {  # each scaling as the family's own config.json states it (head size 64: 32 frequencies)
    "plain": tiny_hf_config(head_dim=64, rope_theta=500000.0),
    "llama3 (Llama 3.1)": tiny_hf_config(head_dim=64, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                                         max_position_embeddings=131072),
    "linear (Gemma 3's global layers, Llama 2 long)": tiny_hf_config(head_dim=64, rope_theta=1e6,
                                                                     rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "longrope (Phi-3.5, 4k -> 128k)": tiny_hf_config(
        model_type="phi3", hidden_size=256, pad_token_id=0, rope_theta=10000.0, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(32)],
                                                             "long_factor": [1.0 + 1.5 * i for i in range(32)]}),
    "yarn (Qwen3, 32k -> 128k)": tiny_hf_config(model_type="qwen3", head_dim=64, rope_theta=1e6, max_position_embeddings=131072,
                                                rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 32768}),
    "yarn (Qwen2.5, mscale)": tiny_hf_config(model_type="qwen2", head_dim=64, rope_theta=1e6, max_position_embeddings=65536,
                                             rope_scaling={"rope_type": "yarn", "factor": 8.0, "mscale": 0.707,
                                                           "mscale_all_dim": 1.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_at_32k_positions_equals_transformers_for_each_scaling(name):
    """cos and sin of a packed row of 32,768 positions (one document of 30,000, then 2,768) against
    transformers' rotary embedding of the same config.json: frequencies, attention factor, longrope's switch."""
    import transformers

    d = ROPE[name]
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d)).model.rotary_emb
    ours = Llama(LlamaConfig.from_hf(d)).model.rotary_emb
    pos = torch.cat([torch.arange(30000), torch.arange(2768)])[None]
    cos, sin = ours(pos, torch.float32)                                               # (1, 1, T, 64)
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=torch.float32), pos)                   # (1, T, 64)
    worst = max((cos[:, 0] - ref_cos).abs().max().item(), (sin[:, 0] - ref_sin).abs().max().item())
    plain, _ = Llama(LlamaConfig.from_hf(ROPE["plain"])).model.rotary_emb(pos, torch.float32)
    print(f"\n{name}: max |cos, sin - transformers'| = {worst:.1e} at positions to 29,999")
    assert worst <= 1e-5
    assert name == "plain" or (cos - plain).abs().max() > 1e-2  # the scaling changes the angles


# ------------------------------------------------------------------------------------------ finetune at 32k
def test_finetune_trains_packed_rows_of_32768_tokens_with_offloaded_checkpointing(tmp_path, monkeypatch, capsys):
    """`examples/finetune.py --packing --max-len 32768 --grad-checkpointing offload` on price lists of about
    4,400 tokens: one optimizer step on a row of seven whole documents, about 31,000 tokens, each attending to
    itself (their Documents), the layers recomputed with their inputs offloaded, an adapter written."""
    from test_finetune import FLAGS, finetune, write_tiny_chat_model

    from model import Tokenizer, default_checkpoint
    from model.llama import LlamaModel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from long_documents import write_long_documents

    data = write_long_documents(str(tmp_path / "long.jsonl"), n=7, min_tokens=4400, max_tokens=4400)
    folder = write_tiny_chat_model(tmp_path / "tiny", Tokenizer.from_gguf(default_checkpoint()))
    rows, real = [], LlamaModel.forward

    def forward(self, input_ids, attention_mask=None, position_ids=None, *args, **kwargs):
        if torch.is_grad_enabled() and position_ids is not None:
            rows.append((input_ids.shape[1], packed_documents(position_ids), self.gradient_checkpointing))
        return real(self, input_ids, attention_mask, position_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    code = finetune.main([*FLAGS, "--model", folder, "--data", data, "--out", str(tmp_path / "out"), "--packing",
                          "--max-len", "32768", "--grad-checkpointing", "offload", "--batch-size", "1",
                          "--max-steps", "1", "--samples", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    T, documents, checkpointing = rows[0]
    print(f"\ntrained a row of {T:,} tokens: documents {documents.lengths[0]}, checkpointing {checkpointing!r}")
    assert 29000 < T <= 32768 and len(documents.lengths[0]) == 7 and checkpointing == "offload"
    assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


def test_the_memory_model_counts_what_a_packed_long_step_keeps():
    """`train.memory.step_peak_bytes`'s activations (every layer, the final norm's input, RoPE, the ids, the fused
    head's kept gradient) against what autograd keeps at the end of answer_loss's forward pass on a packed row
    of 4,096 tokens (saved_tensors_hooks, each storage once, weights apart): the figure behind its peak."""
    from train import answer_loss
    from train.memory import Shape, step_peak_bytes
    from train_script import tiny_lora_model

    model = tiny_lora_model(targets=("q_proj", "k_proj", "v_proj", "o_proj")).train()
    ids, pos = packed_row(T=4096, n=8)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = saved_bytes(lambda: answer_loss(model, ids, ids, position_ids=pos), skip=weights)
    shape = Shape.of(model.config)
    predicted = step_peak_bytes(shape, 4096, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), act_bytes=4,
                                answer_tokens=4096 - 8)["activations"]
    print(f"\nkept for backward: measured {kept:,} B, the memory model {predicted:,.0f} B")
    assert predicted == pytest.approx(kept, rel=0.02)
