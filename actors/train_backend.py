"""Ray Train's torch backend with the ranks' store on the node's address, never on all interfaces.

Ray Train's own ``TorchConfig`` creates the process group through ``init_method``
(``env://`` or ``tcp://``), whose TCPStore listens on every interface. This config keeps
everything else of Ray Train's backend (process-group shutdown, per-worker env vars) and
only replaces how the group is made: ``uprlhf.netutil.init_default_group`` on each worker,
with rank 0's address and a port bound there.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

from uprlhf.netutil import free_port, init_default_group


def _rank_zero_address() -> tuple[str, int]:
    address = ray.util.get_node_ip_address()
    return address, free_port(address)


def _join(backend: str, address: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    import datetime

    _set_torch_distributed_env_vars()
    init_default_group(backend, address, port, world_rank, world_size, datetime.timedelta(seconds=timeout_s))


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        address, port = worker_group.execute_single(0, _rank_zero_address)
        ray.get([
            worker_group.execute_single_async(
                rank, _join, backend=backend, address=address, port=port, world_rank=rank, world_size=len(worker_group),
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the node's address only (127.0.0.1 on a local Ray)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
