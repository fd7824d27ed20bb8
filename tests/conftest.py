"""Shared fixtures: tiny models built from configs and a loopback-only local Ray."""

from __future__ import annotations

import os
import random
import shutil

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["UPRLHF_DASHBOARD"] = "0"

GOOD = ["great", "lovely", "wonderful", "fun", "brilliant"]
BAD = ["awful", "boring", "terrible", "dull", "bad"]
OPENINGS = ["the movie was", "this film is", "the plot felt", "the acting was"]


class PlainEngine:
    """The engine interface of the reward training loop without DeepSpeed: enough for single-process tests."""

    def __init__(self, model, optimizer, scheduler):
        self.optimizer, self.scheduler = optimizer, scheduler

    def backward(self, loss):
        self.optimizer.zero_grad()
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.scheduler.step()


def toy_texts() -> list[str]:
    words = GOOD + BAD + ["and", "really", "quite", "zz", "qq", "xx"]
    return [f"{o} {a} and {b}" for o in OPENINGS for a in words for b in words]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Separable preferences: positive words beat negative ones."""
    rng = random.Random(seed)
    return [
        {
            "id": str(i),
            "prompt": rng.choice(OPENINGS),
            "chosen": f"{rng.choice(GOOD)} and {rng.choice(GOOD)}",
            "rejected": f"{rng.choice(BAD)} and {rng.choice(BAD)}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_reward_backbone(tmp_path_factory):
    from uprlhf.models import save_tiny_reward_backbone

    return save_tiny_reward_backbone(tmp_path_factory.mktemp("models") / "reward", toy_texts())


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    from uprlhf.models import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("models") / "policy", toy_texts())


@pytest.fixture(scope="session")
def single_rank(tmp_path_factory):
    """One gloo rank in this process, as a learner rank has inside its actor, for every test that builds a DeepSpeed
    engine in process. Made once per session: DeepSpeed keeps the first group it sees, so a second one would not reach it."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('dist') / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, every port on 127.0.0.1."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_reward_checkpoint(tmp_path_factory, tiny_reward_backbone):
    """An untrained 3-member linear ensemble saved as jobs.train_reward saves one (tokenizer included)."""
    from uprlhf.config import EnsembleConfig, ModelConfig
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.models import load_tokenizer
    from uprlhf.reward.training import TOKENIZER_DIR

    path = tmp_path_factory.mktemp("reward") / "final"
    backbone = ModelConfig(name_or_path=str(tiny_reward_backbone))
    ensemble_class("linear")(backbone, EnsembleConfig(k=3), 1e-3, 1e-3, 0).save(path)
    load_tokenizer(backbone).save_pretrained(path / TOKENIZER_DIR)
    return path


@pytest.fixture(scope="session")
def tiny_trained_reward(tmp_path_factory, tiny_reward_backbone):
    """A 3-member linear ensemble trained a few steps, laid out as jobs.train_reward does:
    ckpt_0, ckpt_1 (with Adam moments and mean learning rate) and final; plus held-out pairs."""
    import json

    from transformers import AutoTokenizer

    from uprlhf.config import EnsembleConfig, ModelConfig, TrainConfig
    from uprlhf.data.loaders import write_parquet
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.reward.training import train_ensemble

    root = tmp_path_factory.mktemp("trained_reward")
    tok = AutoTokenizer.from_pretrained(tiny_reward_backbone)
    ensemble = ensemble_class("linear")(ModelConfig(name_or_path=str(tiny_reward_backbone)), EnsembleConfig(k=3), 1e-3, 1e-2, 0)
    saved = []

    def save(checkpoint):
        path = root / "linear" / f"ckpt_{len(saved)}"
        info = checkpoint.write(path)
        (path / "trainer_state.json").write_text(json.dumps(info))
        saved.append(path)

    train_ensemble(ensemble, tok, toy_pairs(48), TrainConfig(batch_size=16, epochs=2, checkpoints=2, max_length=24),
                   warmup_fraction=0.3, bootstrap=False, rank=0, world_size=1, make_engine=PlainEngine, on_checkpoint=save)
    shutil.copytree(saved[-1], root / "linear" / "final")
    write_parquet(toy_pairs(16, seed=9), root / "reward_test.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_prompts(tmp_path_factory):
    from uprlhf.data.loaders import write_parquet

    path = tmp_path_factory.mktemp("prompts") / "rl_prompts.parquet"
    write_parquet([{"id": str(i), "prompt": f"{o} {w}"} for i, (o, w) in enumerate((o, w) for o in OPENINGS for w in GOOD + BAD)], path)
    return path


def tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **overrides) -> dict:
    """A PPO config over the tiny models: 4 prompts a step, 6-token responses, 2 learner ranks."""
    tree = {
        "prompts": str(tiny_prompts),
        "eval_prompts": 4,
        "reward_checkpoint": str(tiny_reward_checkpoint),
        "reward_k": 3,
        "policy": {"model": {"name_or_path": str(tiny_policy)}, "lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj"], "prompt_template": "plain"},
        "rollout": {"max_new_tokens": 6, "cpus_per_worker": 0.25, "torch_threads": 1},
        "learner": {"num_workers": 2, "cpus_per_worker": 0.5},
        "scorer_cpus": 0.25,
        "ppo": {"steps": 4, "batch_size": 4, "minibatch_size": 2, "lr": 1e-3},
        "gold_every": 2,
        "checkpoint_every": 2,
        "alarm": {"warmup_steps": 2, "trend_window": 2, "band_window": 2},
    }
    for key, value in overrides.items():
        from uprlhf.config import set_dotted

        set_dotted(tree, key, value)
    return tree


def run_ranks(member, n: int, timeout_s: float = 60.0) -> None:
    """``member(rank)`` for every rank of an in-process group, each in its own thread; a rank's exception is raised here
    (a thread's own would be lost)."""
    import threading

    errors = []

    def guarded(rank: int) -> None:
        try:
            member(rank)
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(rank,)) for rank in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]


class ListeningSockets:
    """Samples, in a thread, every TCP socket that this process's descendants (Ray's workers) listen on
    beyond loopback; ``found`` lists them as (process name, address, port)."""

    def __init__(self, every_s: float = 0.2):
        import threading

        self.every_s, self.found, self.stop = every_s, set(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import ipaddress

        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            pids = {p.pid: p for p in me.children(recursive=True)}
            for conn in psutil.net_connections(kind="tcp"):
                address = ipaddress.ip_address(conn.laddr.ip)
                address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids and not address.is_loopback:
                    try:
                        name = pids[conn.pid].name()
                    except psutil.Error:
                        name = "?"
                    self.found.add((name, conn.laddr.ip, conn.laddr.port))
            self.stop.wait(self.every_s)

    def __enter__(self) -> "ListeningSockets":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
