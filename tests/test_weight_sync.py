import socket
import threading

import torch

from uprlhf.rl.weight_sync import layout_of, open_group, receive, send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_broadcast_delivers_every_tensor_by_name_shape_and_dtype():
    weights = {
        "b.lora_A": torch.randn(4, 8),
        "a.lora_B": torch.randn(8, 4),
        "c.step": torch.arange(3, dtype=torch.int64),
        "d.half": torch.randn(5).to(torch.bfloat16),
    }
    layout = layout_of(weights)
    port, received, errors = free_port(), {}, []

    def member(rank: int) -> None:
        try:
            group = open_group("127.0.0.1", port, rank, 3, "gloo")
            if rank == 0:
                send(group, weights, torch.device("cpu"))
            else:
                received[rank] = receive(group, layout, torch.device("cpu"))
        except Exception as err:  # surfaced below: a thread's exception would be lost
            errors.append(err)

    threads = [threading.Thread(target=member, args=(rank,)) for rank in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for rank in (1, 2):
        assert set(received[rank]) == set(weights)
        for name, tensor in weights.items():
            assert received[rank][name].dtype == tensor.dtype
            assert torch.equal(received[rank][name], tensor)


def test_layout_is_sorted_and_plain():
    layout = layout_of({"z": torch.zeros(2, 3), "a": torch.zeros(1, dtype=torch.float16)})
    assert layout == [("a", (1,), "float16"), ("z", (2, 3), "float32")]
