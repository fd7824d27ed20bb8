"""The vllm backend against vLLM's V1 API, on CPU without vllm: a fake ``vllm`` module stands in.

The fake LLM runs ``collective_rpc`` the way vLLM's in-process executor does: the named method
of a worker class extended with ``WeightSyncExtension``, arguments passed by reference.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_ranks
from uprlhf.rl.config import HFRolloutConfig, PolicyConfig, VLLMRolloutConfig
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.rollout import make_rollout_engine
from uprlhf.rl.vllm_extension import WeightSyncExtension
from uprlhf.rl.weight_sync import free_port, layout_of, open_group, send


class TinyModel(torch.nn.Module):
    """Stands in for vLLM's model: ``load_weights`` takes (name, tensor) pairs and copies them in."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.embed = torch.nn.Embedding(5, 3)

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        return set(params)


class Worker:
    """What vLLM's worker offers an extension: ``model_runner.model`` and ``device``."""

    def __init__(self):
        self.model_runner = types.SimpleNamespace(model=TinyModel())
        self.device = torch.device("cpu")


ExtendedWorker = type("ExtendedWorker", (Worker, WeightSyncExtension), {})  # as vLLM extends its worker class


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@dataclass
class Logprob:
    logprob: float


class FakeLLM:
    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        self.worker = ExtendedWorker()
        self.rpc: list[tuple[str, tuple]] = []
        self.requests: list[tuple[list[str], list[SamplingParams], LoRARequest | None]] = []
        self.prefix_resets = 0
        self.outputs: list = []  # what generate returns; else one token per prompt

    def collective_rpc(self, method: str, timeout=None, args: tuple = (), kwargs: dict | None = None) -> list:
        self.rpc.append((method, args))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        self.requests.append((prompts, sampling_params, lora_request))
        return self.outputs or [output([1, 2], [4], [-1.0], "x") for _ in prompts]


def output(prompt_ids: list[int], tokens: list[int], logprobs: list[float], text: str):
    """A vLLM ``RequestOutput``: the sampled token's log-prob among the top ones (here one other)."""
    completion = types.SimpleNamespace(
        token_ids=tokens, text=text, logprobs=[{t: Logprob(lp), 3: Logprob(-9.0)} for t, lp in zip(tokens, logprobs)]
    )
    return types.SimpleNamespace(prompt_token_ids=prompt_ids, outputs=[completion])


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's default, which the engine must override
    return vllm


def policy(path, lora_rank: int | None = 4) -> PolicyConfig:
    return PolicyConfig(
        model={"name_or_path": str(path)}, lora_target_modules=["q_proj", "v_proj"], prompt_template="plain", lora_rank=lora_rank
    )


def vllm_engine(path, lora_rank: int | None = 4):
    return make_rollout_engine(policy(path, lora_rank), VLLMRolloutConfig(gpus_per_worker=1, max_new_tokens=4, temperature=0.7, top_p=0.9))


def full_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"proj.weight": torch.randn(2, 3), "proj.bias": torch.randn(2), "embed.weight": torch.randn(5, 3)}


