"""One data-parallel rank of the PPO learner: actor-critic in a DeepSpeed engine (no Ray here).

The driver hands each rank its shard of a step's batch: the sampled responses,
the reference log-probs, and the shaped sequence rewards (penalty applied). The
rank recomputes the old log-probs (one step off policy, ``async_steps=1``: takes the
sampler's instead) and values with its own weights, builds
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
from uprlhf.engine_state import engine_state_dict, gathered, load_engine_state_dict
from uprlhf.config import RLConfig
from uprlhf.rl.policy import ActorCritic, SampledBatch, build_policy, policy_state, policy_weights
from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS, group_reward_std
from uprlhf.rl.ppo import explained_variance, kl_loss, masked_mean, policy_loss, token_rewards, value_loss
from uprlhf.reward.training import deepspeed_engine
from uprlhf.rl.weight_sync import Layout, layout_of, send
from uprlhf.seeds import derive_seed

LEARNER_DIR = "learner"  # per-rank resume state: rank_{r}.safetensors + rank_{r}.json
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
            if self.cfg.async_steps:  # off-policy by a step: the ratio is to the behaviour policy that sampled the batch
                old_logp = batch.sampled.logprobs * mask
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
        return gathered(self.model, self.cfg.learner.zero_stage)

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
        return engine_state_dict(self.engine, self._trainable(), self.rank, self.world_size,
                                 self.cfg.learner.zero_stage, self.cfg.learner.use_gpu)

    def load_state_dict(self, state: dict) -> None:
        load_engine_state_dict(self.engine, self._trainable(), state, self.rank, self.world_size,
                               self.cfg.learner.zero_stage, self.cfg.learner.use_gpu,
                               where=f"learner state of rank {self.rank}")
