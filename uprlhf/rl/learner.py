"""One data-parallel rank of the PPO learner: actor-critic in a DeepSpeed engine (no Ray here).

The driver hands each rank its shard of a step's batch: the sampled responses,
the reference log-probs, and the shaped sequence rewards (penalty applied). The
rank recomputes the old log-probs and values with its own weights, builds
per-token rewards (with the in-reward k1 KL when configured), runs the advantage
estimator (``ppo.estimator``, GAE by default) and the clipped PPO epochs;
DeepSpeed averages the gradients over ranks. A critic-free estimator (GRPO, RLOO,
REINFORCE++-baseline) compares the samples of one prompt, so a shard holds whole
groups; its value head stays frozen and no value loss is added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from uprlhf.checkpoint import load_state, save_state
from uprlhf.config import RLConfig
from uprlhf.rl.policy import ActorCritic, SampledBatch, build_policy, policy_state, policy_weights
from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS, group_reward_std
from uprlhf.rl.ppo import explained_variance, kl_loss, masked_mean, policy_loss, token_rewards, value_loss
from uprlhf.reward.training import deepspeed_engine
from uprlhf.rl.weight_sync import Layout, layout_of, send
from uprlhf.seeds import derive_seed

LEARNER_DIR = "learner"  # per-rank resume state: rank_{r}.safetensors + rank_{r}.json
STATE_FORMAT = 1
POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class LearnerBatch:
    sampled: SampledBatch
    ref_logprobs: Tensor  # [B, T]
    rewards: Tensor  # [B] shaped sequence rewards
    groups: Tensor  # [B] prompt-group id of each row (the samples of one prompt share it)

    def __len__(self) -> int:
        return len(self.sampled)

    def shard(self, rank: int, world_size: int) -> LearnerBatch:
        """Rank ``rank``'s contiguous equal share; a group cut between two shards is a ValueError (its baseline would differ)."""
        size = len(self) // world_size
        rows = slice(rank * size, (rank + 1) * size)
        inside, outside = self.groups[rows], torch.cat([self.groups[: rows.start], self.groups[rows.stop :]])
        if torch.isin(inside, outside).any():
            raise ValueError(f"shard {rank} of {world_size} ({size} rows) cuts a prompt group; the batch must hold whole "
                             "groups per rank (ppo.batch_size / learner.num_workers a multiple of ppo.samples_per_prompt)")
        return LearnerBatch(self.sampled.select(rows), self.ref_logprobs[rows], self.rewards[rows], self.groups[rows])