def assert_model_holds(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, tensor in weights.items():
        assert torch.equal(params[name], tensor), name


def broadcast(weights: dict[str, torch.Tensor], receiver) -> None:
    """Learner rank 0 sends ``weights`` over a gloo sync group; rank 1 runs ``receiver(group)``."""
    port = free_port("127.0.0.1")

    def member(rank: int) -> None:
        group = open_group("127.0.0.1", port, rank, 2, "gloo")
        send(group, weights, torch.device("cpu")) if rank == 0 else receiver(group)

    run_ranks(member, 2)


@pytest.mark.parametrize("lora_rank, max_lora_rank", [(4, 8), (12, 16), (16, 16), (None, 1)])
def test_the_engine_runs_vllm_in_process_with_the_extension(fake_vllm, tiny_policy, lora_rank, max_lora_rank):
    engine = vllm_engine(tiny_policy, lora_rank)
    llm = engine.llm
    assert llm.multiprocessing == "0"  # set before the engine was built
    assert llm.kwargs["enable_lora"] is (lora_rank is not None) and llm.kwargs["max_lora_rank"] == max_lora_rank
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["gpu_memory_utilization"] == 0.3
    module, _, cls = llm.kwargs["worker_extension_cls"].rpartition(".")
    assert getattr(importlib.import_module(module), cls) is WeightSyncExtension


def test_the_extension_adds_only_prefixed_methods_so_vllm_finds_no_clash():
    added = [name for name in dir(WeightSyncExtension) if not name.startswith("__")]
    assert added == ["uprlhf_load_weights", "uprlhf_receive_weights"]


def test_the_extension_module_imports_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any ``import vllm`` now fails, installed or not
    monkeypatch.delitem(sys.modules, "uprlhf.rl.vllm_extension")
    assert hasattr(importlib.import_module("uprlhf.rl.vllm_extension"), "WeightSyncExtension")


def test_the_extension_loads_tensors_into_the_model_by_name():
    worker, weights = ExtendedWorker(), full_weights()
    worker.uprlhf_load_weights(weights)
    assert_model_holds(worker.model_runner.model, weights)


def test_the_extension_receives_the_broadcast_into_the_model():
    worker, weights = ExtendedWorker(), full_weights()
    broadcast(weights, lambda group: worker.uprlhf_receive_weights(group, layout_of(weights)))
    assert_model_holds(worker.model_runner.model, weights)


def test_each_lora_load_is_a_new_request_with_a_larger_id_and_the_adapter_on_disk(fake_vllm, tiny_policy):
    engine = vllm_engine(tiny_policy)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    requests, paths = [], []
    for version in (1, 2, 2):  # the same version again, as after the learner resumed from a checkpoint
        adapter = {name: torch.full((4, 8), float(len(requests) + 1))}
        engine.load_weights(adapter, version)
        request = engine.lora_request
        path = Path(request.lora_path)
        assert torch.equal(load_file(str(path / "adapter_model.safetensors"))[name], adapter[name])
        config = json.loads((path / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 32.0, ["q_proj", "v_proj"])
        requests.append(request)
        paths.append(path)
    assert [r.lora_int_id for r in requests] == [1, 2, 3]
    assert len({r.lora_name for r in requests}) == 3 and len(set(paths)) == 3
    assert [p.exists() for p in paths] == [False, False, True]  # only the adapter in use stays on disk
    assert engine.version == 2 and engine.llm.rpc == [] and engine.llm.prefix_resets == 0
    engine.generate(["the movie was"], seed=1)
    assert engine.llm.requests[-1][2] is requests[-1]


def test_full_weights_reach_the_model_through_collective_rpc(fake_vllm, tiny_policy):
    engine, weights = vllm_engine(tiny_policy, lora_rank=None), full_weights()
    engine.load_weights(weights, 3)
    assert engine.llm.rpc == [("uprlhf_load_weights", (weights,))]
    assert_model_holds(engine.llm.worker.model_runner.model, weights)
    assert engine.llm.prefix_resets == 1 and engine.version == 3 and engine.lora_request is None


def test_broadcast_full_weights_are_received_inside_vllms_worker(fake_vllm, tiny_policy):
    engine, weights = vllm_engine(tiny_policy, lora_rank=None), full_weights()
    layout = layout_of(weights)
    groups = []

    def receiver(group):
        groups.append(group)
        engine.receive_weights(group, layout, 5)

    broadcast(weights, receiver)
    assert engine.llm.rpc == [("uprlhf_receive_weights", (groups[0], layout))]
    assert_model_holds(engine.llm.worker.model_runner.model, weights)
    assert engine.llm.prefix_resets == 1 and engine.version == 5


def test_a_broadcast_lora_adapter_becomes_a_new_request(fake_vllm, tiny_policy):
    engine = vllm_engine(tiny_policy)
    engine.device = torch.device("cpu")  # where the adapter is received before it is saved
    adapter = {"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(8, 4)}
    broadcast(adapter, lambda group: engine.receive_weights(group, layout_of(adapter), 7))
    saved = load_file(str(Path(engine.lora_request.lora_path) / "adapter_model.safetensors"))
    assert torch.equal(saved[next(iter(adapter))], next(iter(adapter.values())))
    assert engine.lora_request.lora_int_id == 1 and engine.version == 7 and engine.llm.rpc == []


def layout_problems(batch: SampledBatch) -> list[str]:
    """How a batch breaks the layout every backend shares (left-padded prompts, right-padded responses)."""
    problems = []
    lengths = batch.prompt_mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        if batch.prompt_mask[i, batch.prompt_mask.shape[1] - n :].min() < 1:
            problems.append(f"row {i}: prompt not left-padded")
    if not torch.equal(batch.prompt_ids[batch.prompt_mask == 0], torch.full_like(batch.prompt_ids[batch.prompt_mask == 0], batch.pad_id)):
        problems.append("prompt padding is not the pad token")
    if not torch.equal(batch.response_mask, torch.sort(batch.response_mask, dim=1, descending=True).values):
        problems.append("response not right-padded")
    if (batch.response_ids[batch.response_mask == 0] != batch.pad_id).any():
        problems.append("response padding is not the pad token")
    if (batch.logprobs[batch.response_mask == 0] != 0).any() or (batch.logprobs[batch.response_mask == 1] > 0).any():
        problems.append("log-probs not 0 on padding and <= 0 elsewhere")
    if batch.logprobs.dtype != torch.float32 or batch.response_ids.dtype != torch.long:
        problems.append("dtypes")
    return problems


def test_generate_lays_vllm_outputs_out_like_the_hf_backend(fake_vllm, tiny_policy):
    engine = vllm_engine(tiny_policy, lora_rank=None)
    pad, eos = engine.tokenizer.pad_token_id, engine.tokenizer.eos_token_id
    engine.llm.outputs = [output([5, 6, 7], [10, 11, eos], [-0.5, -1.0, -0.25], " great fun "), output([8, 9], [12], [-2.0], "dull")]
    batch = engine.generate(["the movie was", "this film is"], seed=4)

    assert batch.prompts == ["the movie was", "this film is"] and batch.responses == ["great fun", "dull"]
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [pad, 8, 9]] and batch.prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.response_ids.tolist() == [[10, 11, eos], [12, pad, pad]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.logprobs.tolist() == [[-0.5, -1.0, -0.25], [-2.0, 0.0, 0.0]] and batch.pad_id == pad
    assert layout_problems(batch) == []
    hf = make_rollout_engine(policy(tiny_policy, None), HFRolloutConfig(max_new_tokens=4)).generate(["the movie was", "a"], seed=4)
    assert layout_problems(hf) == []

    texts, params, lora_request = engine.llm.requests[-1]
    assert texts == ["the movie was", "this film is"] and lora_request is None
    assert [(p.temperature, p.top_p, p.max_tokens, p.logprobs) for p in params] == [(0.7, 0.9, 4, 0)] * 2
    seeds = [p.seed for p in params]
    engine.generate(["the movie was", "this film is"], seed=4)
    assert len(set(seeds)) == 2 and [p.seed for p in engine.llm.requests[-1][1]] == seeds
