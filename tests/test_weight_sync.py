import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from tests.conftest import run_ranks
from uprlhf.rl.weight_sync import free_port as free_port_on
from uprlhf.rl.weight_sync import layout_of, open_group, receive, send


def free_port() -> int:
    return free_port_on("127.0.0.1")


def listening(pid: int) -> list[str]:
    """``host:port`` of every TCP socket process ``pid`` listens on (from /proc, like ``ss -ltnp``)."""
    import ipaddress

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
            out.append(f"{ipaddress.ip_address(raw)}:{int(hex_port, 16)}")
    return out


def test_broadcast_delivers_every_tensor_by_name_shape_and_dtype():
    weights = {
        "b.lora_A": torch.randn(4, 8),
        "a.lora_B": torch.randn(8, 4),
        "c.step": torch.arange(3, dtype=torch.int64),
        "d.half": torch.randn(5).to(torch.bfloat16),
    }
    layout = layout_of(weights)
    port, received = free_port(), {}

    def member(rank: int) -> None:
        group = open_group("127.0.0.1", port, rank, 3, "gloo")
        if rank == 0:
            send(group, weights, torch.device("cpu"))
        else:
            received[rank] = receive(group, layout, torch.device("cpu"))

    run_ranks(member, 3)
    for rank in (1, 2):
        assert set(received[rank]) == set(weights)
        for name, tensor in weights.items():
            assert received[rank][name].dtype == tensor.dtype
            assert torch.equal(received[rank][name], tensor)


def test_layout_is_sorted_and_plain():
    layout = layout_of({"z": torch.zeros(2, 3), "a": torch.zeros(1, dtype=torch.float16)})
    assert layout == [("a", (1,), "float16"), ("z", (2, 3), "float32")]


def is_loopback_address(host_port: str) -> bool:
    """``127.x:port``, ``::1:port`` or an IPv4-mapped loopback (``::ffff:7f00:1:port``, which other sockets of this
    process, e.g. another test's stub server on 127.0.0.1 over IPv6, show as)."""
    import ipaddress

    address = ipaddress.ip_address(host_port.rsplit(":", 1)[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_the_sync_group_listens_on_loopback_only():
    port, seen = free_port(), []
    ready = threading.Barrier(2)

    def member(rank: int) -> None:
        group = open_group("127.0.0.1", port, rank, 2, "gloo")
        tensor = torch.full((4,), float(rank))
        send(group, {"w": torch.ones(4)}, torch.device("cpu")) if rank == 0 else seen.append(
            receive(group, layout_of({"w": tensor}), torch.device("cpu"))["w"])
        ready.wait(timeout=60)
        if rank == 0:
            seen.append(listening(os.getpid()))
        ready.wait(timeout=60)

    run_ranks(member, 2)
    received, sockets = seen
    assert torch.equal(received, torch.ones(4))
    assert f"127.0.0.1:{port}" in sockets
    assert all(is_loopback_address(addr) for addr in sockets), sockets


def test_free_port_and_stores_refuse_all_interfaces():
    from uprlhf.netutil import is_loopback, tcp_store

    for host in ("", "0.0.0.0", "::"):
        with pytest.raises(ValueError, match="all interfaces"):
            free_port_on(host)
        with pytest.raises(ValueError, match="all interfaces"):
            tcp_store(host, 1, 0, 1)
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.0.2.2") and not is_loopback("example.com")


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_weight_sync import listening
    from uprlhf.rl.weight_sync import init_default_group, layout_of, open_group, receive, send
    rank, port, sync_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    init_default_group("gloo", "127.0.0.1", port, rank, 2)
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    group = open_group("127.0.0.1", sync_port, rank, 2, "gloo")
    weights = {{"a": torch.arange(6.0).view(2, 3)}}
    if rank == 0:
        send(group, weights, torch.device("cpu"))
    else:
        got = receive(group, layout_of(weights), torch.device("cpu"))
        assert torch.equal(got["a"], weights["a"])
    dist.barrier()
    sockets = listening(os.getpid())
    dist.barrier()
    print(json.dumps({{"sum": t.tolist(), "sockets": sockets, "env": os.environ.get("GLOO_SOCKET_IFNAME")}}))
    dist.destroy_process_group()
""")


def test_default_group_of_two_processes_listens_on_loopback_only(tmp_path):
    """Two ranks in their own processes: the default group and the sync group work, every socket on 127.0.0.1."""
    from pathlib import Path

    port, sync_port = free_port(), free_port()
    script = RANK_SCRIPT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(rank), str(port), str(sync_port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["sum"] == [3.0, 3.0, 3.0] for r in results)
    assert f"127.0.0.1:{port}" in results[0]["sockets"] and f"127.0.0.1:{sync_port}" in results[0]["sockets"]
    for r in results:
        assert r["sockets"] and all(is_loopback_address(addr) for addr in r["sockets"]), r["sockets"]
        assert r["env"] == "lo"