class PPOLearner:
    def __init__(self, cfg: RLConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        torch.manual_seed(cfg.seed)
        policy, _ = build_policy(cfg.policy, trainable=True)
        hidden = policy.get_input_embeddings().embedding_dim
        self.model = ActorCritic(policy, hidden)
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.ppo.estimator)
        if not self.estimator.critic:  # no value loss: the head stays as built (zero) and out of the optimiser
            self.model.value_head.requires_grad_(False)
        if cfg.learner.use_gpu:
            self.model = self.model.cuda()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.ppo.lr, weight_decay=0.0)
        self.micro_batch = cfg.ppo.minibatch_size // world_size
        make = deepspeed_engine(cfg.learner.zero_stage, self.micro_batch, cfg.ppo.max_grad_norm)
        self.engine = make(self.model, optimizer, None)
        self.kl_in_loss = cfg.kl_in_loss()
        self.kl_in_reward = cfg.kl_in_reward()  # neither: the penalty's own KL term (var_kl) replaces both

    def _device(self, batch: LearnerBatch) -> LearnerBatch:
        if not self.cfg.learner.use_gpu:
            return batch
        return LearnerBatch(batch.sampled.to("cuda"), batch.ref_logprobs.cuda(), batch.rewards.cuda(), batch.groups.cuda())

    def train(self, batch: LearnerBatch, step: int, kl_coef: float) -> dict:
        """PPO epochs over this rank's shard; returns the shard's statistics.

        Per update, averaged: ``policy_loss``, ``value_loss`` (with a critic), ``clip_fraction``
        (share of tokens where the clipped ratio is the active branch), ``approx_kl``, ``kl_loss``
        (KL in the loss only) and ``grad_norm`` (global gradient norm before clipping). Of the
        shard before the update: ``kl``, ``return_mean``, ``entropy`` (mean per-token policy
        entropy over response tokens), ``response_tokens``, ``response_length_max``; with a
        critic ``value_mean`` and ``explained_variance`` (of the old values on the returns);
        with ``ppo.samples_per_prompt`` > 1 ``group_reward_std`` (mean over groups of the std
        of the sequence returns within a group); and ``train_seconds``.
        """
        started = time.perf_counter()
        batch = self._device(batch)
        ppo, temperature = self.cfg.ppo, self.cfg.rollout.temperature
        mask = batch.sampled.response_mask.float()
        with torch.no_grad():
            old_logp, old_values, entropy = self.engine(batch.sampled, temperature, entropy=True)
            log_ratio = (old_logp - batch.ref_logprobs) * mask
            in_reward = kl_coef * log_ratio if self.kl_in_reward else torch.zeros_like(log_ratio)
            rewards = token_rewards(batch.rewards, in_reward, mask)
            advantages, returns = self.estimator(rewards, old_values, mask, batch.groups, ppo)
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "minibatch order", step, self.rank))
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(ppo.epochs):
            order = torch.randperm(len(batch), generator=generator)
            for start in range(0, len(batch), self.micro_batch):
                rows = order[start : start + self.micro_batch].tolist()
                m = mask[rows]
                logp, values = self.engine(batch.sampled.select(rows), temperature)
                loss_pi, info = policy_loss(logp, old_logp[rows], advantages[rows], m, ppo.clip_range)
                loss = loss_pi
                if self.estimator.critic:
                    loss_v = value_loss(values, old_values[rows], returns[rows], m, ppo.value_clip_range)
                    loss = loss + ppo.vf_coef * loss_v
                    info["value_loss"] = loss_v.item()
                if self.kl_in_loss:
                    loss_kl = kl_loss(logp, batch.ref_logprobs[rows], m, self.cfg.kl.loss_form, self.cfg.kl.estimator)
                    loss = loss + kl_coef * loss_kl
                    info["kl_loss"] = loss_kl.item()
                self.engine.backward(loss)
                grad_norm = self._grad_norm()
                self.engine.step()
                if grad_norm is None:  # ZeRO 1-3: the optimiser's own, from the step
                    grad_norm = float(self.engine.get_global_grad_norm())
                info.update(policy_loss=loss_pi.item(), grad_norm=grad_norm)
                for key, value in info.items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
        stats = {key: value / updates for key, value in sums.items()}
        stats.update(
            kl=float(log_ratio.sum(1).mean()),
            return_mean=float(masked_mean(returns, mask)),
            entropy=float(masked_mean(entropy, mask)),
            response_tokens=float(mask.sum()),
            response_length_max=float(mask.sum(1).max()),
        )
        if self.estimator.critic:
            stats.update(value_mean=float(masked_mean(old_values, mask)),
                         explained_variance=explained_variance(old_values, returns, mask))
        if ppo.samples_per_prompt > 1:
            stats["group_reward_std"] = group_reward_std(rewards, mask, batch.groups)
        stats["train_seconds"] = time.perf_counter() - started
        return stats

    def _grad_norm(self) -> float | None:
        """The global L2 norm of this update's gradients before clipping; call between backward and step.

        Under ZeRO 1-3 the optimiser computes it in the step, to be read after it
        (``None`` here); at stage 0 DeepSpeed keeps none, but the all-reduced
        gradients are still on the parameters, and are only read.
        """
        if self.cfg.learner.zero_stage != 0:
            return None
        norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
                 for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _gathered(self):
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        from contextlib import nullcontext

        return nullcontext()

    def policy_weights(self) -> dict[str, Tensor] | None:
        """The weights the rollout workers need (rank 0 returns them; every rank must call under ZeRO-3)."""
        with self._gathered():
            return policy_weights(self.model.policy) if self.rank == 0 else None

    def weights_layout(self) -> Layout | None:
        """Names, shapes and dtypes of the synced weights (rank 0), for the broadcast receivers."""
        with self._gathered():
            return layout_of(policy_state(self.model.policy)) if self.rank == 0 else None

    def broadcast_weights(self, group) -> None:
        """Rank 0 sends the weights over the sync group (every rank must call under ZeRO-3)."""
        with self._gathered():
            if self.rank == 0:
                device = torch.device("cuda" if self.cfg.learner.use_gpu else "cpu")
                send(group, policy_state(self.model.policy), device)

    def save(self, path: str | Path) -> None:
        """Resume state of this rank as ``learner/rank_{r}.safetensors`` + ``.json``, plus the policy
        in PEFT/HF format and the value head from rank 0. Every rank must call it (collective under
        ZeRO 1-3). Nothing is pickled: see ``uprlhf.checkpoint``."""
        path = Path(path)
        save_state(path / LEARNER_DIR / f"rank_{self.rank}", self.state_dict())
        with self._gathered():
            if self.rank == 0:
                self.model.policy.save_pretrained(path / POLICY_DIR, safe_serialization=True)
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                    str(path / VALUE_HEAD_FILE),
                )

    def load(self, path: str | Path) -> None:
        """Restore what ``save`` wrote, from safetensors and JSON only (no pickle, no ``torch.load``)."""
        stem = Path(path) / LEARNER_DIR / f"rank_{self.rank}"
        if not stem.with_name(stem.name + ".json").is_file():
            raise FileNotFoundError(
                f"{stem}.json is missing: no learner state for rank {self.rank} of {self.world_size} in {path}"
            )
        self.load_state_dict(load_state(stem))

    # --- resume state ---------------------------------------------------------------

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs, as tensors and plain values."""
        engine = self.engine
        state = {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "zero_stage": self.cfg.learner.zero_stage,
            "engine": {key: int(getattr(engine, key, 0)) for key in ENGINE_COUNTERS},
            "scheduler": engine.lr_scheduler.state_dict() if getattr(engine, "lr_scheduler", None) is not None else None,
            "rng": rng_state(self.cfg.learner.use_gpu),
        }
        if self.cfg.learner.zero_stage == 0:
            state["weights"] = {name: p.detach() for name, p in self._trainable().items()}
            state["optimizer"] = engine.optimizer.state_dict()
        else:
            state.update(_zero_state(engine, self._trainable()))
        return state

    def load_state_dict(self, state: dict) -> None:
        where = f"learner state of rank {self.rank}"
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{where}: unknown format {state.get('format')!r} (expected {STATE_FORMAT})")
        for key, mine in (("rank", self.rank), ("world_size", self.world_size), ("zero_stage", self.cfg.learner.zero_stage)):
            if state.get(key) != mine:
                raise ValueError(f"{where}: saved with {key}={state.get(key)!r}, this run has {key}={mine!r}; "
                                 "resume with the same learner.num_workers and learner.zero_stage")
        params = self._trainable()
        saved = state["weights"]
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise KeyError(f"{where}: trainable weights differ (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape) and self.cfg.learner.zero_stage != 3:
                raise ValueError(f"{where}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(p.shape)}")
        if self.cfg.learner.zero_stage == 0:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
            self.engine.optimizer.load_state_dict(state["optimizer"])
        else:
            _load_zero_state(self.engine, params, state, self.cfg.learner.zero_stage)
        if state.get("scheduler") is not None and getattr(self.engine, "lr_scheduler", None) is not None:
            self.engine.lr_scheduler.load_state_dict(state["scheduler"])
        for key, value in state["engine"].items():
            if key in ENGINE_COUNTERS:
                setattr(self.engine, key, int(value))
        set_rng_state(state["rng"], self.cfg.learner.use_gpu)


ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def rng_state(cuda: bool) -> dict:
    """Torch CPU (and CUDA), numpy and Python RNG states as tensors and plain values."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if cuda and torch.cuda.is_available():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict, cuda: bool) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if cuda and "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _zero_state(engine, params: dict[str, torch.nn.Parameter]) -> dict:
    """ZeRO 1-3: the full fp32 weights (DeepSpeed's tensor-fragment API; collective, every rank
    calls) and this rank's inner torch optimiser state over its flat partition (Adam moments,
    step counts, hyper-parameters), which is why a resume needs the same world size."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in params.items()}
    base = _base_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO 1/2: the inner optimiser's own state dict is over the flat partitions
        return {"weights": weights, "optimizer": base.state_dict()}
    _check_zero3_in_memory(engine.optimizer)  # ZeRO 3 empties param_groups between steps: state per sub-group
    return {
        "weights": weights,
        "zero3_optimizer": {
            "hyper": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "sub_groups": [dict(base.state.get(flat, {})) for flat in flats],
        },
    }


def _check_zero3_in_memory(optimizer) -> None:
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "swap_optimizer", False):
        raise NotImplementedError("learner save/load under ZeRO 3 with optimizer offload or swapping is not supported")


def _load_zero_state(engine, params: dict[str, torch.nn.Parameter], state: dict, stage: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    saved = state["weights"]
    base = _base_optimizer(engine)
    if "zero3_optimizer" in state:
        _check_zero3_in_memory(engine.optimizer)
        flats, entry = engine.optimizer.fp32_partitioned_groups_flat, state["zero3_optimizer"]
        if len(entry["sub_groups"]) != len(flats) or len(entry["hyper"]) != len(base.param_groups):
            raise ValueError("saved ZeRO-3 optimiser state has another number of (sub-)groups than this one")
        for group, hyper in zip(base.param_groups, entry["hyper"]):
            group.update(hyper)
        for flat, sub in zip(flats, entry["sub_groups"]):
            base.state[flat] = {
                k: v.to(flat.device) if isinstance(v, torch.Tensor) and k != "step" else v for k, v in sub.items()
            }
    else:
        base.load_state_dict(state["optimizer"])
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked") and _base_optimizer(engine).state:
        engine.optimizer._hp_optimizer_states_linked = False  # ZeRO 1/2: re-point the fragment views
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():  # the fp32 master partitions, then the module's own weights
        device = getattr(p, "ds_tensor", p).device
        safe_set_full_fp32_param(p, saved[name].to(device, torch.float32))
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name].to(p.device, p.dtype))
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))

