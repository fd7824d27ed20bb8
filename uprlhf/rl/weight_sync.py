"""Weight broadcast from learner rank 0 to the rollout workers, over a process group of their own.

The learner ranks already share a default torch.distributed group (DeepSpeed's), so the
sync group is built beside it from a ``TCPStore``: NCCL between GPUs, gloo on CPUs.
Every tensor travels in one flat buffer per dtype; the receivers allocate it from a
layout (name, shape, dtype) that the driver fetches from the learner once.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import Tensor

from uprlhf.netutil import free_port, gloo_device, init_default_group, tcp_store

__all__ = ["Layout", "free_port", "init_default_group", "layout_of", "open_group", "receive", "send"]

Layout = list[tuple[str, tuple[int, ...], str]]
TIMEOUT = datetime.timedelta(minutes=10)


def open_group(address: str, port: int, rank: int, world_size: int, backend: str) -> dist.ProcessGroup:
    """Rank 0 (the learner) hosts the store on ``address:port`` only; the rollout workers are ranks 1..R.

    The store listens on ``address`` alone (not on every interface) and gloo's sockets
    bind to it too: give ``127.0.0.1`` (and a port from ``free_port("127.0.0.1")``) on one node.
    """
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown sync backend {backend!r}; allowed: nccl, gloo")
    store = tcp_store(address, port, rank, world_size, TIMEOUT)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = TIMEOUT
    options._devices = [gloo_device(address)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def layout_of(weights: dict[str, Tensor]) -> Layout:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in sorted(weights.items())]


def _buffers(layout: Layout, device: torch.device) -> dict[str, Tensor]:
    sizes: dict[str, int] = {}
    for _, shape, dtype in layout:
        sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(shape).numel())
    return {dtype: torch.empty(n, dtype=getattr(torch, dtype), device=device) for dtype, n in sorted(sizes.items())}


def _broadcast(group: dist.ProcessGroup, tensor: Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send(group: dist.ProcessGroup, weights: dict[str, Tensor], device: torch.device) -> None:
    """Rank 0: pack the weights by dtype and broadcast each buffer."""
    layout = layout_of(weights)
    buffers = _buffers(layout, device)
    offsets = dict.fromkeys(buffers, 0)
    for name, shape, dtype in layout:
        n = int(torch.Size(shape).numel())
        buffers[dtype][offsets[dtype] : offsets[dtype] + n].copy_(weights[name].reshape(-1))
        offsets[dtype] += n
    for buffer in buffers.values():
        _broadcast(group, buffer)


def receive(group: dist.ProcessGroup, layout: Layout, device: torch.device) -> dict[str, Tensor]:
    """Ranks 1..R: receive the buffers and unpack them into named tensors."""
    buffers = _buffers(layout, device)
    for buffer in buffers.values():
        _broadcast(group, buffer)
    offsets = dict.fromkeys(buffers, 0)
    weights = {}
    for name, shape, dtype in layout:
        n = int(torch.Size(shape).numel())
        weights[name] = buffers[dtype][offsets[dtype] : offsets[dtype] + n].view(shape)
        offsets[dtype] += n
    return weights
