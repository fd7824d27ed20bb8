"""Sockets that listen on one named address, never on all interfaces.

A plain ``torch.distributed.TCPStore(host, port, is_master=True)`` listens on every
interface whatever ``host`` says (``ss -ltn`` shows ``*:port``), and gloo picks its
device from the machine's hostname. Here the master binds a listening socket to the
given address itself and hands its descriptor to the store (``master_listen_fd``),
and gloo is given a device on that address, so a local run on ``127.0.0.1`` opens
nothing that another machine can reach.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

LOOPBACK = "127.0.0.1"
TIMEOUT = datetime.timedelta(minutes=10)
_ANY = {"", "0.0.0.0", "::", "*"}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.x.x) and ``localhost``; no name is resolved."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _check_host(host: str) -> str:
    if host is None or host.strip() in _ANY:
        raise ValueError(f"refusing to listen on all interfaces (host={host!r}); name one address, e.g. {LOOPBACK!r}")
    return host


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a name: resolved by bind as IPv4


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port) and listening."""
    _check_host(host)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free on ``host`` now (bound to that address, never to all interfaces)."""
    _check_host(host)
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]"), 0))
        return sock.getsockname()[1]


def tcp_store(host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta = TIMEOUT) -> dist.TCPStore:
    """Rank 0 hosts the store on ``host:port`` only; the other ranks connect to it."""
    import torch.distributed as dist

    _check_host(host)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    sock = listen_socket(host, port)
    try:
        fd = sock.detach()  # the store owns (and closes) the descriptor from here on
        return dist.TCPStore(host, port, world_size, True, timeout=timeout, master_listen_fd=fd)
    except BaseException:
        sock.close()
        raise


def interface_of(host: str) -> str | None:
    """The network interface that holds ``host``'s address (``lo`` for loopback), if one is found."""
    try:
        address = socket.gethostbyname(host.strip("[]")) if _family(host) == socket.AF_INET else host.strip("[]")
    except OSError:
        return None
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address.split("%")[0] == address for a in addrs):
                return name
            if is_loopback(address) and any(is_loopback(a.address.split("%")[0]) for a in addrs):
                return name
    except ImportError:  # pragma: no cover - psutil comes with ray
        pass
    return "lo" if is_loopback(address) else None


def gloo_device(host: str):
    """A gloo device on ``host``'s address (its listening sockets bind there)."""
    import torch.distributed as dist

    return dist.ProcessGroupGloo.create_device(hostname=host.strip("[]"))


def init_default_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta = TIMEOUT
) -> None:
    """``torch.distributed.init_process_group`` whose store (and gloo sockets) listen on ``host`` only.

    Rank 0 hosts the store on ``host:port``. RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT are set for DeepSpeed (which then reuses this group: it is never
    re-initialised, ``deepspeed.initialize(dist_init_required=False)``), LOCAL_RANK
    defaults to 0. Gloo's and NCCL's own sockets are pointed at ``host``'s interface
    (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless already set).
    """
    import torch.distributed as dist

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; allowed: gloo, nccl")
    interface = interface_of(host)
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME", interface)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=host, MASTER_PORT=str(port))
    os.environ.setdefault("LOCAL_RANK", "0")
    store = tcp_store(host, port, rank, world_size, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
