"""One data-parallel rank of the PPO learner: actor-critic in a DeepSpeed engine (no Ray here).

The driver hands each rank its shard of a step's batch: the sampled responses,
the reference log-probs, and the shaped sequence rewards (penalty applied). The
rank recomputes the old log-probs and values with its own weights, builds
per-token rewards (with the in-reward KL when configured), runs GAE and the
clipped PPO epochs; DeepSpeed averages the gradients over ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from uprlhf.config import RLConfig
from uprlhf.rl.policy import ActorCritic, SampledBatch, build_policy, policy_state, policy_weights
from uprlhf.rl.ppo import gae, kl_estimate, masked_mean, policy_loss, token_rewards, value_loss, whiten
from uprlhf.reward.training import deepspeed_engine
from uprlhf.rl.weight_sync import Layout, layout_of, send

ENGINE_TAG = "learner"
POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class LearnerBatch:
    sampled: SampledBatch
    ref_logprobs: Tensor  # [B, T]
    rewards: Tensor  # [B] shaped sequence rewards

    def __len__(self) -> int:
        return len(self.sampled)

    def shard(self, rank: int, world_size: int) -> LearnerBatch:
        size = len(self) // world_size
        rows = slice(rank * size, (rank + 1) * size)
        return LearnerBatch(self.sampled.select(rows), self.ref_logprobs[rows], self.rewards[rows])


class PPOLearner:
    def __init__(self, cfg: RLConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        torch.manual_seed(cfg.seed)
        policy, _ = build_policy(cfg.policy, trainable=True)
        hidden = policy.get_input_embeddings().embedding_dim
        self.model = ActorCritic(policy, hidden)
        if cfg.learner.use_gpu:
            self.model = self.model.cuda()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.ppo.lr, weight_decay=0.0)
        self.micro_batch = cfg.ppo.minibatch_size // world_size
        make = deepspeed_engine(cfg.learner.zero_stage, self.micro_batch, cfg.ppo.max_grad_norm)
        self.engine = make(self.model, optimizer, None)
        self.kl_in_loss = cfg.kl_in_loss()

    def _device(self, batch: LearnerBatch) -> LearnerBatch:
        if not self.cfg.learner.use_gpu:
            return batch
        return LearnerBatch(batch.sampled.to("cuda"), batch.ref_logprobs.cuda(), batch.rewards.cuda())

    def train(self, batch: LearnerBatch, step: int, kl_coef: float) -> dict:
        """PPO epochs over this rank's shard; returns the shard's statistics."""
        started = time.perf_counter()
        batch = self._device(batch)
        ppo, temperature = self.cfg.ppo, self.cfg.rollout.temperature
        mask = batch.sampled.response_mask.float()
        with torch.no_grad():
            old_logp, old_values = self.engine(batch.sampled, temperature)
            log_ratio = (old_logp - batch.ref_logprobs) * mask
            in_reward = torch.zeros_like(log_ratio) if self.kl_in_loss else kl_coef * log_ratio
            rewards = token_rewards(batch.rewards, in_reward, mask)
            advantages, returns = gae(rewards, old_values, ppo.gamma, ppo.lam, mask)
            advantages = whiten(advantages, mask)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + self.rank)
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(ppo.epochs):
            order = torch.randperm(len(batch), generator=generator)
            for start in range(0, len(batch), self.micro_batch):
                rows = order[start : start + self.micro_batch].tolist()
                m = mask[rows]
                logp, values = self.engine(batch.sampled.select(rows), temperature)
                loss_pi, info = policy_loss(logp, old_logp[rows], advantages[rows], m, ppo.clip_range)
                loss_v = value_loss(values, old_values[rows], returns[rows], m, ppo.value_clip_range)
                loss = loss_pi + ppo.vf_coef * loss_v
                if self.kl_in_loss:
                    loss_kl = masked_mean(kl_estimate(logp, batch.ref_logprobs[rows], self.cfg.kl.estimator), m)
                    loss = loss + kl_coef * loss_kl
                    info["kl_loss"] = loss_kl.item()
                self.engine.backward(loss)
                self.engine.step()
                info.update(policy_loss=loss_pi.item(), value_loss=loss_v.item())
                for key, value in info.items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
        stats = {key: value / updates for key, value in sums.items()}
        stats.update(
            kl=float(log_ratio.sum(1).mean()),
            value_mean=float(masked_mean(old_values, mask)),
            return_mean=float(masked_mean(returns, mask)),
            response_tokens=float(mask.sum()),
            train_seconds=time.perf_counter() - started,
        )
        return stats

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
        """Engine state (weights, optimiser) for resuming, plus the policy in PEFT/HF format from rank 0."""
        path = Path(path)
        self.engine.save_checkpoint(str(path), tag=ENGINE_TAG)
        with self._gathered():
            if self.rank == 0:
                self.model.policy.save_pretrained(path / POLICY_DIR, safe_serialization=True)
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                    str(path / VALUE_HEAD_FILE),
                )

    def load(self, path: str | Path) -> None:
        self.engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
