"""Offloaded activation checkpointing: a checkpointed layer's input waits in host memory.

Checkpointing (`torch.utils.checkpoint`) keeps nothing of a decoder layer for its backward pass but
its inputs, and recomputes the rest when the backward pass reaches the layer. The inputs are kept
through autograd's saved-tensor mechanism, so a `saved_tensors_hooks` around the checkpoint call
decides where they wait: this one copies the layer's input x (B, T, D) to host memory as it is
saved, and back to x's device when the recomputation unpacks it. The inputs every layer shares
(RoPE's cos and sin, the mask) stay where they are.

On CUDA the host copy is pinned and both copies are issued without waiting (`non_blocking`), on
the same stream as the kernels around them, so they stay ordered and overlap with the CPU's work.
Per layer the device then holds nothing between the forward and the backward pass; the host holds
B · T · D numbers.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def offload_layer_input(x: torch.Tensor, enabled: bool = True):
    """Within this block, autograd saves the tensor `x` (the very object) in host memory.

    Wrap a `checkpoint(layer, x, ...)` call in it; other saved tensors are kept as they are.
    """
    if not enabled:
        yield
        return
    pin = x.device.type == "cuda"
    # autograd keeps the hooks as long as what they saved: hold x only while the block runs
    target = [x]

    def pack(t: torch.Tensor):
        if not target or t is not target[0]:
            return t
        with torch.no_grad():
            host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=pin)
            host.copy_(t, non_blocking=pin)
        return (t.device, host)

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        device, host = saved
        return host.to(device, non_blocking=host.is_pinned())

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        target.clear()
